"""Weight buckets: how a set of named tensors is cut into per-dtype flat buffers and rebuilt.

Pure tensor code, used by the collective weight sync (`sync.CollectiveSync`) on both sides:

    metas = tensor_meta(named)                         # what a receiver needs to rebuild each tensor
    for bucket in plan_buckets(metas, 256 << 20):      # per dtype, at most 256 MiB each
        flat = pack([named[i][1] for i in bucket.items])
        ... broadcast flat ...
        named_again = unpack(flat, [metas[i] for i in bucket.items])

Fused groups: an engine may load some modules as one fused tensor (vLLM's `qkv_proj` holds a layer's
`q_proj`, `k_proj` and `v_proj`; `gate_up_proj` holds `gate_proj` and `up_proj`). vLLM's in-place reload
fills the members of a group it did not receive with uninitialised memory, so a load must bring a
layer's whole group or none of it: `unit_of` names the group a tensor belongs to, `plan_buckets` never
splits one, `incomplete_groups` finds what a load lacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch


class TensorMeta(NamedTuple):
    """What a receiver needs to rebuild one tensor from a flat bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str            # "float32", "bfloat16", ...
    numel: int
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    """One broadcast: the tensors `items` (indices into the meta list), all of `dtype`, back to back."""

    dtype: str
    items: tuple[int, ...]
    numel: int
    nbytes: int


def tensor_meta(named: list[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    return [TensorMeta(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), t.numel(),
                       t.numel() * t.element_size()) for n, t in named]


Groups = tuple[tuple[str, ...], ...]  # module names loaded as one fused tensor, e.g. ("q_proj", "k_proj", "v_proj")


def unit_of(name: str, groups: Groups) -> str:
    """The key of what must travel with `name`: its fused group in its layer, or the name itself.

    "model.layers.3.self_attn.k_proj.weight" with group (q_proj, k_proj, v_proj) ->
    "model.layers.3.self_attn.q_proj|k_proj|v_proj.weight".
    """
    found = _group_of(name, groups)
    return name if found is None else ".".join([*found[0], "|".join(found[2]), *found[1]])


def incomplete_groups(names: list[str], groups: Groups) -> dict[str, list[str]]:
    """{fused group key: its member names missing from `names`} for every group `names` covers only in part."""
    present = set(names)
    out: dict[str, list[str]] = {}
    for name in names:
        found = _group_of(name, groups)
        if found is None:
            continue
        before, after, group = found
        missing = sorted(m for m in (".".join([*before, member, *after]) for member in group) if m not in present)
        if missing:
            out[unit_of(name, groups)] = missing
    return out


def _group_of(name: str, groups: Groups) -> tuple[list[str], list[str], tuple[str, ...]] | None:
    """(parts before, parts after, group) when a dotted part of `name` is a member of a fused group."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        for group in groups:
            if part in group and len(group) > 1:
                return parts[:i], parts[i + 1:], tuple(group)
    return None


def plan_buckets(metas: list[TensorMeta], bucket_bytes: int, groups: Groups = ()) -> list[Bucket]:
    """Group tensors by dtype (first-seen order), then fill buckets of at most `bucket_bytes` in order.

    The members of a fused group (`groups`) stay in one bucket, so a receiver that loads bucket by
    bucket never loads part of a group. A tensor (or group) larger than `bucket_bytes` travels alone.
    Every index appears in exactly one bucket.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    units: dict[tuple[str, str], list[int]] = {}  # (dtype, unit key) -> indices, first-seen order
    for i, m in enumerate(metas):
        units.setdefault((m.dtype, unit_of(m.name, groups)), []).append(i)
    by_dtype: dict[str, list[list[int]]] = {}
    for (dtype, _), indices in units.items():
        by_dtype.setdefault(dtype, []).append(indices)
    buckets: list[Bucket] = []
    for dtype, unit_list in by_dtype.items():
        current: list[int] = []
        for unit in unit_list:
            size = sum(metas[j].nbytes for j in unit)
            if current and sum(metas[j].nbytes for j in current) + size > bucket_bytes:
                buckets.append(_bucket(dtype, current, metas))
                current = []
            current.extend(unit)
        if current:
            buckets.append(_bucket(dtype, current, metas))
    return buckets


def _bucket(dtype: str, items: list[int], metas: list[TensorMeta]) -> Bucket:
    return Bucket(dtype, tuple(items), sum(metas[i].numel for i in items), sum(metas[i].nbytes for i in items))


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Same-dtype tensors -> one flat contiguous tensor (no copy for a single contiguous tensor)."""
    import torch

    if len(tensors) == 1:
        return tensors[0].contiguous().view(-1)
    return torch.cat([t.reshape(-1) for t in tensors])


def unpack(flat: torch.Tensor, metas: list[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `pack`: views into `flat`, one per meta, in order."""
    out, offset = [], 0
    for m in metas:
        out.append((m.name, flat[offset:offset + m.numel].view(m.shape)))
        offset += m.numel
    return out
