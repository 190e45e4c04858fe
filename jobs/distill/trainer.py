"""The student's trainer in `distill.mode: logits`: TRL's SFTTrainer with the loss against the cached teacher.

    trainer = DistillTrainer(model=net, args=DistillConfig(..., distill_loss="jsd", distill_beta=0.5, ...),
                             train_dataset=rows_with_teacher_columns, ...)

It runs on the SFT worker path (`algorithms.methods.METHODS["distill"]`): the data rows are SFT's
(input_ids, labels) plus the teacher's top-k of every trained position (`teacher_ids`, `teacher_logp`, [n, k]
per row, from `cache`). The collator pads like SFT's and stacks the teacher rows in batch order; `compute_loss`
is `divergence.distill_loss`. Logged per step: loss, distill_loss (the divergence), ce; at evaluation also
teacher_kl, the token-level KL(teacher || student) on the eval split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from posttrain.jobs.distill.divergence import distill_loss

TEACHER_COLUMNS = ("teacher_ids", "teacher_logp")


@dataclass
class DistillConfig(SFTConfig):
    distill_loss: str = field(default="forward_kl", metadata={"help": "forward_kl, reverse_kl or jsd"})
    distill_beta: float = field(default=0.5, metadata={"help": "jsd's mixture weight"})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of both models"})
    distill_alpha: float = field(default=0.0, metadata={"help": "weight of the plain cross-entropy"})


class TeacherCollator:
    """SFT's collator for input_ids/labels, and the rows' teacher top-k stacked in batch order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        teacher = [{name: ex.pop(name) for name in TEACHER_COLUMNS} for ex in (dict(e) for e in examples)]
        batch = self.inner([{k: v for k, v in e.items() if k not in TEACHER_COLUMNS} for e in examples])
        batch["teacher_ids"] = torch.cat([torch.as_tensor(t["teacher_ids"], dtype=torch.long).reshape(
            len(t["teacher_ids"]), -1) for t in teacher])
        batch["teacher_logp"] = torch.cat([torch.as_tensor(t["teacher_logp"], dtype=torch.float32).reshape(
            len(t["teacher_logp"]), -1) for t in teacher])
        return batch


class DistillTrainer(SFTTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_collator = TeacherCollator(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", *TEACHER_COLUMNS]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        teacher_ids, teacher_logp = inputs.pop("teacher_ids"), inputs.pop("teacher_logp")
        labels = inputs["labels"]
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"), use_cache=False)
        args = self.args
        parts = distill_loss(outputs.logits, labels, teacher_ids, teacher_logp, loss=args.distill_loss,
                             beta=args.distill_beta, temperature=args.distill_temperature, alpha=args.distill_alpha,
                             num_items=num_items_in_batch)
        loss = parts.loss
        if args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # like Trainer: num_items counts every rank's tokens
        # per-token means of this micro-batch for the logs (the loss itself may be divided by all ranks' tokens)
        scale = (float(num_items_in_batch) / max(parts.tokens, 1)) if num_items_in_batch is not None else 1.0
        self._metrics[mode]["distill_loss"].append(parts.divergence.item() * scale)
        self._metrics[mode]["ce"].append(parts.ce.item() * scale)
        if mode == "eval":
            self._metrics[mode]["teacher_kl"].append(parts.teacher_kl.item())
        return (loss, outputs) if return_outputs else loss
