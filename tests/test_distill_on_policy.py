"""`distill.mode: on_policy`'s learner loss and teacher batch, without Ray: the loss is `divergence.distill_loss` on
the positions that predict a sampled token, the teacher's scores land on those positions, and only the student's
logits get a gradient.

    .venv/bin/python -m pytest -q tests/test_distill_on_policy.py
"""

from __future__ import annotations

import pytest
import torch

from posttrain.api.distill import DistillSpec
from posttrain.jobs.distill.divergence import IGNORE, distill_loss, teacher_topk
from posttrain.jobs.distill.on_policy import on_policy_loss, teacher_columns, teacher_rows
from posttrain.jobs.rl.methods import METHODS

V, K = 11, 4


def hand_batch() -> dict[str, torch.Tensor]:
    """Two samples, right-padded: prompt [5, 6] + completion [7, 8, 9]; prompt [1, 2, 3] + completion [4]."""
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    return {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
            "completion_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 0]])}


def score_like_the_teacher(rows, logits: torch.Tensor):
    """What `TeacherWorker.score` returns for `rows`, with `logits` [B, L, V] standing in for its model."""
    out = []
    for b, (ids, labels) in enumerate(rows):
        positions = [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]
        top_ids, top_logp = teacher_topk(logits[b, positions], K, temperature=2.0)
        out.append((top_ids.to(torch.int32).numpy(), top_logp.numpy()))
    return out


def test_teacher_rows_are_the_samples_with_the_completion_as_labels():
    assert teacher_rows(hand_batch()) == [([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9]),
                                          ([1, 2, 3, 4], [IGNORE, IGNORE, IGNORE, 4])]


def test_teacher_scores_sit_on_the_positions_that_predict_sampled_tokens():
    batch = hand_batch()
    teacher = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(0))
    cols = teacher_columns(score_like_the_teacher(teacher_rows(batch), teacher), batch)
    assert cols["teacher_ids"].shape == (2, 5, K) and cols["teacher_ids"].dtype == torch.long
    scored = [(0, 1), (0, 2), (0, 3), (1, 2)]  # position t predicts token t + 1
    for b in range(2):
        for t in range(5):
            if (b, t) in scored:
                ids, logp = teacher_topk(teacher[b, t], K, temperature=2.0)
                assert cols["teacher_ids"][b, t].tolist() == ids.tolist()
                assert torch.allclose(cols["teacher_logp"][b, t], logp)
            else:
                assert not cols["teacher_logp"][b, t].any()
    with pytest.raises(ValueError, match="the teacher scored 2 positions of sample 1, which has 1 sampled tokens"):
        bad = score_like_the_teacher(teacher_rows(batch), teacher)
        teacher_columns([bad[0], (bad[0][0][:2], bad[0][1][:2])], batch)


@pytest.mark.parametrize("loss,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_the_loss_is_distill_loss_and_only_the_student_gets_a_gradient(loss, beta):
    batch = hand_batch()
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(2, 5, V, generator=g) * 3
    batch.update(teacher_columns(score_like_the_teacher(teacher_rows(batch), teacher), batch))
    settings = DistillSpec(mode="on_policy", loss=loss, beta=beta, temperature=2.0, top_k=K)
    student = torch.randn(2, 5, V, generator=g).requires_grad_(True)
    value, stats = on_policy_loss(student, batch, settings)

    # the same tensors through the logits mode's function: labels are the completion, the teacher's rows flat
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, 9], [IGNORE, IGNORE, IGNORE, 4, IGNORE]])
    flat = [(0, 1), (0, 2), (0, 3), (1, 2)]
    ids = torch.stack([batch["teacher_ids"][b, t] for b, t in flat])
    logp = torch.stack([batch["teacher_logp"][b, t] for b, t in flat])
    expected = distill_loss(student.detach(), labels, ids, logp, loss=loss, beta=beta, temperature=2.0, alpha=0.0)
    assert value.item() == pytest.approx(expected.loss.item(), rel=1e-6) and value.item() > 0
    assert stats.tolist()[:3] == pytest.approx([expected.loss.item(), expected.divergence.item(),
                                                expected.teacher_kl.item()], rel=1e-6)

    value.backward()
    touched = {(b, t) for b in range(2) for t in range(5) if student.grad[b, t].abs().sum() > 0}
    assert touched == set(flat)  # prompt, padding and the last position get no gradient
    assert not batch["teacher_logp"].requires_grad and batch["teacher_logp"].grad is None  # the teacher is data


def test_a_padding_rank_row_contributes_nothing():
    """`ShardedWorker._shard` pads a batch with copies of row 0 whose masks are 0: their loss is 0, finite."""
    batch = hand_batch()
    teacher = torch.randn(2, 5, V, generator=torch.Generator().manual_seed(2))
    batch.update(teacher_columns(score_like_the_teacher(teacher_rows(batch), teacher), batch))
    empty = {k: v[:1].clone() for k, v in batch.items()}
    empty["completion_mask"].zero_()
    value, stats = on_policy_loss(torch.zeros(1, 5, V, requires_grad=True), empty, DistillSpec(mode="on_policy"))
    assert value.item() == 0.0 and torch.isfinite(stats).all()


def test_the_method_declares_a_teacher_and_its_learner():
    method = METHODS.get("distill")
    assert method.teacher and not method.critic
    assert method.learner_class().__name__ == "DistillLearnerWorker"
    assert not METHODS.get("grpo").teacher and METHODS.get("grpo").learner_class().__name__ == "LearnerWorker"


def test_the_learner_steps_towards_the_teacher_on_a_scored_batch(tmp_path):
    """`DistillLearnerWorker.train_step` in this process (one rank, gloo): the step runs (it once called a
    LearnerWorker method the micro-batching rework had removed) and a second step on the same batch has a
    lower loss than the first."""
    import json

    import tiny
    from support import jobs

    from posttrain.api.load import parse_job
    from posttrain.jobs.distill.on_policy import DistillLearnerWorker
    from posttrain.jobs.rl.workers.sharded import free_port

    model = tiny.make_model(tmp_path / "student", layers=2)
    job = parse_job(jobs.document(
        "distill", model={"source": str(model)}, teacher={"source": str(model)}, adapter=jobs.FULL,
        distill={"mode": "on_policy", "loss": "jsd", "topK": K}, rl={"groupSize": 2, "promptsPerStep": 1,
                                                                        "maxNewTokens": 4},
        roles={"rollout": {"engine": "transformers"}},
        training={"maxSteps": 2, "learningRate": 1e-2, "lrScheduler": "constant", "maxSeqLength": 64}))
    batch = hand_batch()
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    teacher = torch.randn(2, 5, vocab, generator=torch.Generator().manual_seed(3)) * 4
    batch.update(teacher_columns(score_like_the_teacher(teacher_rows(batch), teacher), batch))
    worker = DistillLearnerWorker()
    worker.setup(job, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), threads=None)
    try:
        first, second = worker.train_step(dict(batch)), worker.train_step(dict(batch))
    finally:
        worker.shutdown()
    assert first["grad_norm"] > 0 and first["loss"] > 0, first
    assert second["loss"] < first["loss"], (first, second)
