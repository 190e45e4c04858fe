"""Learner micro-batches (`posttrain.jobs.rl.micro`): rows binned by a token budget and cut to their own
longest row give the loss and gradients of the whole padded batch, for every policy loss.

    .venv/bin/python -m pytest tests/test_rl_micro.py -q
"""

from __future__ import annotations

import pytest

import tiny

torch = pytest.importorskip("torch")

from posttrain.jobs.rl.math.algos import POLICY_LOSSES  # noqa: E402
from posttrain.jobs.rl.micro import COLUMNS, loss_shares, micro_batches, scatter  # noqa: E402
from posttrain.jobs.rl.workers.learner import forward  # noqa: E402

# (prompt, completion) lengths: very uneven, as a step's completions are; the widest row sets the padding
SHAPES = [(4, 20), (3, 2), (5, 1), (2, 9), (6, 3), (3, 0), (4, 14), (2, 5)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    path = tiny.make_model(tmp_path_factory.mktemp("tiny-micro"), hidden=32)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@pytest.fixture(scope="module")
def batch():
    """Right-padded rows (one with an empty completion), advantages and old logprobs on the completion."""
    g = torch.Generator().manual_seed(0)
    width = max(p + c for p, c in SHAPES)
    ids = torch.zeros((len(SHAPES), width), dtype=torch.long)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(SHAPES):
        ids[i, :p + c] = torch.randint(5, 60, (p + c,), generator=g)
        att[i, :p + c] = 1
        comp[i, p:p + c] = 1
    adv = torch.where(comp.bool(), torch.randn(len(SHAPES), 1, generator=g, dtype=torch.float64), 0.0)
    old = torch.where(comp.bool(), -3 + 0.3 * torch.randn(ids.shape, generator=g, dtype=torch.float64), 0.0)
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp, "advantages": adv,
            "old_logprobs": old}


def step(model, parts, loss_name):
    """The learner's accumulation: sum of share-weighted micro-batch losses; (loss, gradients)."""
    loss_fn = POLICY_LOSSES.get(loss_name)
    model.zero_grad(set_to_none=True)
    total = torch.zeros((), dtype=torch.float64)
    for mb, weight in zip(parts, loss_shares(parts, loss_fn.normaliser)):
        logp, _ = forward(model, mb)
        loss, _ = loss_fn(logp, mb["old_logprobs"], mb["advantages"], mb["completion_mask"], clip_low=0.2,
                          clip_high=0.28, max_length=24)
        (loss * weight).backward()
        total += loss.detach() * weight
    return total, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("loss_name", ["grpo", "dr_grpo", "dapo"])
def test_binned_and_trimmed_match_the_padded_batch(model, batch, loss_name):
    whole, whole_grads = step(model, micro_batches(batch), loss_name)  # one micro-batch, padded to the widest
    for parts in (micro_batches(batch, rows=1), micro_batches(batch, rows=3), micro_batches(batch, tokens=40)):
        loss, grads = step(model, parts, loss_name)
        torch.testing.assert_close(loss, whole, rtol=1e-10, atol=1e-12)
        for got, want in zip(grads, whole_grads):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert float(whole) != 0.0  # the comparison is over a real loss


def test_token_budget_bins_sorted_rows_and_cuts_their_width(batch):
    parts = micro_batches(batch, tokens=40)
    lengths = [p + c for p, c in SHAPES]
    seen = sorted(int(i) for mb in parts for i in mb["row_index"])
    assert seen == list(range(len(SHAPES)))  # every row once
    for mb in parts:
        rows, width = mb["input_ids"].shape
        assert width == max(lengths[int(i)] for i in mb["row_index"])  # cut to its own longest row
        assert rows * width <= 40 or rows == 1
        assert int(mb[COLUMNS][1]) == width
    assert len(parts) < len(SHAPES)  # short rows share a micro-batch
    # 8 rows padded to 24 columns are 192 token slots; the bins run far fewer
    assert sum(mb["input_ids"].numel() for mb in parts) < 0.6 * batch["input_ids"].numel()


def test_scatter_puts_logprobs_back_in_place(model, batch):
    with torch.no_grad():
        whole, _ = forward(model, batch)
        parts = micro_batches(batch, tokens=30)
        back = scatter(parts, [forward(model, mb)[0] for mb in parts], like=batch["input_ids"])
    torch.testing.assert_close(back, whole, rtol=1e-10, atol=1e-12)


def test_left_padding_is_cut_too(model, batch):
    """Rows padded on the left (as the engines' prompts can be): positions count attended tokens only."""
    left = {k: torch.stack([torch.roll(row, int((1 - m).sum())) for row, m in zip(v, batch["attention_mask"])])
            for k, v in batch.items()}
    with torch.no_grad():
        whole, _ = forward(model, left)
        parts = micro_batches(left, rows=2)
        back = scatter(parts, [forward(model, mb)[0] for mb in parts], like=left["input_ids"])
    torch.testing.assert_close(back, whole, rtol=1e-9, atol=1e-11)
