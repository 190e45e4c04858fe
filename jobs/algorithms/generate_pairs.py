"""`generate.task: preference_pairs`: judge-labelled `{prompt, chosen, rejected}` records (RLAIF data).

For each prompt the job samples `candidates` completions; the judge (`spec.generate.judge`, on the
reward role's actors) scores them: pairwise, each candidate's win rate in a round robin (both orders
with `swap`); pointwise, each candidate's normalised score. The best becomes `chosen`, the worst
`rejected`. A prompt is dropped as a tie when the two scores differ by `minMargin` or less or the two
texts are equal, and as unjudged when fewer than two candidates got a readable verdict (`onError:
skip`; with `raise` an unreadable reply fails the job, naming spec.generate.judge and the reply).

A record (extra fields besides the three a dpo / reward job reads):

    {"prompt": ..., "chosen": ..., "rejected": ..., "chosen_score": 0.83, "rejected_score": 0.17,
     "judge_preference": 0.91, "judge_reason": "A", "candidates": 4}

`judge_preference` is P(chosen better than rejected) from their direct comparison (pairwise);
`judge_reason` the judge's replies on that comparison (verdict reply; empty for logprobs).
"""

from __future__ import annotations

from typing import Any

from posttrain.jobs.run.context import RunContext


class PreferencePairs:
    """The task's actors and its per-batch work (see `posttrain.jobs.algorithms.generate`)."""

    FORMAT = "preference"  # {prompt, chosen, rejected}: what dpo and reward jobs read

    def __init__(self, ctx: RunContext) -> None:
        self.ctx, self.gen = ctx, ctx.spec.generate
        self.judges: list[Any] = []
        self.counts = {"pairs_written": 0, "ties_dropped": 0, "unjudged_prompts": 0, "unparseable_verdicts": 0}

    def start(self) -> dict[str, Any]:
        import ray

        from posttrain.jobs.algorithms.generate import role_actors
        from posttrain.jobs.rl.workers.judge import JudgeWorker

        self.judges, sized = role_actors(self.ctx, JudgeWorker, "reward", per_gpu=False)
        info = ray.get([j.setup.remote(self.gen.judge.model_dump(), where="spec.generate.judge",
                                       on_error=self.gen.on_error, seed=self.ctx.spec.training.seed,
                                       threads=sized.threads, base_dir=str(self.ctx.base_dir))
                        for j in self.judges])[0]
        return {"reward": {"actors": sized.count, "judge": self.gen.judge.model, **info,
                           "resources_per_actor": sized.resources()}}

    def units(self, prompts: list[Any]) -> list[Any]:
        return prompts

    def batch(self, prompts: list[Any], sampler: Any, step: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        import ray

        from posttrain.jobs.rl import batch as batching

        gen = self.gen
        gens = sampler.ids([p.ids for p in prompts], sampler.sampling(
            n=gen.candidates, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p), step)
        items = [(p.text, list(g.texts)) for p, g in zip(prompts, gens)]
        parts = batching.split(items, len(self.judges))
        scored = [s for chunk in ray.get([j.candidate_scores.remote(part)
                                          for j, part in zip(self.judges, parts) if part]) for s in chunk]
        records: list[dict[str, Any]] = []
        ties = unjudged = unparseable = 0
        for (prompt, candidates), cs in zip(items, scored):
            unparseable += cs.unparseable
            rated = [(s, i) for i, s in enumerate(cs.scores) if s is not None]
            if len(rated) < 2:
                unjudged += 1
                continue
            best, worst = max(rated), min(rated)
            if best[0] - worst[0] <= self.gen.min_margin or candidates[best[1]] == candidates[worst[1]]:
                ties += 1
                continue
            records.append(_record(prompt, candidates, cs, best[1], worst[1]))
        for key, n in (("pairs_written", len(records)), ("ties_dropped", ties), ("unjudged_prompts", unjudged),
                       ("unparseable_verdicts", unparseable)):
            self.counts[key] += n
        return records, {"pairs": len(records), "ties": ties, "unjudged": unjudged, "unparseable": unparseable}

    def finish(self, records: list[dict[str, Any]]) -> None:
        """Any number of pairs is a result (ties and unjudged prompts are counted in the summary)."""

    def summary(self) -> dict[str, Any]:
        return dict(self.counts)

    def manifest(self) -> dict[str, Any]:
        judge = self.gen.judge
        return {"judge": judge.model_dump(mode="json", by_alias=True), "minMargin": self.gen.min_margin}

    def close(self) -> None:
        import ray

        for j in self.judges:
            ray.kill(j)
        self.judges = []


def _record(prompt: str, candidates: list[str], cs: Any, chosen: int, rejected: int) -> dict[str, Any]:
    key = (min(chosen, rejected), max(chosen, rejected))
    preference = cs.preference.get(key)
    if preference is not None and chosen > rejected:  # stored as "the lower index is better"
        preference = 1.0 - preference
    reasons = cs.reasons.get(key) or [r for i in (chosen, rejected) for r in cs.reasons.get((i, i), [])]
    return {"prompt": prompt, "chosen": candidates[chosen], "rejected": candidates[rejected],
            "chosen_score": round(cs.scores[chosen], 6), "rejected_score": round(cs.scores[rejected], 6),
            "judge_preference": None if preference is None else round(preference, 6),
            "judge_reason": " | ".join(reasons), "candidates": len(candidates)}
