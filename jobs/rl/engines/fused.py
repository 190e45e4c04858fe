"""Fused groups: modules an engine loads as one tensor, which a weight load must bring whole.

    groups = engine.fused_groups()                    # vLLM Llama: (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    unit_of("model.layers.3.self_attn.k_proj.weight", groups)   # "model.layers.3.self_attn.q_proj|k_proj|v_proj.weight"
    incomplete_groups(names, groups)                  # {group key: missing member names}

vLLM's `qkv_proj` holds a layer's `q_proj`, `k_proj` and `v_proj` (and `gate_up_proj` its `gate_proj` and
`up_proj`). Its in-place reload fills the members of a group it did not receive with uninitialised
memory, so a load must bring a layer's whole group or none of it: the learner's adapter-only export
adds the siblings of what it adapted, the buckets of a collective sync never split a group, and the
vLLM engine refuses a partial one. Pure name logic (no torch).
"""

from __future__ import annotations

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
