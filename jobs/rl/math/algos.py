"""Advantage estimators and policy / value losses for GRPO and PPO.

Pure tensor functions; the loop picks them by name, only through the two
registries (a duplicate name is an error, an unknown one lists the choices):

    estimator = ADVANTAGE_ESTIMATORS.get(cfg.advantage)    # grpo, dr_grpo, rloo, gae, grpo_process
    advantages, returns = estimator(rewards, mask, group_size=G, values=values, gamma=..., lam=...)
    loss_fn = POLICY_LOSSES.get(cfg.loss)                  # grpo, dr_grpo, dapo
    loss, metrics = loss_fn(logp, old_logp, advantages, mask, clip_low=..., clip_high=..., kl_penalty=...,
                            token_weights=...)      # optional: rollout_correction_weights(...)

Calling convention, the same for every entry so the loop never branches on
the name: positional tensors, then keyword options; each entry takes the
options it needs and ignores the rest (`**_`). An option an entry needs and
does not get (`values` for gae) raises. What an estimator needs from the loop
is declared on it, not known by name: `needs_values` (a critic's values, gae)
and `step_rewards` (one reward per reasoning step, grpo_process).

Shapes: B = num_prompts * group_size completions, grouped contiguously (the
G completions of prompt p are rows p*G .. p*G+G-1); T = response tokens;
`mask` (B, T) is 1 on response tokens the policy generated, 0 on padding
(and on tool output / observation tokens). Outputs are 0 where mask is 0.
Estimators run under no_grad; losses are differentiable in `logprobs` / `values`.

Tests with hand-computed values: `pytest tests/test_rl_math.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .kl import MAX_LOG_RATIO
from .masked import masked_count, masked_mean, masked_sum, masked_whiten
from posttrain.jobs.registry import Registry

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]
PolicyLossFn = Callable[..., tuple[Tensor, dict[str, Tensor]]]

ADVANTAGE_ESTIMATORS: Registry[AdvantageFn] = Registry("advantage estimator")
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


def _float(x: Tensor) -> Tensor:
    """At least float32 (int / bool / half rewards are summed in float32 or wider)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _groups(rewards: Tensor, mask: Tensor, group_size: int) -> Tensor:
    """Check outcome-reward shapes; rewards (B,) -> (B / group_size, group_size)."""
    if rewards.dim() != 1:
        raise ValueError(f"outcome rewards have shape (num_prompts * group_size,), got {tuple(rewards.shape)}; "
                         "per-token rewards go to gae or grpo_process")
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ValueError(f"mask must be (batch, seq) with batch = len(rewards) = {rewards.shape[0]}, "
                         f"got {tuple(mask.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch of {rewards.shape[0]}")
    return _float(rewards).reshape(-1, group_size)


def _all_equal(groups: Tensor) -> Tensor:
    """(P, G) -> (P, 1) bool: every reward of the group is the same (a group of one included).

    Such a group carries no relative signal; its advantage is set to exactly 0
    rather than computed, because mean() of equal floats need not equal them
    (3 * 0.1 / 3 != 0.1), which would leave ~1e-17 / (0 + eps) noise.
    """
    return (groups == groups[:, :1]).all(dim=1, keepdim=True)


def _to_tokens(advantages: Tensor, mask: Tensor) -> Tensor:
    """(B,) per-sequence advantages -> (B, T): the value on every valid token, 0 elsewhere."""
    return torch.where(mask.bool(), advantages.unsqueeze(-1), 0.0)


@ADVANTAGE_ESTIMATORS.register("grpo")
@torch.no_grad()
def grpo_advantages(rewards: Tensor, mask: Tensor, *, group_size: int, eps: float = 1e-6,
                    scale_by_std: bool = True, **_: Any) -> tuple[Tensor, Tensor]:
    """Group-normalised outcome advantage: A_i = (r_i - mean_group(r)) / (std_group(r) + eps).

    GRPO outcome supervision, DeepSeekMath (Shao et al. 2024, arXiv:2402.03300),
    sec. 4.1.2; std is Bessel-corrected, as in TRL's GRPOTrainer. With
    `scale_by_std=False`: A_i = r_i - mean_group(r), Dr. GRPO's centering (Liu et
    al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783), which
    removes the bias toward too-easy / too-hard prompts.

    rewards: (B,) one scalar per completion; mask: (B, T) -> advantages (B, T),
    every valid token of completion i carrying A_i, and returns (B, T) = advantages
    (outcome estimators have no critic). All-equal groups and groups of one give 0.
    """
    groups = _groups(rewards, mask, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_by_std and group_size > 1:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    advantages = _to_tokens(torch.where(_all_equal(groups), 0.0, centred).reshape(-1), mask)
    return advantages, advantages


@ADVANTAGE_ESTIMATORS.register("dr_grpo")
@torch.no_grad()
def dr_grpo_advantages(rewards: Tensor, mask: Tensor, *, group_size: int, **_: Any) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (arXiv:2503.20783): `grpo_advantages` with `scale_by_std=False`, A_i = r_i - mean_group(r).

    rewards: (B,); mask: (B, T) -> advantages (B, T), returns (B, T) = advantages.
    """
    return grpo_advantages(rewards, mask, group_size=group_size, scale_by_std=False)


@ADVANTAGE_ESTIMATORS.register("rloo")
@torch.no_grad()
def rloo_advantages(rewards: Tensor, mask: Tensor, *, group_size: int, **_: Any) -> tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out: A_i = r_i - mean_{j != i, j in group} r_j.

    Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style
    Optimization for Learning from Human Feedback in LLMs" (arXiv:2402.14740),
    after Kool et al. 2019. Equal to G / (G - 1) * (r_i - mean_group(r)).

    rewards: (B,); mask: (B, T) -> advantages (B, T), returns (B, T) = advantages.
    A group of one has no other sample for a baseline: its advantage is 0, as
    is that of an all-equal group.
    """
    groups = _groups(rewards, mask, group_size)
    if group_size == 1:
        centred = torch.zeros_like(groups)
    else:
        centred = groups - (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    advantages = _to_tokens(torch.where(_all_equal(groups), 0.0, centred).reshape(-1), mask)
    return advantages, advantages


def outcome_to_token_rewards(rewards: Tensor, mask: Tensor) -> Tensor:
    """Place each completion's scalar reward on its last valid token.

    rewards: (B,); mask: (B, T) -> (B, T), zero elsewhere (and on rows with no
    valid token). The per-token reward PPO feeds to GAE; subtract a per-token
    `kl_penalty` from it for the in-reward KL of Ouyang et al. 2022.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device)
    last = torch.where(mask.bool(), positions, -1).amax(dim=-1, keepdim=True)  # (B, 1), -1 if empty
    return torch.where(positions == last, _float(rewards).unsqueeze(-1), 0.0)


@ADVANTAGE_ESTIMATORS.register("gae")
@torch.no_grad()
def gae_advantages(rewards: Tensor, mask: Tensor, *, values: Tensor | None = None, gamma: float = 1.0,
                   lam: float = 1.0, whiten: bool = True, **_: Any) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, eq. 16), for PPO.

        delta_t = r_t + gamma * V_{t'} - V_t        (t' the next valid token; V = 0 past the end)
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t                         (the critic's target)

    rewards: (B, T) per-token, or (B,) outcome rewards put on each last valid token
    (`outcome_to_token_rewards`); values: (B, T) critic values of the rollout;
    mask: (B, T) -> advantages (B, T), returns (B, T). Masked tokens inside a
    response (tool output) are skipped: the recursion runs over valid tokens only,
    as in veRL's `compute_gae_advantage_return`. With `whiten` (default, as in
    PPO implementations) advantages are whitened over the mask; returns are not.
    """
    if values is None:
        raise ValueError("gae needs `values` from a critic (PPO); critic-free runs choose grpo, dr_grpo or rloo")
    if rewards.dim() == 1:
        rewards = outcome_to_token_rewards(rewards, mask)
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(f"gae wants rewards, values and mask of one shape (batch, seq), got "
                         f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}")
    m = mask.bool()
    r = torch.where(m, _float(rewards), 0.0)
    v = torch.where(m, _float(values), 0.0)
    next_value = torch.zeros_like(r[:, 0])
    running = torch.zeros_like(r[:, 0])
    reversed_advantages = []
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        # on a masked token both carries pass through unchanged
        running = torch.where(m[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(m[:, t], v[:, t], next_value)
        reversed_advantages.append(running)
    advantages = torch.where(m, torch.stack(reversed_advantages[::-1], dim=1), 0.0)
    returns = torch.where(m, advantages + v, 0.0)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages, returns


gae_advantages.needs_values = True  # type: ignore[attr-defined]


@ADVANTAGE_ESTIMATORS.register("grpo_process")
@torch.no_grad()
def grpo_process_advantages(rewards: Tensor, mask: Tensor, *, group_size: int, step_mask: Tensor | None = None,
                            eps: float = 1e-6, scale_by_std: bool = True, **_: Any) -> tuple[Tensor, Tensor]:
    """GRPO with process supervision: one reward per reasoning step (DeepSeekMath, arXiv:2402.03300, sec. 4.1.3).

    Each step's reward sits on the step's last token. All step rewards of a
    group's G completions form one set R; each is normalised as
    r~ = (r - mean(R)) / (std(R) + eps) (Bessel-corrected; `scale_by_std=False`
    only centres), and token t gets the sum of the normalised rewards of the
    steps ending at or after t: A_t = sum_{index(j) >= t} r~_j.

    rewards: (B, T) step rewards, nonzero only at step ends; step_mask: (B, T)
    marking step ends, needed when a step's reward can be 0 (without it the
    step ends are where rewards != 0, and a zero-reward step would be left out
    of mean and std); mask: (B, T) -> advantages (B, T), returns (B, T) = advantages.
    Tokens after a completion's last step end get 0. A group whose step rewards
    are all equal (or with fewer than two steps) gets 0 everywhere.
    """
    if rewards.shape != mask.shape or rewards.dim() != 2:
        raise ValueError(f"grpo_process wants step rewards and mask of shape (batch, seq), got "
                         f"{tuple(rewards.shape)} and {tuple(mask.shape)}")
    if group_size < 1 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch of {rewards.shape[0]}")
    batch, seq = rewards.shape
    ends = (rewards != 0) if step_mask is None else step_mask.bool()
    ends = (ends & mask.bool()).reshape(-1, group_size * seq)  # (P, G*T): one row of step ends per group
    x = torch.where(ends, _float(rewards).reshape(-1, group_size * seq), 0.0)
    n = ends.sum(dim=1, keepdim=True)
    centred = torch.where(ends, x - x.sum(dim=1, keepdim=True) / n.clamp(min=1), 0.0)
    if scale_by_std:
        std = ((centred**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()
        centred = centred / (std + eps)
    highest = torch.where(ends, x, -torch.inf).amax(dim=1, keepdim=True)
    lowest = torch.where(ends, x, torch.inf).amin(dim=1, keepdim=True)
    normalised = torch.where((highest == lowest) | (n < 2), 0.0, centred).view(batch, seq)
    # suffix sum along the sequence: token t sums the steps that end at t or later
    advantages = torch.where(mask.bool(), normalised.flip(-1).cumsum(-1).flip(-1), 0.0)
    return advantages, advantages


grpo_process_advantages.step_rewards = True  # type: ignore[attr-defined]


ROLLOUT_CORRECTIONS = ("none", "tis", "mis")


@torch.no_grad()
def rollout_correction_weights(old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor, *, mode: str,
                               cap: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token importance weights for samples drawn by the rollout engine but trained as if drawn by the
    trainer's policy before the step: rho = exp(old_logprobs - rollout_logprobs) (engine kernels, precision,
    or async staleness make the two differ).

    tis (truncated IS, Yao et al. 2025): min(rho, cap); mis (masked IS): rho, and 0 where rho > cap (the token
    leaves the loss). All (B, T) -> weights (B, T), 0 off the mask, detached, and metrics over the mask:
    rollout_ratio_mean (rho before the cap), rollout_corrected_fraction (tokens truncated or masked),
    rollout_logprob_gap (mean |old - rollout|, the mismatch itself).
    """
    if mode not in ("tis", "mis"):
        raise ValueError(f"rollout correction must be tis or mis, got {mode!r}")
    m = mask.bool()
    gap = torch.where(m, _float(old_logprobs) - _float(rollout_logprobs), 0.0)
    rho = torch.exp(gap.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))
    over = m & (rho > cap)
    weights = rho.clamp(max=cap) if mode == "tis" else torch.where(over, 0.0, rho)
    metrics = {"rollout_ratio_mean": masked_mean(rho, mask),
               "rollout_corrected_fraction": masked_mean(over.to(rho.dtype), mask),
               "rollout_logprob_gap": masked_mean(gap.abs(), mask)}
    return torch.where(m, weights, 0.0), metrics


def _clipped_surrogate(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                       clip_low: float, clip_high: float,
                       token_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clip per-token loss max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), r = exp(logp - logp_old),
    times `token_weights` (the rollout correction's, detached) when given.

    All (B, T) -> per-token loss (B, T), in at least float32, and detached scalar
    metrics over the mask: clip_fraction (share of tokens where the clipped term
    is the larger, so no gradient), approx_kl (k3 estimate of KL(pi_old || pi):
    r - 1 - log r), ratio_mean.
    """
    m = mask.bool()
    # in at least float32 (a bf16 ratio is off by ~0.5%, as large as a whole update); padding is
    # selected away before exp(): exp(garbage) = inf there would make the gradient nan
    log_ratio = torch.where(m, _float(logprobs) - _float(old_logprobs), 0.0).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages, 0.0)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights.detach()
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return per_token, metrics


def _with_kl(per_token: Tensor, kl_penalty: Tensor | None, mask: Tensor,
             metrics: dict[str, Tensor]) -> Tensor:
    """Add the per-token KL penalty (already times beta) to the loss, before aggregation."""
    if kl_penalty is None:
        return per_token
    metrics["kl_penalty"] = masked_mean(kl_penalty.detach(), mask)
    return per_token + torch.where(mask.bool(), kl_penalty, 0.0)


@POLICY_LOSSES.register("grpo")
def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              clip_low: float = 0.2, clip_high: float = 0.2, kl_penalty: Tensor | None = None,
              token_weights: Tensor | None = None, **_: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO objective (DeepSeekMath, arXiv:2402.03300, eq. 3): PPO-clip, mean over each
    sequence's tokens, then mean over sequences: 1/G sum_i 1/|o_i| sum_t l_it.

    logprobs, old_logprobs, advantages, mask, kl_penalty (beta * KL per token,
    optional): (B, T) -> (scalar loss, metrics). Sequences with no valid token
    are left out of the batch mean; an all-masked batch gives loss 0.
    """
    per_token, metrics = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                                            token_weights)
    per_token = _with_kl(per_token, kl_penalty, mask, metrics)
    lengths = masked_count(mask, dim=-1)
    per_sequence = masked_sum(per_token, mask, dim=-1) / lengths.clamp(min=1)
    return per_sequence.sum() / (lengths > 0).sum().clamp(min=1), metrics


grpo_loss.normaliser = "sequences"  # type: ignore[attr-defined]  # what the loss averages over: rl.micro


@POLICY_LOSSES.register("dr_grpo")
def dr_grpo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
                 max_length: int | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                 kl_penalty: Tensor | None = None, token_weights: Tensor | None = None,
                 **_: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """Dr. GRPO (Liu et al. 2025, arXiv:2503.20783): PPO-clip, each sequence's token *sum*
    divided by one constant, then mean over sequences: 1/B sum_i sum_t l_it / max_length.

    Dropping GRPO's 1/|o_i| removes its length bias (long wrong answers were
    penalised less per token). `max_length` should be the generation limit, the
    same every step; None takes T, the padded width of this batch.
    Shapes and metrics as in `grpo_loss`.
    """
    per_token, metrics = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                                            token_weights)
    per_token = _with_kl(per_token, kl_penalty, mask, metrics)
    length = mask.shape[-1] if max_length is None else max_length
    if length < 1:
        raise ValueError(f"dr_grpo max_length must be >= 1, got {length}")
    return masked_sum(per_token, mask) / (length * mask.shape[0]), metrics


dr_grpo_loss.normaliser = "rows"  # type: ignore[attr-defined]


@POLICY_LOSSES.register("dapo")
def dapo_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *,
              clip_low: float = 0.2, clip_high: float = 0.28, kl_penalty: Tensor | None = None,
              token_weights: Tensor | None = None, **_: Any) -> tuple[Tensor, dict[str, Tensor]]:
    """DAPO (Yu et al. 2025, arXiv:2503.14476): token-level mean over all valid tokens of the
    batch, sum_{i,t} l_it / sum_i |o_i|, with "clip-higher" ratio bounds [1 - clip_low, 1 + clip_high]
    (paper: 0.2 and 0.28) so low-probability tokens can rise further.

    Shapes and metrics as in `grpo_loss`.
    """
    per_token, metrics = _clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_low, clip_high,
                                            token_weights)
    per_token = _with_kl(per_token, kl_penalty, mask, metrics)
    return masked_mean(per_token, mask), metrics


dapo_loss.normaliser = "tokens"  # type: ignore[attr-defined]


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               value_clip: float | None = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped PPO value loss: 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2)),
    V_clip = V_old + clip(V - V_old, -value_clip, value_clip).

    As in OpenAI baselines' ppo2 (see Engstrom et al. 2020, arXiv:2005.12729);
    `value_clip=None` is the plain squared error. values (current critic),
    old_values (critic at rollout), returns (GAE targets), mask: (B, T) ->
    (scalar loss, {value_clip_fraction, value_mean}).
    """
    m = mask.bool()
    v = torch.where(m, values, 0.0)
    target = torch.where(m, returns, 0.0)
    per_token = (v - target) ** 2
    clip_fraction = torch.zeros((), dtype=v.dtype, device=v.device)
    if value_clip is not None:
        old = torch.where(m, old_values, 0.0)
        clipped = (old + (v - old).clamp(-value_clip, value_clip) - target) ** 2
        clip_fraction = masked_mean((clipped > per_token).to(v.dtype).detach(), mask)
        per_token = torch.maximum(per_token, clipped)
    metrics = {"value_clip_fraction": clip_fraction, "value_mean": masked_mean(v.detach(), mask)}
    return 0.5 * masked_mean(per_token, mask), metrics
