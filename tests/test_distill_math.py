"""The distillation divergences on a 3-token vocabulary, against values worked out by hand.

    .venv/bin/python -m pytest -q tests/test_distill_math.py

Teacher p = [1/2, 1/4, 1/4] (logits [ln 4, 0, 0] at temperature 2, or [ln 2, 0, 0] at 1), student q uniform
(logits [0, 0, 0] at any temperature):
    KL(p || q) = 1/2 ln(3/2) + 1/2 ln(3/4)
    KL(q || p) = 1/3 ln(2/3) + 2/3 ln(4/3)
    JSD(beta = 1/2), m = [5/12, 7/24, 7/24]:
        1/2 (1/2 ln(6/5) + 1/2 ln(6/7)) + 1/2 (1/3 ln(4/5) + 2/3 ln(8/7))
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.jobs.distill.divergence import (IGNORE, buckets, distill_loss, divergence, scored_positions,
                                               teacher_topk, with_tail)

FORWARD = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
REVERSE = math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3
JSD_HALF = 0.5 * (0.5 * math.log(6 / 5) + 0.5 * math.log(6 / 7)) + 0.5 * (math.log(4 / 5) / 3 + 2 * math.log(8 / 7) / 3)
TEACHER_T2 = torch.tensor([[math.log(4.0), 0.0, 0.0]])
STUDENT = torch.zeros(1, 3)


def pair(k: int = 3, temperature: float = 2.0):
    ids, logp = teacher_topk(TEACHER_T2, k, temperature=temperature)
    return buckets(STUDENT, ids, logp, temperature=temperature)


@pytest.mark.parametrize("loss,beta,expected", [
    ("forward_kl", 0.5, FORWARD), ("reverse_kl", 0.5, REVERSE), ("jsd", 0.5, JSD_HALF),
    ("jsd", 0.0, FORWARD), ("jsd", 1.0, REVERSE),  # TRL's endpoints: beta 0 forward KL, 1 reverse KL
])
def test_divergences_on_three_tokens(loss, beta, expected):
    s, t = pair()
    assert divergence(s, t, loss=loss, beta=beta).item() == pytest.approx(expected, rel=1e-5)


def test_generalized_jsd_with_another_beta():
    # beta 1/4: m = 1/4 p + 3/4 q = [3/8, 5/16, 5/16]
    expected = 0.25 * (0.5 * math.log(0.5 / (3 / 8)) + 0.5 * math.log(0.25 / (5 / 16))) \
        + 0.75 * (math.log((1 / 3) / (3 / 8)) / 3 + 2 * math.log((1 / 3) / (5 / 16)) / 3)
    s, t = pair()
    assert divergence(s, t, loss="jsd", beta=0.25).item() == pytest.approx(expected, rel=1e-5)


def test_temperature_scales_both_models():
    # at temperature 1 the same logits give p = [4/6, 1/6, 1/6]: KL(p || uniform) = sum p ln(3p)
    p = [4 / 6, 1 / 6, 1 / 6]
    expected = sum(pi * math.log(pi * 3) for pi in p)
    s, t = pair(temperature=1.0)
    assert divergence(s, t, loss="forward_kl").item() == pytest.approx(expected, rel=1e-5)
    s2, t2 = pair(temperature=2.0)
    assert divergence(s2, t2, loss="forward_kl").item() == pytest.approx(FORWARD, rel=1e-5)


def test_top_k_keeps_the_rest_as_one_tail_bucket():
    ids, logp = teacher_topk(TEACHER_T2, 1, temperature=2.0)
    assert ids.tolist() == [[0]] and logp.exp().tolist() == [[pytest.approx(0.5)]]
    assert with_tail(logp).exp().tolist() == [[pytest.approx(0.5), pytest.approx(0.5)]]
    s, t = buckets(STUDENT, ids, logp, temperature=2.0)
    assert s.exp().tolist() == [[pytest.approx(1 / 3), pytest.approx(2 / 3)]]
    # KL over buckets [1/2, 1/2] vs [1/3, 2/3]
    assert divergence(s, t, loss="forward_kl").item() == pytest.approx(0.5 * math.log(1.5) + 0.5 * math.log(0.75))
    # the full vocabulary as k: the tail is empty and nothing is NaN, values and gradients
    student = STUDENT.clone().requires_grad_()
    ids3, logp3 = teacher_topk(TEACHER_T2, 3, temperature=2.0)
    for loss in ("forward_kl", "reverse_kl", "jsd"):
        s3, t3 = buckets(student, ids3, logp3, temperature=2.0)
        divergence(s3, t3, loss=loss).backward()
        assert torch.isfinite(student.grad).all(), loss
        student.grad = None


def test_prompt_and_padding_are_masked_and_alpha_mixes_in_ce():
    # one sequence of 5 tokens: 2 prompt tokens, 2 completion tokens (labels 0 and 2), one pad
    labels = torch.tensor([[IGNORE, IGNORE, 0, 2, IGNORE]])
    assert scored_positions(labels).tolist() == [[False, True, True, False, False]]
    logits = torch.zeros(1, 5, 3)
    logits[0, 0] = logits[0, 3] = logits[0, 4] = torch.tensor([9.0, -9.0, 3.0])  # unscored: must not count
    teacher = torch.tensor([[math.log(4.0), 0.0, 0.0]] * 2)
    ids, logp = teacher_topk(teacher, 3, temperature=2.0)
    parts = distill_loss(logits, labels, ids, logp, loss="forward_kl", beta=0.5, temperature=2.0, alpha=0.25)
    assert parts.tokens == 2
    assert parts.divergence.item() == pytest.approx(FORWARD, rel=1e-5)
    assert parts.ce.item() == pytest.approx(math.log(3), rel=1e-6)  # uniform student, any label
    assert parts.loss.item() == pytest.approx(0.75 * FORWARD + 0.25 * math.log(3), rel=1e-5)
    assert parts.teacher_kl.item() == pytest.approx(FORWARD, rel=1e-5)
    halved = distill_loss(logits, labels, ids, logp, loss="forward_kl", beta=0.5, temperature=2.0, alpha=0.0,
                          num_items=4)  # a gradient-accumulation denominator
    assert halved.loss.item() == pytest.approx(FORWARD / 2, rel=1e-5)
    with pytest.raises(ValueError, match="the teacher cache has 1 positions for this batch, the data 2"):
        distill_loss(logits, labels, ids[:1], logp[:1], loss="jsd", beta=0.5, temperature=1.0, alpha=0.0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_same_values_as_trl_generalized_jsd_over_the_full_vocabulary(beta):
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 6, 11), torch.randn(2, 6, 11)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :2] = IGNORE
    labels[1, 4:] = IGNORE
    ids, logp = teacher_topk(teacher[scored_positions(labels)], 11, temperature=1.7)
    ours = distill_loss(student, labels, ids, logp, loss="jsd", beta=beta, temperature=1.7, alpha=0.0).loss
    # TRL scores the positions its (already shifted) labels mark
    shifted = torch.full_like(labels, IGNORE)
    shifted[:, :-1] = labels[:, 1:]
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=shifted, beta=beta, temperature=1.7)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4, abs=1e-6)
