"""KL to the reference policy, per token, and the policy's entropy.

The estimators follow John Schulman, "Approximating KL Divergence" (2020,
http://joschu.net/blog/kl-approx.html). With tokens sampled from the current
policy and log-ratio `d = logp_ref - logp`:

- `k1 = -d = logp - logp_ref`: unbiased for KL(pi || pi_ref), high variance, can be negative;
- `k3 = exp(d) - d - 1`: unbiased, never negative, lower variance; the estimator
  GRPO puts in its loss (DeepSeekMath, Shao et al. 2024, arXiv:2402.03300, eq. 4).

Usage in the loop (the reference model runs only when `uses_reference(beta)`):

    penalty = kl_penalty(logp, ref_logp, mask, beta=cfg.beta, estimator=cfg.kl)   # (batch, seq)
    loss, metrics = POLICY_LOSSES.get(cfg.loss)(logp, old_logp, adv, mask, kl_penalty=penalty)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from posttrain.jobs.registry import Registry

KlFn = Callable[[Tensor, Tensor], Tensor]
KL_ESTIMATORS: Registry[KlFn] = Registry("kl estimator")

# exp() of a log-ratio beyond this is clamped: exp(20) ~ 5e8 is already far outside any useful update
MAX_LOG_RATIO = 20.0


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = logp - logp_ref, elementwise. logprobs, ref_logprobs: (batch, seq) -> (batch, seq)."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = exp(d) - d - 1 with d = logp_ref - logp (Schulman's k3), elementwise, >= 0.

    logprobs, ref_logprobs: (batch, seq) -> (batch, seq). `d` is clamped to
    +-MAX_LOG_RATIO so exp() stays finite.
    """
    d = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    return torch.exp(d) - d - 1


def uses_reference(beta: float) -> bool:
    """Whether the reference policy has to be run at all: only when the KL coefficient is nonzero."""
    return beta != 0


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor | None, mask: Tensor, *,
               beta: float, estimator: str = "k3") -> Tensor:
    """beta * KL estimate per token, 0 on masked tokens.

    logprobs, ref_logprobs, mask: (batch, seq) -> (batch, seq), in at least
    float32. With `beta == 0` the result is zeros and `ref_logprobs` may be None
    (the caller skipped the reference model). The estimator name is checked either way, so a typo
    fails on the first step, not the first step with beta > 0.
    """
    fn = KL_ESTIMATORS.get(estimator)
    wide = torch.promote_types(logprobs.dtype, torch.float32)  # bf16 log-ratios are too coarse for exp()
    if not uses_reference(beta):
        return torch.zeros_like(logprobs, dtype=wide)
    if ref_logprobs is None:
        raise ValueError(f"kl_penalty with beta={beta} needs ref_logprobs; run the reference policy "
                         "or set beta to 0")
    m = mask.bool()
    # select padding away before the estimator: exp() of garbage there would poison the gradient
    kl = fn(torch.where(m, logprobs.to(wide), 0.0), torch.where(m, ref_logprobs.to(wide), 0.0))
    return beta * torch.where(m, kl, 0.0)


def entropy_from_logits(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Entropy of the token distribution at each position, 0 where `mask` is 0.

    logits: (batch, seq, vocab), finite where mask is set; mask: (batch, seq) or
    None -> (batch, seq), in at least float32. H = -sum_v p_v log p_v. Reduce
    with `masked_mean(entropy, mask)` for the usual metric.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if mask is not None:
        # zero the padded logits *before* softmax: nan there would otherwise reach the gradient
        logits = torch.where(mask.bool().unsqueeze(-1), logits, 0.0)
    logp = torch.log_softmax(logits, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return entropy if mask is None else torch.where(mask.bool(), entropy, 0.0)
