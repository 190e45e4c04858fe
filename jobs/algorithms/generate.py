"""`algorithm: generate`: a job that writes a data set with the policy `spec.model` (on the rollout role).

    posttrain run examples/generate-pairs.yaml --output out/pairs      # -> out/pairs/data/train.jsonl
    posttrain run examples/distill-cot/traces.yaml --output out/traces

`spec.generate.task` picks an entry of `TASKS`: a class built with the run context whose `units(prompts)`
gives the work items (the data's prompts, or for instructions one item per request), `start()` starts
the task's own actors, `batch(items, sampler, step)` samples through the `Sampler` (the rollout actors)
and turns one batch into records (and that batch's metrics), `finish(records)` refuses an unusable
result, `summary()` and `manifest()` give its counts and settings, and `close()` stops its actors. The
job around it is the same for every task: read the prompts (bad input fails before anything is
written), start the rollout actors (vLLM or transformers engines, as in GRPO) and the task's actors,
run the items in batches of `promptsPerBatch` (one logged step each), and write every record to
`<output>/data/train.jsonl` at the end, whole, then `<output>/data/manifest.json` (task, model,
templates, sampling settings, counts, time; also on object storage), with the counts in summary.json.
A task whose `finish` fails leaves no train.jsonl.

- `preference_pairs` (`generate_pairs.py`): the judge (`spec.generate.judge`, on the reward role) scores
  the candidates; the best and the worst become `{prompt, chosen, rejected}` (dpo, reward).
- `traces` (`generate_traces.py`): reasoning traces, kept when their answer matches the record's;
  `{prompt, reasoning, answer}` (sft with `format: cot`).
- `instructions` (`generate_instructions.py`): self-instruct from seed records, deduplicated, with a
  diversity report; `{prompt, completion}` (sft).
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
TASKS.add("traces", "posttrain.jobs.algorithms.generate_traces:Traces")
TASKS.add("instructions", "posttrain.jobs.algorithms.generate_instructions:Instructions")
DATA_FILE = tuple(refs.DATA_FILE.split("/"))  # where `ptj://<this job>` as a data source points
MANIFEST = "manifest.json"  # beside DATA_FILE, written after it
CHUNK = 32  # prompts per generate call of one actor (Sampler.texts): bounds a transformers engine's batch


def run(ctx: RunContext) -> dict[str, Any]:
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
    task = task_cls(ctx)
    units = task.units(prompts)
    batches = math.ceil(len(units) / gen.prompts_per_batch)
    started = time.time()
    ctx.begin(total_steps=batches, summary={
        "task": gen.task, "data": {"prompts": stats.train_examples, "dropped": stats.dropped, "sets": stats.sets}})
    error: BaseException | None = None
    records: list[dict[str, Any]] = []
    actors: list[Any] = []
    try:
        with ctx.ray():
            import ray

            try:
                actors, info = _start_rollouts(ctx)
                sampler = Sampler(actors, tokenizer, spec.data, seed=spec.training.seed,
                                  max_prompt_tokens=spec.training.max_seq_length - gen.max_new_tokens)
                ctx.summary["roles"] = {"rollout": info, **task.start()}
                ctx.phase("generating")
                for b in range(batches):
                    t0 = time.perf_counter()
                    new, line = task.batch(units[b * gen.prompts_per_batch:(b + 1) * gen.prompts_per_batch],
                                           sampler, b)
                    records.extend(new)
                    ctx.log(b + 1, {**line, "records": len(records), "time_generate": round(sampler.seconds, 4),
                                    "time_step": round(time.perf_counter() - t0, 4)})
                    sampler.seconds = 0.0
                task.finish(records)
                ctx.phase("saving")
                dest = ctx.folder.loc.child(*DATA_FILE)
                storage.write_text(dest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                book = ctx.folder.loc.child(*DATA_FILE[:-1], MANIFEST)
                storage.write_text(book, json.dumps(manifest(ctx, task, records, started=started), indent=2,
                                                    ensure_ascii=False) + "\n")
                ctx.saved(kind="dataset", path=dest.uri, records=len(records), manifest=book.uri)
            finally:
                for actor in actors:
                    ray.kill(actor)
                task.close()
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised
        error = unwrap(exc)
    return ctx.finish(error, records=len(records), **task.summary())


def manifest(ctx: RunContext, task: Any, records: list[dict[str, Any]], *, started: float) -> dict[str, Any]:
    """What `<output>/data/manifest.json` says about the data set: how it was made and what it holds."""
    spec, gen = ctx.spec, ctx.spec.generate
    return {
        "task": gen.task, "file": DATA_FILE[-1], "records": len(records), "format": task.FORMAT,
        "model": {"source": spec.model.source, "dtype": spec.model.dtype},
        "data": [src.source for src in spec.data.train],
        "sampling": {"candidates": gen.candidates, "maxNewTokens": gen.max_new_tokens,
                     "temperature": gen.temperature, "topP": gen.top_p, "seed": spec.training.seed,
                     "promptsPerBatch": gen.prompts_per_batch},
        **task.manifest(), "counts": task.summary(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seconds": round(time.time() - started, 3),
    }


class Sampler:
    """Samples from the rollout actors: `ids(...)` for token ids, `texts(...)` for prompts given as strings or
    chat messages (rendered as GRPO renders them, split between the actors in chunks of `CHUNK` each).
    `seconds` adds up the time spent sampling (the caller resets it per step)."""

    def __init__(self, actors: list[Any], tokenizer: Any, data: Any, *, seed: int = 0,
                 max_prompt_tokens: int | None = None) -> None:
        self.actors, self.tokenizer, self.data = actors, tokenizer, data
        self.seed, self.max_prompt_tokens, self.seconds = seed, max_prompt_tokens, 0.0

    def sampling(self, *, n: int, max_new_tokens: int, temperature: float, top_p: float):
        from posttrain.jobs.rl.engines import Sampling

        eos = self.tokenizer.eos_token_id
        return Sampling(n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        stop_token_ids=(eos,) if eos is not None else ())

    def ids(self, prompt_ids: list[list[int]], sampling: Any, step: int) -> list[Any]:
        """One call per actor, seeded by (the job's seed, `step`, the actor)."""
        import ray

        from posttrain.jobs.rl import batch as batching

        t0 = time.perf_counter()
        chunks = batching.split(prompt_ids, len(self.actors))
        refs = [actor.generate.remote(chunk, sampling, batching.step_seed(self.seed, step, i))
                for i, (actor, chunk) in enumerate(zip(self.actors, chunks)) if chunk]
        out = [g for chunk in ray.get(refs) for g in chunk]
        self.seconds += time.perf_counter() - t0
        return out

    def texts(self, prompts: list[Any], sampling: Any, seed: int) -> list[Any]:
        """A `Generation` per prompt; a prompt longer than `max_prompt_tokens` is not sent and gets one with
        no texts."""
        import ray

        from posttrain.jobs import data as data_mod
        from posttrain.jobs.rl import batch as batching
        from posttrain.jobs.rl.engines import Generation

        t0 = time.perf_counter()
        ids = []
        for p in prompts:
            text, templated = data_mod.render_prompt({self.data.prompt_field: p}, self.data, self.tokenizer)
            ids.append(self.tokenizer(text, add_special_tokens=not templated)["input_ids"])
        sent = [i for i, x in enumerate(ids) if self.max_prompt_tokens is None or len(x) <= self.max_prompt_tokens]
        out = [Generation(prompt_token_ids=x) for x in ids]
        per_call = CHUNK * len(self.actors)
        for c, start in enumerate(range(0, len(sent), per_call)):
            parts = batching.split(sent[start:start + per_call], len(self.actors))
            refs = [a.generate.remote([ids[i] for i in part], sampling, batching.step_seed(seed, c, k))
                    for k, (a, part) in enumerate(zip(self.actors, parts)) if part]
            done = [i for part in parts for i in part]
            for i, g in zip(done, (g for chunk in ray.get(refs) for g in chunk)):
                out[i] = g
        self.seconds += time.perf_counter() - t0
        return out


def role_actors(ctx: RunContext, cls: type, role: str, *, per_gpu: bool) -> tuple[list[Any], Any]:
    """The actors of `role` (roles.<role>, defaults where unset) and their `Role` sizing."""
    import ray

    from posttrain.jobs.rl.placement import actor_options
    from posttrain.jobs.rl.placement import role_actors as sizing

    sized = sizing(role, getattr(ctx.spec.roles, role) or RoleSpec(), local_cpus=ctx.local_cpus, per_gpu=per_gpu)
    options = actor_options(sized)
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


def _start_rollouts(ctx: RunContext) -> tuple[list[Any], dict[str, Any]]:
    spec = ctx.spec
    engine = (spec.roles.rollout.engine if spec.roles.rollout else None) or "auto"
    return start_rollouts(ctx, spec.model.wire(), engine=engine, seed=spec.training.seed)
