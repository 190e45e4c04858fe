"""RL math against hand-computed values: advantages, policy / value losses, KL, masking, registries.

Unit tier: tiny CPU tensors, no Ray, no model. The arithmetic behind each
expected value is written next to it. Run: `pytest tests/test_rl_math.py`.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.jobs.rl.math.algos import (
    ADVANTAGE_ESTIMATORS,
    POLICY_LOSSES,
    dapo_loss,
    dr_grpo_advantages,
    dr_grpo_loss,
    gae_advantages,
    grpo_advantages,
    grpo_loss,
    grpo_process_advantages,
    outcome_to_token_rewards,
    rloo_advantages,
    value_loss,
)
from posttrain.jobs.rl.math.kl import KL_ESTIMATORS, entropy_from_logits, kl_k1, kl_k3, kl_penalty, uses_reference
from posttrain.jobs.rl.math.masked import masked_mean, masked_sum, masked_var, masked_whiten
from posttrain.jobs.registry import Registry

D = torch.float64  # hand-computed values are compared in double precision


def t(rows, dtype=D):
    return torch.tensor(rows, dtype=dtype)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual, expected if isinstance(expected, torch.Tensor) else t(expected),
                               rtol=0, atol=tol, check_dtype=False)


# ---------------------------------------------------------------------------- masked helpers

X = t([[1.0, 2.0, 3.0], [4.0, math.nan, math.inf]])
XMASK = t([[1, 1, 0], [1, 0, 0]])


def test_masked_sum_and_mean_ignore_padding_even_nan_and_inf():
    close(masked_sum(X, XMASK), 7.0)  # 1 + 2 + 4
    close(masked_mean(X, XMASK), 7.0 / 3)  # 7 / 3 valid entries
    close(masked_sum(X, XMASK, dim=-1), [3.0, 4.0])  # rows: 1 + 2, 4
    close(masked_mean(X, XMASK, dim=-1), [1.5, 4.0])  # 3 / 2, 4 / 1
    close(masked_mean(X, torch.zeros_like(XMASK)), 0.0)  # empty mask: 0, not nan


def test_masked_var_and_whiten():
    # valid values 1, 2, 4; mean 7/3; squared deviations 16/9, 1/9, 25/9 sum to 42/9
    close(masked_var(X, XMASK), 42 / 9 / 2)  # Bessel: / (3 - 1) = 7/3
    close(masked_var(X, XMASK, unbiased=False), 42 / 9 / 3)
    w = masked_whiten(X, XMASK, eps=0.0)
    s = math.sqrt(7 / 3)
    close(w, [[(1 - 7 / 3) / s, (2 - 7 / 3) / s, 0.0], [(4 - 7 / 3) / s, 0.0, 0.0]])
    close(masked_mean(w, XMASK), 0.0)
    close(masked_var(w, XMASK), 1.0)
    # shift_mean=False: the mean is added back, only the scale changes
    close(masked_mean(masked_whiten(X, XMASK, shift_mean=False, eps=0.0), XMASK), 7 / 3)


# ---------------------------------------------------------------------------- outcome advantages

def test_grpo_group_normalised():
    # group 1: rewards 0, 0, 3 -> mean 1, centred -1, -1, 2, std = sqrt((1 + 1 + 4) / 2) = sqrt(3)
    # group 2: rewards 1, 2, 3 -> mean 2, centred -1, 0, 1, std = sqrt((1 + 0 + 1) / 2) = 1
    rewards = t([0.0, 0.0, 3.0, 1.0, 2.0, 3.0])
    mask = torch.ones(6, 2)
    adv, ret = grpo_advantages(rewards, mask, group_size=3, eps=0.0)
    s3 = math.sqrt(3)
    expected = t([-1 / s3, -1 / s3, 2 / s3, -1.0, 0.0, 1.0])
    close(adv, expected.unsqueeze(-1).expand(6, 2))
    close(ret, adv)
    # default eps=1e-6 enters the denominator: 1 / (1 + 1e-6)
    adv, _ = grpo_advantages(rewards, mask, group_size=3)
    close(adv[5, 0], 1 / (1 + 1e-6), tol=1e-12)


def test_dr_grpo_only_centres():
    # same groups: centred values without the std division
    rewards = t([0.0, 0.0, 3.0, 1.0, 2.0, 3.0])
    mask = torch.ones(6, 1)
    expected = [[-1.0], [-1.0], [2.0], [-1.0], [0.0], [1.0]]
    close(grpo_advantages(rewards, mask, group_size=3, scale_by_std=False)[0], expected)
    close(dr_grpo_advantages(rewards, mask, group_size=3)[0], expected)


def test_rloo_leave_one_out():
    # 0 - mean(0, 3) = -1.5; 0 - mean(0, 3) = -1.5; 3 - mean(0, 0) = 3   (= 3/2 * (-1, -1, 2))
    # 1 - mean(2, 3) = -1.5; 2 - mean(1, 3) = 0;    3 - mean(1, 2) = 1.5
    rewards = t([0.0, 0.0, 3.0, 1.0, 2.0, 3.0])
    adv, ret = rloo_advantages(rewards, torch.ones(6, 1), group_size=3)
    close(adv, [[-1.5], [-1.5], [3.0], [-1.5], [0.0], [1.5]])
    close(ret, adv)


def test_outcome_advantage_is_broadcast_to_valid_tokens_only():
    # rewards 1, 3 in one group: grpo A = (-1, 1) / sqrt(2) since std = sqrt((1 + 1) / 1)
    mask = t([[1, 1, 0, 0], [1, 1, 1, 0]])
    adv, _ = grpo_advantages(t([1.0, 3.0]), mask, group_size=2, eps=0.0)
    a = 1 / math.sqrt(2)
    close(adv, [[-a, -a, 0, 0], [a, a, a, 0]])


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_all_equal_groups_and_groups_of_one_give_exact_zero(name):
    fn = ADVANTAGE_ESTIMATORS.get(name)
    # 0.1 three times: mean() is 0.10000000000000002 in float64, yet the advantage must be exactly 0
    for dtype in (torch.float32, torch.float64):
        adv, ret = fn(t([0.1, 0.1, 0.1, 1.0, 0.0, 0.0], dtype), torch.ones(6, 3), group_size=3)
        assert torch.equal(adv[:3], torch.zeros(3, 3, dtype=adv.dtype))
        assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
        assert (adv[3:] != 0).all()  # the other group still learns
    # groups of one: no relative signal, 0, no nan (torch.std of one value would be nan)
    adv, _ = fn(t([0.3, -2.0]), torch.ones(2, 2), group_size=1)
    assert torch.equal(adv, torch.zeros(2, 2, dtype=adv.dtype))


def test_outcome_estimators_check_shapes():
    with pytest.raises(ValueError, match="divide the batch"):
        grpo_advantages(t([1.0, 2.0, 3.0]), torch.ones(3, 2), group_size=2)
    with pytest.raises(ValueError, match="per-token rewards"):
        rloo_advantages(torch.ones(2, 3), torch.ones(2, 3), group_size=2)


def test_integer_rewards_become_float():
    adv, _ = dr_grpo_advantages(torch.tensor([0, 1]), torch.ones(2, 1), group_size=2)
    close(adv, [[-0.5], [0.5]])  # mean 0.5


# ---------------------------------------------------------------------------- gae

def test_gae_hand_computed():
    # gamma 0.9, lam 0.8 -> gamma * lam = 0.72
    # row 0 (3 valid tokens), rewards 0, 0, 1, values 0.5, 0.6, 0.7:
    #   t2: delta = 1 + 0.9 * 0   - 0.7 = 0.3                         A2 = 0.3
    #   t1: delta = 0 + 0.9 * 0.7 - 0.6 = 0.03   A1 = 0.03 + 0.72 * 0.3   = 0.246
    #   t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04   A0 = 0.04 + 0.72 * 0.246 = 0.21712
    #   returns = A + V = 0.71712, 0.846, 1.0
    # row 1 (2 valid tokens, then padding holding garbage), rewards 0, 1, values 0.5, 0.6:
    #   t1: delta = 1 + 0 - 0.6 = 0.4                                  A1 = 0.4
    #   t0: delta = 0 + 0.9 * 0.6 - 0.5 = 0.04   A0 = 0.04 + 0.72 * 0.4 = 0.328
    rewards = t([[0.0, 0.0, 1.0], [0.0, 1.0, 999.0]])
    values = t([[0.5, 0.6, 0.7], [0.5, 0.6, math.nan]])
    mask = t([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(rewards, mask, values=values, gamma=0.9, lam=0.8, whiten=False)
    close(adv, [[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]])
    close(ret, [[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]])
    # outcome rewards (B,) land on each last valid token: the same as above
    close(outcome_to_token_rewards(t([1.0, 1.0]), mask), [[0, 0, 1.0], [0, 1.0, 0]])
    adv1, ret1 = gae_advantages(t([1.0, 1.0]), mask, values=values, gamma=0.9, lam=0.8, whiten=False)
    close(adv1, adv)
    close(ret1, ret)
    # whitened (the default): zero mean, unit variance over the 5 valid tokens, 0 on padding
    white, _ = gae_advantages(rewards, mask, values=values, gamma=0.9, lam=0.8)
    close(masked_mean(white, mask), 0.0, tol=1e-12)
    close(masked_var(white, mask), 1.0, tol=1e-5)  # eps 1e-8 against a variance of ~5e-3
    assert white[1, 2] == 0


def test_gae_skips_masked_tokens_inside_a_response():
    # tool output at t1 (mask 0): the recursion jumps from t2 to t0
    #   t2: delta = 1 - 0.7 = 0.3                                     A2 = 0.3
    #   t0: delta = 0 + 0.9 * V2 - V0 = 0.63 - 0.5 = 0.13              A0 = 0.13 + 0.72 * 0.3 = 0.346
    adv, _ = gae_advantages(t([[0.0, 5.0, 1.0]]), t([[1, 0, 1]]), values=t([[0.5, 7.0, 0.7]]),
                            gamma=0.9, lam=0.8, whiten=False)
    close(adv, [[0.346, 0.0, 0.3]])


def test_gae_with_gamma_lam_one_is_return_minus_value():
    # A_t = sum_{s >= t} r_s - V_t: (1 + 2) - 1 = 2, 2 - 0.5 = 1.5
    adv, ret = gae_advantages(t([[1.0, 2.0]]), torch.ones(1, 2), values=t([[1.0, 0.5]]), whiten=False)
    close(adv, [[2.0, 1.5]])
    close(ret, [[3.0, 2.0]])


def test_gae_needs_values():
    with pytest.raises(ValueError, match="needs `values`"):
        ADVANTAGE_ESTIMATORS.get("gae")(t([1.0]), torch.ones(1, 2), group_size=1)


# ---------------------------------------------------------------------------- process rewards

def test_grpo_process_rewards():
    # one group of 2; step ends: row 0 at t1 (reward 1) and t3 (reward 0),
    #                           row 1 at t0 (reward 0) and t2 (reward 1), t3 is padding
    # R = {1, 0, 0, 1}: mean 0.5, centred +0.5, -0.5, -0.5, +0.5; std = sqrt(4 * 0.25 / 3) = 1/sqrt(3)
    # token t sums the normalised rewards of steps ending at t or later:
    #   row 0: t0 = t1 = +0.5 - 0.5 = 0; t2 = t3 = -0.5
    #   row 1: t0 = -0.5 + 0.5 = 0; t1 = t2 = +0.5; t3 padding = 0
    rewards = t([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 9.0]])
    steps = t([[0, 1, 0, 1], [1, 0, 1, 1]])
    mask = t([[1, 1, 1, 1], [1, 1, 1, 0]])
    centred = [[0.0, 0.0, -0.5, -0.5], [0.0, 0.5, 0.5, 0.0]]
    adv, ret = grpo_process_advantages(rewards, mask, group_size=2, step_mask=steps, scale_by_std=False)
    close(adv, centred)
    close(ret, adv)
    adv, _ = grpo_process_advantages(rewards, mask, group_size=2, step_mask=steps, eps=0.0)
    close(adv, t(centred) * math.sqrt(3))
    # without step_mask, step ends are the nonzero rewards: only the two 1s, all equal -> 0
    adv, _ = grpo_process_advantages(rewards, mask, group_size=2)
    assert torch.equal(adv, torch.zeros_like(adv))


def test_grpo_process_groups_are_separate():
    # group 1 as above (2 rows); group 2 has rewards only 2 and 2 -> all equal -> 0
    rewards = t([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [2.0, 0, 0, 0], [0, 0, 0, 2.0]])
    steps = t([[0, 1, 0, 1], [1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    adv, _ = grpo_process_advantages(rewards, torch.ones(4, 4), group_size=2, step_mask=steps,
                                     scale_by_std=False)
    close(adv[:2], [[0.0, 0.0, -0.5, -0.5], [0.0, 0.5, 0.5, 0.0]])
    assert torch.equal(adv[2:], torch.zeros(2, 4, dtype=adv.dtype))


def test_every_estimator_takes_the_same_call():
    # the loop calls any estimator with one set of options; each ignores what it does not use
    rewards, mask = t([1.0, 0.0, 0.5, 0.5]), torch.ones(4, 3)
    options = dict(group_size=2, values=torch.zeros(4, 3, dtype=D), gamma=1.0, lam=0.95,
                   step_mask=None, eps=1e-6)
    for name in ADVANTAGE_ESTIMATORS.names():
        r = outcome_to_token_rewards(rewards, mask) if name == "grpo_process" else rewards
        adv, ret = ADVANTAGE_ESTIMATORS.get(name)(r, mask, **options)
        assert adv.shape == ret.shape == (4, 3) and torch.isfinite(adv).all(), name


# ---------------------------------------------------------------------------- policy losses
# Two sequences, old logprobs 0, ratios r = exp(logp), clip 0.2:
#   row 0: r 1.5, 0.5, 0.5 with A  1, -1,  1
#   row 1: r 1.1, 1.0, pad with A  1,  2, pad
# per-token loss max(-A r, -A clip(r, 0.8, 1.2)):
#   (0,0) max(-1.5, -1.2) = -1.2  clipped (ratio above 1 + eps with A > 0)
#   (0,1) max( 0.5,  0.8) =  0.8  clipped (ratio below 1 - eps with A < 0)
#   (0,2) max(-0.5, -0.8) = -0.5  not clipped: the unclipped term is the pessimistic one
#   (1,0) max(-1.1, -1.1) = -1.1  inside the range
#   (1,1) max(-2.0, -2.0) = -2.0  ratio 1
# clip_fraction = 2 / 5 = 0.4; ratio_mean = (1.5 + 0.5 + 0.5 + 1.1 + 1.0) / 5 = 0.92

RATIO = t([[1.5, 0.5, 0.5], [1.1, 1.0, 1.0]])
ADV = t([[1.0, -1.0, 1.0], [1.0, 2.0, 0.0]])
MASK = t([[1, 1, 1], [1, 1, 0]])


def _approx_kl():  # k3 of KL(old || new), r - 1 - ln r, over the 5 tokens
    return sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 1.1, 1.0)) / 5


def _inputs(padding_logp=0.0, padding_adv=0.0):
    logp = torch.log(RATIO).clone()
    logp[1, 2] = padding_logp
    adv = ADV.clone()
    adv[1, 2] = padding_adv
    return logp.requires_grad_(), torch.zeros(2, 3, dtype=D), adv


def test_grpo_loss_sequence_mean_then_batch_mean():
    # row means: (-1.2 + 0.8 - 0.5) / 3 = -0.3, (-1.1 - 2.0) / 2 = -1.55; batch mean -0.925
    loss, metrics = grpo_loss(*_inputs(), MASK)
    close(loss, -0.925)
    close(metrics["clip_fraction"], 0.4)
    close(metrics["ratio_mean"], 0.92)
    close(metrics["approx_kl"], _approx_kl())


def test_dr_grpo_loss_token_sum_over_constant_length():
    # row sums -0.9 and -3.1, total -4.0, divided by max_length 4 and batch 2: -0.5
    loss, metrics = dr_grpo_loss(*_inputs(), MASK, max_length=4)
    close(loss, -0.5)
    close(metrics["clip_fraction"], 0.4)
    # default length is the padded width T = 3: -4.0 / (3 * 2)
    close(dr_grpo_loss(*_inputs(), MASK)[0], -4.0 / 6)


def test_dapo_loss_token_mean_with_asymmetric_clip():
    # clip-higher 0.28: (0,0) becomes max(-1.5, -1.28) = -1.28, the rest as before
    # token mean (-1.28 + 0.8 - 0.5 - 1.1 - 2.0) / 5 = -4.08 / 5 = -0.816
    loss, metrics = dapo_loss(*_inputs(), MASK)
    close(loss, -0.816)
    close(metrics["clip_fraction"], 0.4)
    # a ratio of 1.25 with A > 0 is clipped by grpo (1.2) but not by dapo (1.28)
    logp, old, mask = torch.log(t([[1.25]])), torch.zeros(1, 1, dtype=D), torch.ones(1, 1)
    close(dapo_loss(logp, old, t([[1.0]]), mask)[0], -1.25)
    close(dapo_loss(logp, old, t([[1.0]]), mask)[1]["clip_fraction"], 0.0)
    close(grpo_loss(logp, old, t([[1.0]]), mask)[0], -1.2)
    # symmetric bounds give the grpo tokens: -4.0 / 5
    close(dapo_loss(*_inputs(), MASK, clip_high=0.2)[0], -0.8)


def test_loss_aggregations_differ_on_unequal_lengths():
    # row 0 has 2 tokens of loss -1 each, row 1 has 1 token of loss -4 (ratio 1, A = 1 and 4)
    logp, old = torch.zeros(2, 2, dtype=D), torch.zeros(2, 2, dtype=D)
    adv, mask = t([[1.0, 1.0], [4.0, 0.0]]), t([[1, 1], [1, 0]])
    close(grpo_loss(logp, old, adv, mask)[0], (-1.0 + -4.0) / 2)  # sequence means -1 and -4
    close(dapo_loss(logp, old, adv, mask)[0], (-1 - 1 - 4) / 3)  # 3 tokens
    close(dr_grpo_loss(logp, old, adv, mask, max_length=2)[0], (-2 - 4) / (2 * 2))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo"])
def test_padding_contributes_nothing_and_gradients_flow(name):
    fn = POLICY_LOSSES.get(name)
    logp, old, adv = _inputs()
    loss, metrics = fn(logp, old, adv, MASK)
    loss.backward()
    # garbage under mask == 0 (huge / nan / -inf logprob, nan advantage) changes neither loss,
    # metrics nor gradients
    for garbage in (300.0, math.nan, -math.inf):
        logp2, old2, adv2 = _inputs(padding_logp=garbage, padding_adv=math.nan)
        loss2, metrics2 = fn(logp2, old2, adv2, MASK)
        loss2.backward()
        close(loss2, loss)
        for key in ("clip_fraction", "approx_kl", "ratio_mean"):
            close(metrics2[key], metrics[key])
        assert torch.isfinite(logp2.grad).all()
        close(logp2.grad, logp.grad)
        assert logp2.grad[1, 2] == 0
    # clipped tokens get no gradient; (0,2), (1,0), (1,1) do
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] == 0 and (logp.grad[1, :2] != 0).all()
    assert all(not v.requires_grad for v in metrics.values())


def test_bf16_logprobs_are_widened_before_exp():
    # the ratio of bf16 log-probs is computed in float32 and the gradient reaches the bf16 leaf
    logp = torch.tensor([[-0.1, -0.3]], dtype=torch.bfloat16, requires_grad=True)
    old = torch.tensor([[-0.2, -0.2]], dtype=torch.bfloat16)
    loss, metrics = dapo_loss(logp, old, torch.ones(1, 2), torch.ones(1, 2))
    loss.backward()
    exact = torch.exp(logp.detach().float() - old.float())
    assert loss.dtype == torch.float32 and logp.grad.dtype == torch.bfloat16
    close(metrics["ratio_mean"], exact.mean(), tol=1e-6)
    assert kl_penalty(logp, old, torch.ones(1, 2), beta=0.0).dtype == torch.float32


def test_all_masked_batch_gives_zero_loss_and_zero_grad():
    logp = torch.zeros(2, 3, dtype=D, requires_grad=True)
    for name in POLICY_LOSSES.names():
        loss, metrics = POLICY_LOSSES.get(name)(logp, torch.zeros(2, 3, dtype=D), torch.ones(2, 3, dtype=D),
                                                torch.zeros(2, 3))
        loss.backward()
        close(loss, 0.0)
        assert torch.equal(logp.grad, torch.zeros_like(logp)) and torch.isfinite(metrics["approx_kl"])


def test_kl_penalty_is_added_per_token_before_aggregation():
    # penalty 0.1 on every valid token raises each sequence mean, so the grpo loss, by 0.1
    logp, old, adv = _inputs()
    penalty = torch.full((2, 3), 0.1, dtype=D)
    loss, metrics = grpo_loss(logp, old, adv, MASK, kl_penalty=penalty)
    close(loss, -0.925 + 0.1)
    close(metrics["kl_penalty"], 0.1)


# ---------------------------------------------------------------------------- kl and entropy

def test_k1_and_k3_hand_computed():
    # logp = ln 0.5, ref = ln 0.25
    #   k1 = ln 0.5 - ln 0.25 = ln 2
    #   k3: d = ref - logp = ln 0.5, exp(d) - d - 1 = 0.5 + ln 2 - 1 = ln 2 - 0.5
    logp, ref = t([math.log(0.5), -1.0]), t([math.log(0.25), -1.0])
    close(kl_k1(logp, ref), [math.log(2), 0.0])
    close(kl_k3(logp, ref), [math.log(2) - 0.5, 0.0])
    # k1 can be negative, k3 never is
    close(kl_k1(ref[:1], logp[:1]), [-math.log(2)])
    assert (kl_k3(torch.randn(50, dtype=D), torch.randn(50, dtype=D)) >= 0).all()


def test_kl_penalty_beta_and_mask():
    logp = t([[math.log(0.5), math.log(0.5)]])
    ref = t([[math.log(0.25), math.nan]])  # padding holds nan
    mask = t([[1, 0]])
    close(kl_penalty(logp, ref, mask, beta=0.1), [[0.1 * (math.log(2) - 0.5), 0.0]])
    close(kl_penalty(logp, ref, mask, beta=0.1, estimator="k1"), [[0.1 * math.log(2), 0.0]])
    # beta == 0: zeros, and the reference model can be skipped
    assert not uses_reference(0.0) and uses_reference(0.04)
    assert torch.equal(kl_penalty(logp, None, mask, beta=0.0), torch.zeros_like(logp))
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        kl_penalty(logp, None, mask, beta=0.1)
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(logp, None, mask, beta=0.0, estimator="k2")


def test_kl_penalty_gradient_is_finite():
    logp = t([[-0.5, -1.0, 5.0]]).requires_grad_()
    kl_penalty(logp, t([[-1.0, -1.0, math.nan]]), t([[1, 1, 0]]), beta=0.1).sum().backward()
    # d k3 / d logp = 1 - exp(ref - logp): at t0 1 - exp(-0.5), at t1 0, padding 0
    close(logp.grad, [[0.1 * (1 - math.exp(-0.5)), 0.0, 0.0]])


def test_entropy_from_logits():
    # uniform over 4 -> ln 4; logits (0, ln 3) -> p = (0.25, 0.75),
    # H = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.25 ln 4 + 0.75 ln(4/3)
    logits = t([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3), -math.inf, -math.inf], [math.nan] * 4]])
    logits[0, 1, 2:] = -1e9  # effectively absent tokens
    logits.requires_grad_()
    entropy = entropy_from_logits(logits, t([[1, 1, 0]]))
    close(entropy, [[math.log(4), 0.25 * math.log(4) + 0.75 * math.log(4 / 3), 0.0]])
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.equal(logits.grad[0, 2], torch.zeros(4, dtype=D))
    close(entropy_from_logits(torch.zeros(2, 3, 5)), torch.full((2, 3), math.log(5)), tol=1e-6)


# ---------------------------------------------------------------------------- value loss

def test_value_loss_clipping():
    # clip 0.2, returns R:
    #   t0: V 1.0, old 0.5 -> V_clip 0.7; max((1 - 1.5)^2, (0.7 - 1.5)^2) = max(0.25, 0.64) = 0.64  clipped
    #   t1: V 2.0, old 2.1 -> inside the range, V_clip = V: (2 - 1)^2 = 1
    #   t2: V 1.0, old 0.0 -> V_clip 0.2; max((1 - 0.5)^2, (0.2 - 0.5)^2) = max(0.25, 0.09) = 0.25
    #   t3: padding
    # loss = 0.5 * (0.64 + 1 + 0.25) / 3 = 0.315; clip fraction 1/3
    values = t([[1.0, 2.0, 1.0, math.nan]]).requires_grad_()
    old, returns = t([[0.5, 2.1, 0.0, 3.0]]), t([[1.5, 1.0, 0.5, math.inf]])
    mask = t([[1, 1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, value_clip=0.2)
    close(loss, 0.315)
    close(metrics["value_clip_fraction"], 1 / 3)
    close(metrics["value_mean"], 4 / 3)
    loss.backward()
    # d/dV of 0.5 * mean: t0 clipped (flat) -> 0; t1 (2 - 1) / 3; t2 (1 - 0.5) / 3; padding 0
    close(values.grad, [[0.0, 1 / 3, 0.5 / 3, 0.0]])
    # unclipped: 0.5 * (0.25 + 1 + 0.25) / 3 = 0.25
    close(value_loss(values, old, returns, mask, value_clip=None)[0], 0.25)


# ---------------------------------------------------------------------------- registries

def test_registries_hold_the_documented_names():
    assert ADVANTAGE_ESTIMATORS.names() == ("dr_grpo", "gae", "grpo", "grpo_process", "rloo")
    assert POLICY_LOSSES.names() == ("dapo", "dr_grpo", "grpo")
    assert KL_ESTIMATORS.names() == ("k1", "k3")
    assert ADVANTAGE_ESTIMATORS.get("rloo") is rloo_advantages and "grpo" in POLICY_LOSSES


def test_registry_rejects_duplicates_and_lists_choices_for_unknown_names():
    things: Registry = Registry("thing")
    things.register("a")(len)
    with pytest.raises(ValueError, match="thing 'a' is already registered"):
        things.register("a")(abs)
    assert things.get("a") is len  # the first registration stands
    with pytest.raises(ValueError, match="already registered"):
        POLICY_LOSSES.register("grpo")(dapo_loss)
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'; choose one of: "
                                         r"dr_grpo, gae, grpo, grpo_process, rloo"):
        ADVANTAGE_ESTIMATORS.get("ppo")
    with pytest.raises(ValueError, match="unknown policy loss 'gspo'; choose one of: dapo, dr_grpo, grpo"):
        POLICY_LOSSES.get("gspo")


# --- rollout correction (rl.rolloutCorrection) -------------------------------------------------------

def test_rollout_correction_weights_hand_computed():
    from posttrain.jobs.rl.math.algos import rollout_correction_weights

    # rho = exp(old - rollout) per token: 2, 0.5, 4 on the first row; 1 on the second; padding last
    old = torch.tensor([[math.log(2.0), math.log(0.5), math.log(4.0)], [0.0, -1.0, 9.0]], dtype=D)
    rollout = torch.zeros_like(old)
    rollout[1, 1] = -1.0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    tis, m = rollout_correction_weights(old, rollout, mask, mode="tis", cap=3.0)
    torch.testing.assert_close(tis, torch.tensor([[2.0, 0.5, 3.0], [1.0, 1.0, 0.0]], dtype=D))
    assert m["rollout_corrected_fraction"].item() == pytest.approx(1 / 5)  # the 4 of five valid tokens
    assert m["rollout_ratio_mean"].item() == pytest.approx((2 + 0.5 + 4 + 1 + 1) / 5)
    assert m["rollout_logprob_gap"].item() == pytest.approx((2 * math.log(2) + math.log(4)) / 5)
    mis, _ = rollout_correction_weights(old, rollout, mask, mode="mis", cap=3.0)
    torch.testing.assert_close(mis, torch.tensor([[2.0, 0.5, 0.0], [1.0, 1.0, 0.0]], dtype=D))
    with pytest.raises(ValueError, match="tis or mis"):
        rollout_correction_weights(old, rollout, mask, mode="none", cap=3.0)


def test_token_weights_scale_each_tokens_loss():
    # on-policy (ratio 1): per-token loss -A * w; grpo's per-sequence mean of it
    logp = torch.zeros((2, 2), dtype=D, requires_grad=True)
    adv = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], dtype=D)
    mask = torch.ones((2, 2))
    w = torch.tensor([[2.0, 0.0], [0.5, 1.0]], dtype=D)
    loss, _ = POLICY_LOSSES.get("grpo")(logp, logp.detach(), adv, mask, token_weights=w)
    # sequence 0: mean(-2, 0) = -1; sequence 1: mean(0.5, 1) = 0.75; batch mean -0.125
    assert loss.item() == pytest.approx(-0.125)
    plain, _ = POLICY_LOSSES.get("grpo")(logp, logp.detach(), adv, mask)
    assert plain.item() == pytest.approx(0.0)
    for name in ("dr_grpo", "dapo"):  # every loss takes them
        weighted, _ = POLICY_LOSSES.get(name)(logp, logp.detach(), adv, mask, token_weights=torch.zeros_like(w))
        assert weighted.item() == 0.0


def test_pad_batch_carries_the_engines_logprobs_only_when_every_sample_has_them():
    from posttrain.jobs.rl.batch import pad_batch
    from posttrain.jobs.rl.engines import Generation

    gens = [Generation(prompt_token_ids=[5, 6], token_ids=[[7], [8, 9]], logprobs=[[-0.5], [-1.0, -2.0]],
                       texts=["a", "b"])]
    batch, generated = pad_batch(gens, pad_id=0)
    assert generated == 3
    torch.testing.assert_close(batch["rollout_logprobs"],
                               torch.tensor([[0.0, 0.0, -0.5, 0.0], [0.0, 0.0, -1.0, -2.0]]))
    gens[0].logprobs = []  # an engine asked for none
    assert "rollout_logprobs" not in pad_batch(gens, pad_id=0)[0]
