"""Weight buckets: how a set of named tensors is cut into per-dtype flat buffers and rebuilt.

Pure tensor code, used by the collective weight sync (`sync.CollectiveSync`) on both sides:

    metas = tensor_meta(named)                         # what a receiver needs to rebuild each tensor
    for bucket in plan_buckets(metas, 256 << 20):      # per dtype, at most 256 MiB each
        flat = pack([named[i][1] for i in bucket.items])
        ... broadcast flat ...
        named_again = unpack(flat, [metas[i] for i in bucket.items])

Fused groups (`engines.fused`): `plan_buckets` never splits the members of a layer's fused group
(vLLM's q/k/v), so a receiver that loads bucket by bucket never loads part of one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from .engines.fused import Groups, unit_of

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
