"""The divergences of `algorithm: distill`, per token, over the teacher's top-k tokens and one tail bucket.

    student_logp, teacher_logp = buckets(student_logits, teacher_ids, teacher_topk_logp, temperature=2.0)
    per_token = divergence(student_logp, teacher_logp, loss="jsd", beta=0.5)      # one value per position
    parts = distill_loss(student_logits, labels, teacher_ids, teacher_topk_logp, loss="forward_kl", ...)

The teacher's distribution at a position is cached as its k most likely tokens (log-probabilities at the job's
temperature) plus the mass of everything else; the student's distribution is put into the same k + 1 buckets
(its probabilities of those k tokens, and the rest). With k = vocabulary size the tail is empty and these are
the exact divergences over the vocabulary.

Definitions (`p` the teacher, `q` the student, both over the buckets; names as in TRL's GKD):

- forward_kl: KL(p || q) = sum p (log p - log q)
- reverse_kl: KL(q || p)
- jsd (generalized, beta in [0, 1]): with the mixture m = beta p + (1 - beta) q,
  beta KL(p || m) + (1 - beta) KL(q || m); beta 0 is taken as forward_kl and beta 1 as reverse_kl, the way
  TRL's `GKDTrainer.generalized_jsd_loss` defines its endpoints.

Positions are the model's logits positions: position t predicts token t + 1, so the labels are shifted by one
and positions whose next label is -100 (prompt, padding) are not scored. The loss is
(1 - alpha) x mean divergence + alpha x mean cross-entropy of the labels (at temperature 1), both averaged
over the scored tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100
LOSSES = ("forward_kl", "reverse_kl", "jsd")


# The smallest tail mass: an empty tail is log(1e-30) rather than -inf, whose gradient is NaN through log and 0 x inf.
MIN_MASS = 1e-30


def tail_log_mass(topk_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(topk_logp)) over the last dimension: the log-probability of every other token."""
    covered = torch.logsumexp(topk_logp, dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(covered)).clamp(min=MIN_MASS))  # log(1 - e^x) = log(-expm1(x))


def with_tail(topk_logp: torch.Tensor) -> torch.Tensor:
    """[..., k] top-k log-probabilities -> [..., k + 1] with the tail bucket last."""
    return torch.cat([topk_logp, tail_log_mass(topk_logp).unsqueeze(-1)], dim=-1)


def teacher_topk(logits: torch.Tensor, k: int, *, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the teacher cache holds per position: the ids [..., k] and log-probabilities [..., k] of the k most
    likely tokens of softmax(logits / temperature) (k is capped at the vocabulary size)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return ids, values


def buckets(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_topk_logp: torch.Tensor, *,
            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher) log-probabilities over the k + 1 buckets, [N, k + 1] each, from the student's logits
    [N, V], the teacher's top-k token ids [N, k] and its top-k log-probabilities at `temperature` [N, k]."""
    student_full = F.log_softmax(student_logits.float() / temperature, dim=-1)
    student_topk = student_full.gather(-1, teacher_ids.long())
    return with_tail(student_topk), with_tail(teacher_topk_logp.float())


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row (both finite: see MIN_MASS)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(student_logp: torch.Tensor, teacher_logp: torch.Tensor, *, loss: str, beta: float = 0.5) -> torch.Tensor:
    """The per-row divergence between two distributions given as log-probabilities over the same buckets."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return _kl(teacher_logp, student_logp)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return _kl(student_logp, teacher_logp)
    if loss != "jsd":
        raise ValueError(f"spec.distill.loss: unknown loss {loss!r}; use one of {', '.join(LOSSES)}")
    mixture = torch.logsumexp(torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)]), dim=0)
    return beta * _kl(teacher_logp, mixture) + (1 - beta) * _kl(student_logp, mixture)


def scored_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] labels -> [B, L] bool: the logits positions whose next token is trained (the last position never)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


@dataclass
class LossParts:
    loss: torch.Tensor  # what is minimised: (1 - alpha) x divergence + alpha x ce
    divergence: torch.Tensor  # mean per-token divergence at the job's temperature
    ce: torch.Tensor  # mean per-token cross-entropy of the labels at temperature 1
    teacher_kl: torch.Tensor  # mean per-token KL(teacher || student) over the buckets (the eval metric)
    tokens: int


def distill_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor,
                 teacher_topk_logp: torch.Tensor, *, loss: str, beta: float, temperature: float, alpha: float,
                 num_items: int | torch.Tensor | None = None) -> LossParts:
    """The loss of one batch: logits [B, L, V], labels [B, L], and the teacher's top-k of the scored positions in
    order (row-major over the batch), [N, k] each with N = scored_positions(labels).sum(). `num_items` divides the
    sums instead of N (the tokens of all gradient-accumulation micro-batches, as the Trainer passes them)."""
    mask = scored_positions(labels)
    n = int(mask.sum())
    if teacher_ids.shape[0] != n:
        raise ValueError(f"the teacher cache has {teacher_ids.shape[0]} positions for this batch, the data {n}: "
                         "the cache does not belong to this data (delete it to rescore)")
    rows = student_logits[mask]  # [N, V]
    targets = labels[:, 1:][mask[:, :-1]]
    s_logp, t_logp = buckets(rows, teacher_ids, teacher_topk_logp, temperature=temperature)
    per_token = divergence(s_logp, t_logp, loss=loss, beta=beta)
    ce = F.cross_entropy(rows.float(), targets, reduction="none")
    denominator = torch.as_tensor(num_items if num_items is not None else n, dtype=torch.float32,
                                  device=rows.device).clamp(min=1)
    div_mean, ce_mean = per_token.sum() / denominator, ce.sum() / denominator
    with torch.no_grad():
        teacher_kl = (per_token if loss == "forward_kl" else _kl(t_logp, s_logp)).sum() / max(n, 1)
    return LossParts((1 - alpha) * div_mean + alpha * ce_mean, div_mean, ce_mean, teacher_kl, n)
