"""Reductions over the valid tokens of a padded batch.

`mask` has the shape of `x` and is 1 (or True) on tokens that count, 0 on
padding and prompt tokens. Masked positions are selected away with
`torch.where`, never multiplied by 0: `nan * 0` is `nan`, so garbage in
padding would otherwise leak into sums and gradients. An empty mask gives a
mean of 0, not `nan`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of `x` where `mask` is set. x, mask: (...); dim=None -> scalar, else reduces `dim`."""
    zeroed = torch.where(mask.bool(), x, 0.0)
    return zeroed.sum() if dim is None else zeroed.sum(dim)


def masked_count(mask: Tensor, dim: int | None = None) -> Tensor:
    """Number of set entries in `mask` (int64). mask: (...); dim as in `masked_sum`."""
    m = mask.bool()
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` over set entries of `mask`; 0 where none is set. Shapes as in `masked_sum`."""
    return masked_sum(x, mask, dim) / masked_count(mask, dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, *, unbiased: bool = True) -> Tensor:
    """Variance (scalar) of `x` over the whole mask; Bessel-corrected when `unbiased`; 0 for <2 entries."""
    mean = masked_mean(x, mask)
    n = masked_count(mask)
    denom = (n - 1) if unbiased else n
    var = masked_sum((x - mean) ** 2, mask) / denom.clamp(min=1)
    return torch.where(n > 1, var, 0.0)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten `x` by the mean and (unbiased) std over the mask; masked positions become 0.

    x, mask: (batch, seq) -> (batch, seq). With `shift_mean=False` the mean is
    added back (only the scale changes), as in TRL / veRL's `masked_whiten`.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0.0)
