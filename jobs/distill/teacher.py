"""The teacher of `algorithm: distill`: checked against the student before anything runs, then scoring the data
on its own actors (roles.teacher) into top-k log-probabilities.

    check_teacher(spec, student_tokenizer, base=ctx.base_dir)      # on the driver: loadable, same vocabulary
    scores = score_rows(spec, rows, base=ctx.base_dir)             # [(ids [n, k], logp [n, k]) per row]

Each teacher actor loads the teacher on its pod (`models.materialize`), runs it over its share of the rows
(input_ids, labels) and returns, for every position whose next token is trained, the k most likely tokens
and their log-probabilities at `distill.temperature` (`divergence.teacher_topk`). On a cluster the actors ask
for the teacher role's custom resource, so they land on that role's worker group (`rl.placement.role_actors`
and `actor_options`, as generate's and evaluate's actors).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from posttrain.api.distill import DistillSpec
from posttrain.api.spec import ModelSpec, PostTrainingJobSpec
from posttrain.jobs import models
from posttrain.jobs.rl.workers.base import ActorBase

FIELD = "spec.teacher.source"


class TeacherError(ValueError):
    """The teacher cannot be used; the message starts with spec.teacher.source."""


def _tokenizer_spec(model: ModelSpec) -> ModelSpec:
    return model.model_copy(update={"source": model.tokenizer}) if model.tokenizer else model


def check_teacher(spec: PostTrainingJobSpec, student_tokenizer: Any, *, base: Path | None) -> dict[str, Any]:
    """The teacher's tokenizer and config load, and its vocabulary is the student's (same size, same token ->
    id mapping, same embedding rows): else TeacherError naming spec.teacher.source. Returns what the summary
    records about the teacher."""
    from transformers import AutoConfig

    teacher = spec.teacher
    assert teacher is not None
    try:
        tok_path = models.materialize(_tokenizer_spec(teacher), base=base, weights=False, field=FIELD)
        tokenizer = models.load_tokenizer(tok_path, revision=models.hub_revision(teacher),
                                          trust_remote_code=teacher.trust_remote_code)
        config = AutoConfig.from_pretrained(models.config_folder(teacher, base=base, field=FIELD),
                                            revision=models.hub_revision(teacher),
                                            trust_remote_code=teacher.trust_remote_code)
        student_config = AutoConfig.from_pretrained(models.config_folder(spec.model, base=base),
                                                    revision=models.hub_revision(spec.model),
                                                    trust_remote_code=spec.model.trust_remote_code)
    except models.ModelSourceError as exc:
        if str(exc).startswith(FIELD):
            raise TeacherError(str(exc)) from None
        raise
    except (OSError, ValueError) as exc:
        raise TeacherError(f"{FIELD}: the teacher {teacher.source} cannot be loaded ({exc})") from None
    mine, theirs = student_tokenizer.get_vocab(), tokenizer.get_vocab()
    if mine != theirs:
        differing = next((t for t in sorted(theirs) if mine.get(t) != theirs[t]), None) or \
            next(t for t in sorted(mine) if t not in theirs)
        raise TeacherError(
            f"{FIELD}: the teacher's vocabulary is not the student's ({len(theirs)} tokens vs {len(mine)}; token "
            f"{differing!r} is {_id(theirs, differing)} for the teacher and {_id(mine, differing)} for the student). "
            "Logit distillation compares the two models token by token: use a teacher with the student's tokenizer")
    sizes = (getattr(config, "vocab_size", None), getattr(student_config, "vocab_size", None))
    if sizes[0] != sizes[1]:
        raise TeacherError(f"{FIELD}: the teacher's output layer has {sizes[0]} tokens, the student's {sizes[1]}; "
                           "logit distillation needs the same vocabulary size")
    return {"source": teacher.source, "vocab_size": sizes[0], "layers": getattr(config, "num_hidden_layers", None)}


def _id(vocab: dict[str, int], token: str) -> str:
    return f"id {vocab[token]}" if token in vocab else "absent"


class TeacherWorker(ActorBase):
    """One teacher actor: the teacher model on this pod, scoring rows into top-k log-probabilities (ActorBase:
    only its own GPUs, and `pid` for the RL loop's summary)."""

    def __init__(self, teacher: dict[str, Any], base_dir: str | None, threads: int | None) -> None:
        import torch

        super().__init__()

        if threads:
            torch.set_num_threads(threads)
        spec = ModelSpec.model_validate(teacher)
        path = models.materialize(spec, base=Path(base_dir) if base_dir else None, field=FIELD)
        from transformers import AutoModelForCausalLM

        try:
            net = AutoModelForCausalLM.from_pretrained(path, dtype=models.torch_dtype(spec.dtype),
                                                       revision=models.hub_revision(spec),
                                                       trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise TeacherError(f"{FIELD}: the teacher {spec.source} cannot be loaded ({exc})") from None
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net = net.to(self.device).eval()

    def score(self, rows: list[tuple[list[int], list[int]]], *, k: int, temperature: float,
              batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per row: (ids int32 [n, k], logp float32 [n, k]) of the n positions whose next token is trained."""
        import torch

        from posttrain.jobs.distill.divergence import IGNORE, scored_positions, teacher_topk

        out: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
            attention = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, (row_ids, row_labels) in enumerate(chunk):
                ids[i, :len(row_ids)] = torch.tensor(row_ids)
                labels[i, :len(row_labels)] = torch.tensor(row_labels)
                attention[i, :len(row_ids)] = 1
            with torch.no_grad():
                logits = self.net(input_ids=ids.to(self.device), attention_mask=attention.to(self.device)).logits
            mask = scored_positions(labels)
            for i in range(len(chunk)):
                top_ids, top_logp = teacher_topk(logits[i][mask[i].to(logits.device)], k, temperature=temperature)
                out.append((top_ids.to(torch.int32).cpu().numpy(), top_logp.float().cpu().numpy()))
        return out


def score_rows(spec: PostTrainingJobSpec, rows: list[tuple[list[int], list[int]]], *, base: Path | None,
               local_cpus: int | None = None, batch: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every row scored by the teacher actors (rows split evenly among them, results in row order)."""
    import ray

    from posttrain.api.spec import RoleSpec
    from posttrain.jobs.rl.placement import actor_options, role_actors

    settings = spec.distill or DistillSpec()
    # one actor per GPU of each roles.teacher replica (one per replica on CPU)
    role = role_actors("teacher", spec.roles.teacher or RoleSpec(), local_cpus=local_cpus, per_gpu=True)
    worker = ray.remote(TeacherWorker).options(**actor_options(role))
    actors = [worker.remote(spec.teacher.wire(), str(base) if base else None, role.threads)
              for _ in range(role.count)]
    try:
        share = -(-len(rows) // role.count)
        pending = [actor.score.remote(rows[i * share:(i + 1) * share], k=settings.top_k,
                                      temperature=settings.temperature,
                                      batch=batch or spec.training.micro_batch_size)
                   for i, actor in enumerate(actors) if rows[i * share:(i + 1) * share]]
        return [scored for part in ray.get(pending) for scored in part]
    except ray.exceptions.RayError as exc:
        # an actor that could not load the teacher: its message names the field (the traceback around it does not)
        found = next((line.strip() for line in str(exc).splitlines() if FIELD + ":" in line), None)
        if found:
            raise TeacherError(found[found.index(FIELD):]) from None
        raise
    finally:
        for actor in actors:
            ray.kill(actor)
