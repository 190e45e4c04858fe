"""A learner shard cut into micro-batches: fixed row counts or a token budget, each trimmed to its own rows.

    parts = micro_batches(shard, rows=4)                  # training.microBatchSize rows each
    parts = micro_batches(shard, tokens=2048)              # rl.microBatchTokens: rows x width <= 2048
    weights = loss_shares(parts, POLICY_LOSSES.get("dapo").normaliser)
    loss = sum(w * loss_fn(forward(model, mb), ...) for w, mb in zip(weights, parts))   # = the whole shard's loss
    logp = scatter(parts, [forward(model, mb) for mb in parts], like=shard["input_ids"])  # back to (B, L)

Dynamic batching, not concatenation: every micro-batch keeps one sequence per row, and its columns are
cut to the span its rows attend (the step's batch is padded to its longest row; a micro-batch of short rows
then runs at its own width). Padding columns are masked in attention and positions count only attended
tokens (`sharded.position_ids`), so the cut changes no logit. With a token budget the rows are sorted by
length first, so each micro-batch holds rows of about one length and little padding.

The step's loss must not depend on how the shard was cut: each loss declares what it averages over
(`normaliser`: "sequences" for grpo, "rows" for dr_grpo, "tokens" for dapo and the value loss), and
`loss_shares` weighs each micro-batch by its part of that count, so the weighted sum of the micro-batches'
losses is the loss of the shard as one batch. Pure tensor functions; `tests/test_rl_micro.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_INDEX = "row_index"  # which shard rows a micro-batch holds (a long tensor)
COLUMNS = "columns"  # the [start, end) columns of the shard it holds


def _bins(lengths: list[int], tokens: int) -> list[list[int]]:
    """Rows sorted longest first, cut greedily so that rows x longest <= `tokens` (a longer row is alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    for i in order:
        if bins and (len(bins[-1]) + 1) * max(1, lengths[bins[-1][0]]) <= tokens:
            bins[-1].append(i)
        else:
            bins.append([i])
    return bins


def micro_batches(shard: dict[str, Tensor], *, rows: int | None = None,
                  tokens: int | None = None) -> list[dict[str, Tensor]]:
    """`shard` (each value (B, ...) with (B, L) sequence tensors) as micro-batches of `rows` rows in order,
    or with `tokens` set of rows sorted by length and binned so that rows x width <= tokens; every one cut
    to the columns its rows attend. Each carries ROW_INDEX and COLUMNS, which `scatter` uses."""
    attention = shard["attention_mask"].bool()
    size, width = attention.shape
    if tokens:
        groups = _bins(attention.sum(-1).tolist(), tokens)
    else:
        step = rows or size
        groups = [list(range(i, min(i + step, size))) for i in range(0, size, step)]
    out = []
    for group in groups:
        index = torch.tensor(group, dtype=torch.long, device=attention.device)
        used = attention[index].any(0).nonzero().flatten()
        start, end = (int(used[0]), int(used[-1]) + 1) if used.numel() else (0, 1)
        mb = {}
        for key, value in shard.items():
            picked = value.index_select(0, index)
            mb[key] = picked[:, start:end] if picked.dim() >= 2 and picked.shape[1] == width else picked
        mb[ROW_INDEX] = index
        mb[COLUMNS] = torch.tensor([start, end])
        out.append(mb)
    return out


def scatter(parts: list[dict[str, Tensor]], values: list[Tensor], *, like: Tensor) -> Tensor:
    """The micro-batches' (b, l) `values` placed back at their rows and columns of a (B, L) zero tensor."""
    out = torch.zeros(like.shape, dtype=values[0].dtype if values else torch.float32, device=like.device)
    for mb, value in zip(parts, values):
        start, end = (int(c) for c in mb[COLUMNS])
        out[mb[ROW_INDEX], start:end] = value
    return out


def loss_shares(parts: list[dict[str, Tensor]], normaliser: str, *, mask_key: str = "completion_mask") -> list[float]:
    """Each micro-batch's weight: its part of what the loss averages over ("sequences": rows with a
    completion token, "rows", "tokens": completion tokens). Weights sum to 1 (an empty shard: equal)."""
    if normaliser == "sequences":
        counts = [int((mb[mask_key].sum(-1) > 0).sum()) for mb in parts]
    elif normaliser == "rows":
        counts = [mb[mask_key].shape[0] for mb in parts]
    elif normaliser == "tokens":
        counts = [int(mb[mask_key].sum()) for mb in parts]
    else:
        raise ValueError(f"unknown loss normaliser {normaliser!r}: sequences, rows or tokens")
    total = sum(counts)
    return [c / total for c in counts] if total else [1 / len(parts)] * len(parts)
