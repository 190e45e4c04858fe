"""`algorithm: distill`: a student learns the teacher's token distributions.

    posttrain run examples/distill-logits.yaml --output out/
    posttrain run examples/distill-on-policy.yaml --output out/

`distill.mode` picks the runtime (`MODES`): `on_policy` runs on the RL actors (`algorithms.rl.run` with
`rl.methods.METHODS["distill"]`; see `distill.on_policy`), `logits` on the SFT path, below.

`logits` is the SFT path (`algorithms.sft.run`) with a teacher step:

1. before anything is written, the teacher is checked: it loads, and its vocabulary is the student's
   (`distill.teacher.check_teacher`; a mismatch or a missing teacher is an error naming spec.teacher.source);
2. once Ray is up, each split (train, eval) is looked up in the teacher cache (`distill.cache`, default
   `<output>/teacher-cache`); a split without a complete cache of the same key is scored by the teacher actors
   on roles.teacher (`distill.teacher.score_rows`) and published to the cache; the scores become the rows'
   `teacher_ids`/`teacher_logp` columns;
3. the student (spec.model, layer-dropped with model.keepLayers) trains on roles.trainer with
   `distill.trainer.DistillTrainer` (`methods.METHODS["distill"]`): the loss from `distill.divergence`.

The summary adds `teacher` (source, vocabulary, layers) and `teacher_cache` (per split: rows, positions,
reused or scored), besides SFT's (eval_teacher_kl_before / _after: the token-level KL to the teacher).
"""

from __future__ import annotations

from typing import Any

from posttrain.api.distill import DistillSpec
from posttrain.jobs.algorithms import sft
from posttrain.jobs.run import storage
from posttrain.jobs.run.context import RunContext

CACHE_FOLDER = "teacher-cache"


def run(ctx: RunContext) -> dict[str, Any]:
    return MODES[(ctx.spec.distill or DistillSpec()).mode](ctx)


def run_logits(ctx: RunContext) -> dict[str, Any]:
    return sft.run(ctx, teacher=TeacherStep())


def run_on_policy(ctx: RunContext) -> dict[str, Any]:
    from posttrain.jobs.algorithms import rl

    return rl.run(ctx)  # METHODS["distill"]: teacher actors score the samples, the learners minimise distill.loss


class TeacherStep:
    def __init__(self) -> None:
        self.found: dict[str, Any] = {}

    def check(self, ctx: RunContext, tokenizer: Any) -> None:
        from posttrain.jobs.distill.teacher import check_teacher

        self.found["teacher"] = check_teacher(ctx.spec, tokenizer, base=ctx.base_dir)

    def cache_location(self, ctx: RunContext) -> storage.Location:
        uri = (ctx.spec.distill or DistillSpec()).cache
        return storage.resolve(uri, base=ctx.base_dir) if uri else ctx.folder.loc.child(CACHE_FOLDER)

    def attach(self, ctx: RunContext, cfg: dict[str, Any]) -> None:
        """Score (or read from the cache) the train and eval rows, and add the scores to them in `cfg`."""
        from posttrain.jobs.distill.cache import TeacherCache, cache_key
        from posttrain.jobs.distill.teacher import score_rows

        spec = ctx.spec
        cache = TeacherCache(self.cache_location(ctx))
        report: dict[str, Any] = {"uri": cache.root.uri}
        for split in ("train", "eval"):
            ds = cfg[split]
            if ds is None:
                continue
            rows = [(r["input_ids"], r["labels"]) for r in ds]
            key = cache_key(spec, rows)
            scores = cache.read(split, key)
            reused = scores is not None
            if scores is None:
                ctx.event("teacher_scoring", split=split, rows=len(rows))
                scores = score_rows(spec, rows, base=ctx.base_dir, local_cpus=ctx.local_cpus)
                cache.write(split, key, scores, k=(spec.distill or DistillSpec()).top_k)
            report[split] = {"rows": len(rows), "positions": int(sum(len(s[0]) for s in scores)), "reused": reused}
            ctx.event("teacher_cache", split=split, **report[split])
            cfg[split] = ds.add_column("teacher_ids", [s[0].tolist() for s in scores]).add_column(
                "teacher_logp", [s[1].tolist() for s in scores])
        self.found["teacher_cache"] = report

    def summary(self) -> dict[str, Any]:
        return dict(self.found)


MODES = {"logits": run_logits, "on_policy": run_on_policy}
