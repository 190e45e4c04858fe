"""`distill.mode: on_policy` (GKD): the student learns the teacher's distributions on the student's own samples.

    posttrain run examples/distill-on-policy.yaml --output out/

It runs on the GRPO/PPO single controller (`rl.loop`), declared as `rl.methods.METHODS["distill"]`: the
student is the policy on the learner actors (FSDP2, full or LoRA, `model.keepLayers` honoured), rollout
actors sample `rl.groupSize` completions per prompt and get the student's weights after every step (the
same weight sync as GRPO), and instead of reward actors the teacher actors (roles.teacher,
`distill.teacher.TeacherWorker`) score the sampled prompt + completion tokens. Each step:

    rows = teacher_rows(batch)                               # (input_ids, labels): labels are the completion
    scores = teacher actors' TeacherWorker.score(rows, k=topK, temperature=distill.temperature)
    batch.update(teacher_columns(scores, batch))             # teacher_ids / teacher_logp, [B, L, k]
    DistillLearnerWorker.train_step(batch)                   # minimises distill.loss over the completions

The loss is `divergence.distill_loss`, the function the logits mode trains with (alpha 0: the samples have no
reference completion), over the logits positions that predict a sampled token. Unlike TRL's GKDTrainer,
which samples with the student inside the trainer process (`generate` on the training model, `lmbda` of the
batches), the samples come from the rollout engines, every batch on-policy; the divergences are TRL's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from posttrain.api.distill import DistillSpec
from posttrain.jobs.distill.divergence import IGNORE, distill_loss, scored_positions
from posttrain.jobs.rl.math.kl import entropy_from_logits
from posttrain.jobs.rl.math.masked import masked_mean
from posttrain.jobs.rl.workers.learner import LearnerWorker, forward

METRICS = ("loss", "distill_loss", "teacher_kl", "entropy")


def completion_labels(input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """[B, L] labels of a learner batch: the sampled tokens, IGNORE on the prompt and the padding."""
    return torch.where(completion_mask.bool(), input_ids, IGNORE)


def teacher_rows(batch: dict[str, Tensor]) -> list[tuple[list[int], list[int]]]:
    """The batch's rows as the teacher scores them: (input_ids, labels) without the right padding."""
    labels = completion_labels(batch["input_ids"], batch["completion_mask"])
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [(ids[:n].tolist(), row[:n].tolist()) for ids, row, n in zip(batch["input_ids"], labels, lengths)]


def teacher_columns(scores: list[tuple[np.ndarray, np.ndarray]], batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The teacher's per-row scores ([n, k] ids and log-probabilities, n scored positions a row) placed on the
    batch's logits positions: `teacher_ids` long and `teacher_logp` float32, [B, L, k], zero where nothing is
    scored (so a learner's rows and micro-batches carry their own teacher rows)."""
    mask = scored_positions(completion_labels(batch["input_ids"], batch["completion_mask"]))
    k = scores[0][0].shape[1] if scores else 1
    ids = torch.zeros((*mask.shape, k), dtype=torch.long)
    logp = torch.zeros((*mask.shape, k), dtype=torch.float32)
    expected = mask.sum(-1).tolist()
    for b, ((row_ids, row_logp), n) in enumerate(zip(scores, expected)):
        if len(row_ids) != n:
            raise ValueError(f"the teacher scored {len(row_ids)} positions of sample {b}, which has {n} sampled tokens")
        ids[b][mask[b]] = torch.tensor(np.asarray(row_ids), dtype=torch.long)  # a copy: Ray hands back read-only arrays
        logp[b][mask[b]] = torch.tensor(np.asarray(row_logp), dtype=torch.float32)
    return {"teacher_ids": ids, "teacher_logp": logp}


def on_policy_loss(logits: Tensor, mb: dict[str, Tensor], settings: DistillSpec) -> tuple[Tensor, Tensor]:
    """(the loss, its metrics [loss, distill_loss, teacher_kl, entropy]) of one micro-batch: `divergence.distill_loss`
    of the student's logits [B, L, V] against the teacher's top-k on the positions that predict a sampled token
    (`mb`: input_ids, completion_mask [B, L], teacher_ids / teacher_logp [B, L, k])."""
    labels = completion_labels(mb["input_ids"], mb["completion_mask"])
    mask = scored_positions(labels)
    parts = distill_loss(logits, labels, mb["teacher_ids"][mask], mb["teacher_logp"][mask], loss=settings.loss,
                         beta=settings.beta, temperature=settings.temperature, alpha=0.0)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.detach(), mask), mask)
        stats = torch.stack([v.double().cpu() for v in (parts.loss.detach(), parts.divergence.detach(),
                                                        parts.teacher_kl, entropy)])
    return parts.loss, stats


class DistillLearnerWorker(LearnerWorker):
    """A learner rank whose step minimises `spec.distill.loss` to the teacher's scores in the batch."""

    def setup(self, job: Any, **kwargs: Any) -> dict[str, Any]:
        self.distill = job.spec.distill or DistillSpec()
        return super().setup(job, **kwargs)

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """`rl.ppoEpochs` optimizer steps over the batch (input_ids, attention_mask, completion_mask,
        teacher_ids, teacher_logp). Returns loss, distill_loss (the divergence), teacher_kl (KL(teacher ||
        student)), entropy, grad_norm, lr: per-token means, averaged over micro-batches, ranks and epochs."""
        shard, _ = self._shard(batch)

        def loss_of(mb: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            return on_policy_loss(forward(self.model, mb)[1], mb, self.distill)

        means, grad_norm = self.fit(self._micro(shard), loss_of)
        totals = dict(zip(METRICS, means))
        totals["grad_norm"] = grad_norm
        totals["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()
        return totals
