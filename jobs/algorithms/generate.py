"""`algorithm: generate`: a job that writes a data set with the policy `spec.model` (on the rollout role).

    posttrain run examples/generate-pairs.yaml --output out/pairs      # -> out/pairs/data/train.jsonl

`spec.generate.task` picks an entry of `TASKS`: a class built with the run context whose `start()`
starts the task's own actors, `batch(prompts, generations)` turns one batch of prompts and their
sampled candidates into records (and that batch's metrics), `summary()` gives its counts and
`close()` stops its actors. The job around it is the same for every task: read the prompts
(bad input fails before anything is written), start the rollout actors (vLLM or transformers engines,
as in GRPO) and the task's actors, sample `candidates` completions per prompt in batches of
`promptsPerBatch` (one logged step each), and write every record to `<output>/data/train.jsonl` at the
end, whole (also on object storage), with the counts in summary.json.

`preference_pairs` (`generate_pairs.py`): the judge (`spec.generate.judge`, on the reward role) scores
the candidates; the best and the worst become `{prompt, chosen, rejected}`, which `dpo` and `reward`
jobs read.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from posttrain.api.spec import RoleSpec
from posttrain.jobs.algorithms.rl import check_judges, read_prompts, unwrap
from posttrain.api import refs
from posttrain.jobs.registry import Registry
from posttrain.jobs.run import storage
from posttrain.jobs.run.context import RunContext

TASKS: Registry[Any] = Registry("generate task")
TASKS.add("preference_pairs", "posttrain.jobs.algorithms.generate_pairs:PreferencePairs")
DATA_FILE = tuple(refs.DATA_FILE.split("/"))  # where `ptj://<this job>` as a data source points


def run(ctx: RunContext) -> dict[str, Any]:
    from posttrain.jobs.rl import batch as batching

    spec, gen = ctx.spec, ctx.spec.generate
    assert gen is not None  # the API requires it for algorithm generate
    try:
        task_cls = TASKS.load(gen.task)
    except ValueError as exc:
        raise ValueError(f"spec.generate.task: {exc}") from None
    ctx.prepare()
    tokenizer, prompts, stats = read_prompts(ctx, max_new_tokens=gen.max_new_tokens,
                                             field="spec.generate.maxNewTokens")
    check_judges(ctx)
    batches = math.ceil(len(prompts) / gen.prompts_per_batch)
    ctx.begin(total_steps=batches, summary={
        "task": gen.task, "data": {"prompts": stats.train_examples, "dropped": stats.dropped, "sets": stats.sets}})
    error: BaseException | None = None
    task: Any = None
    records: list[dict[str, Any]] = []
    rollouts: dict[str, Any] = {"actors": []}
    try:
        with ctx.ray():
            import ray

            try:
                rollouts = _start_rollouts(ctx)
                task = task_cls(ctx)
                ctx.summary["roles"] = {"rollout": rollouts["info"], **task.start()}
                ctx.phase("generating")
                sampling = _sampling(gen, tokenizer)
                for b in range(batches):
                    part = prompts[b * gen.prompts_per_batch:(b + 1) * gen.prompts_per_batch]
                    t0 = time.perf_counter()
                    chunks = batching.split(part, len(rollouts["actors"]))
                    refs = [actor.generate.remote([p.ids for p in chunk], sampling,
                                                  batching.step_seed(spec.training.seed, b, i))
                            for i, (actor, chunk) in enumerate(zip(rollouts["actors"], chunks)) if chunk]
                    gens = [g for chunk in ray.get(refs) for g in chunk]
                    t_gen = time.perf_counter() - t0
                    new, line = task.batch(part, gens)
                    records.extend(new)
                    ctx.log(b + 1, {**line, "records": len(records), "time_generate": round(t_gen, 4),
                                    "time_step": round(time.perf_counter() - t0, 4)})
                ctx.phase("saving")
                dest = ctx.folder.loc.child(*DATA_FILE)
                storage.write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                ctx.saved(kind="dataset", path=dest.uri, records=len(records))
            finally:
                for actor in rollouts["actors"]:
                    ray.kill(actor)
                if task is not None:
                    task.close()
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised
        error = unwrap(exc)
    return ctx.finish(error, records=len(records), **(task.summary() if task is not None else {}))


def actor_options(role: str, cpus: float, gpus: float) -> dict[str, Any]:
    """Ray options of one actor of `role` (on a cluster it asks for that role's worker group)."""
    from posttrain.api import runtime
    from posttrain.jobs.rl.placement import on_cluster

    opts: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    if on_cluster():
        opts["resources"] = {runtime.ray_resource(role): 1}
    return opts


def role_actors(ctx: RunContext, cls: type, role: str, *, per_gpu: bool) -> tuple[list[Any], Any]:
    """The actors of `role` (roles.<role>, defaults where unset) and their `Role` sizing."""
    import ray

    from posttrain.jobs.rl.placement import role_actors as sizing

    sized = sizing(role, getattr(ctx.spec.roles, role) or RoleSpec(), local_cpus=ctx.local_cpus, per_gpu=per_gpu)
    options = actor_options(role, sized.cpus, sized.gpus)
    return [ray.remote(cls).options(**options).remote() for _ in range(sized.count)], sized


def start_rollouts(ctx: RunContext, model: dict[str, Any], *, engine: str, seed: int,
                   adapter: str | None = None) -> tuple[list[Any], dict[str, Any]]:
    """The rollout actors of `roles.rollout`, each with its engine loaded from `model` (wire form) and the
    optional adapter; (actors, the summary's `rollout` entry)."""
    import ray

    from posttrain.jobs.rl.workers.rollout import RolloutWorker

    actors, sized = role_actors(ctx, RolloutWorker, "rollout", per_gpu=True)
    setups = ray.get([a.setup.remote(model, engine=engine, seed=seed + i, threads=sized.threads,
                                     base_dir=str(ctx.base_dir), adapter=adapter)
                      for i, a in enumerate(actors)])
    return actors, {"actors": sized.count, "engine": setups[0]["engine"], "resources_per_actor": sized.resources()}


def _start_rollouts(ctx: RunContext) -> dict[str, Any]:
    spec = ctx.spec
    engine = (spec.roles.rollout.engine if spec.roles.rollout else None) or "auto"
    actors, info = start_rollouts(ctx, spec.model.wire(), engine=engine, seed=spec.training.seed)
    return {"actors": actors, "info": info}


def _sampling(gen: Any, tokenizer: Any):
    from posttrain.jobs.rl.engines import Sampling

    stops = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    return Sampling(n=gen.candidates, max_new_tokens=gen.max_new_tokens, temperature=gen.temperature,
                    top_p=gen.top_p, stop_token_ids=stops)
