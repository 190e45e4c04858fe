"""`algorithm: evaluate`: models compared side by side, with test-time scaling methods, on the rollout role.

    posttrain run examples/eval/job.yaml --output out/eval
    posttrain eval --model base/ --model base/::out/grpo/adapter --data tasks.jsonl --method direct \\
        --method self_consistency --samples 1,4,16 --output out/eval          # the same job, built for you

For every model of `spec.evaluation` (or `spec.model`) in turn: rollout actors load it (vLLM where
installed, else transformers; an adapter folder is merged into the weights on the actor's pod), every
method runs on the same prompts with the same seeds (`posttrain.jobs.evaluation.methods`), and the
actors go. best_of_n (and `answer.metric: rewards`) score with `spec.rewards` on reward actors, as in
GRPO. One logged step per (model, method). At the end `<output>/eval/` gets `eval.json` (per model,
method and N: the score with its 95% CI, tokens, seconds, extraction failures), `samples.jsonl` (every
prompt's samples, extracted answers, votes and scores), `report.md` and the PNG plots.

Bad input fails before anything is written: a model or adapter that cannot be read (naming
`spec.evaluation.models[i]`), an extractor function that does not import, records without the answer
field. An extractor that never matches is a count (`extraction_failures`), not an error.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

from posttrain.api.evaluation import EvalModel, EvaluationSpec
from posttrain.api.spec import DataSource, ModelSpec
from posttrain.jobs import data as data_mod
from posttrain.jobs.algorithms.generate import Sampler, role_actors, start_rollouts
from posttrain.jobs.algorithms.rl import unwrap
from posttrain.jobs.evaluation import answers, report
from posttrain.jobs.evaluation.methods import Completion, Item, Task, run_method
from posttrain.jobs.run import storage
from posttrain.jobs.run.context import RunContext

RESULTS = "eval"  # <output>/eval/: eval.json, samples.jsonl, report.md, *.png


def run(ctx: RunContext) -> dict[str, Any]:
    spec = ctx.spec
    ev = spec.evaluation
    assert ev is not None  # the API requires it for algorithm evaluate
    ctx.prepare()
    models = ev.model_list(spec)
    sources = [DataSource(source=ev.data)] if ev.data else spec.data.train
    prepared = prepare(ctx, ev, models, sources=sources, where="spec.evaluation.data" if ev.data else "spec.data.train")
    ctx.begin(total_steps=len(models) * len(ev.methods), summary={
        "models": [m.name for m in models], "methods": list(ev.methods), "prompts": len(prepared["items"])})
    error: BaseException | None = None
    doc: dict[str, Any] = {}
    try:
        with ctx.ray():
            ctx.phase("evaluating")
            doc = evaluate(ctx, ev, models, prepared)
            ctx.summary["roles"] = doc["roles"]
            ctx.phase("saving")
            ctx.saved(kind="evaluation", path=write_results(ctx, doc, prepared["samples"]))
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised
        error = unwrap(exc)
    return ctx.finish(error, evaluation=headline(doc) if doc else None)


def prepare(ctx: RunContext, ev: EvaluationSpec, models: list[EvalModel], *, sources: list[DataSource],
            where: str, field_prefix: str = "spec.evaluation.models") -> dict[str, Any]:
    """Everything that can be wrong with the input, checked before the first write: every model's tokenizer
    and adapter, the extractor, the records. Returns the tokenizers, items and extractor."""
    from posttrain.jobs import models as models_mod

    tokenizers = []
    for i, m in enumerate(models):
        field = f"{field_prefix}[{i}]" if ev.models else "spec.model"
        try:
            folder = models_mod.materialize(ModelSpec(source=m.source), base=ctx.base_dir, weights=False)
            tokenizers.append(models_mod.load_tokenizer(folder))
        except models_mod.ModelSourceError as exc:
            raise models_mod.ModelSourceError(str(exc).replace("spec.model.source", f"{field}.source")) from None
        except (OSError, ValueError) as exc:
            raise models_mod.ModelSourceError(f"{field}.source: {m.source} cannot be loaded: {exc}") from None
        if m.adapter:
            models_mod.adapter_on_this_pod(m.adapter, base=ctx.base_dir, where=f"{field}.adapter")
    extract = answers.extractor(ev.answer, base_dir=ctx.base_dir)
    items = read_items(ctx, ev, sources, where=where)
    return {"tokenizers": tokenizers, "items": items, "extract": extract, "samples": []}


def read_items(ctx: RunContext, ev: EvaluationSpec, sources: list[DataSource], *, where: str) -> list[Item]:
    """The records as `Item`s, in file order (the first `maxPrompts`)."""
    data = ctx.spec.data
    items: list[Item] = []
    for i, src in enumerate(sources):
        at = f"{where}[{i}]" if where.endswith("train") else where
        for j, record in enumerate(data_mod.read_source(src, at, base=ctx.base_dir)):
            prompt = record.get(data.messages_field) or record.get(data.prompt_field)
            if prompt is None:
                raise data_mod.DataError(f"{at}: record {j} has no {data.prompt_field!r} (or "
                                         f"{data.messages_field!r}); set data.promptField")
            if isinstance(prompt, list):
                prompt = [m for m in prompt if m.get("role") != "assistant"] if record.get(data.messages_field) \
                    else prompt
            reference = record.get(data.answer_field)
            if reference is None and ev.answer.metric != "rewards":
                raise data_mod.DataError(f"{at}: record {j} has no {data.answer_field!r}: metric "
                                         f"{ev.answer.metric} compares with it (set data.answerField)")
            items.append(Item(prompt=prompt, reference=reference, fields={
                k: v for k, v in record.items() if k not in (data.prompt_field, data.messages_field)}))
    if ev.max_prompts:
        items = items[:ev.max_prompts]
    if not items:
        raise data_mod.DataError(f"{where}: no records to evaluate")
    return items


def evaluate(ctx: RunContext, ev: EvaluationSpec, models: list[EvalModel], prepared: dict[str, Any], *,
             log_steps: bool = True) -> dict[str, Any]:
    """Every method on every model (Ray is up); returns eval.json's document and fills prepared["samples"].
    `log_steps`: one metrics.jsonl line per (model, method) (an evaluate job; a training job's lines are its
    steps')."""
    import ray

    items, results, step = prepared["items"], [], 0
    rewards = _start_rewards(ctx) if ev.needs_rewards() else None
    roles: dict[str, Any] = {}
    try:
        for m, tokenizer in zip(models, prepared["tokenizers"]):
            actors, info = _start_rollouts(ctx, m)
            roles["rollout"] = info
            try:
                task = Task(spec=ev, generate=_generator(ev, actors, tokenizer, ctx.spec.data),
                            extract=prepared["extract"], score=_scorer(ev, rewards),
                            reward=rewards and (lambda its, texts: _reward(rewards, its, texts)))
                for method in ev.methods:
                    t0 = time.perf_counter()
                    res = run_method(method, task, items)
                    rows = [report.result_row(m.name or "model", r, seed=ev.seed) for r in res.rows]
                    results += rows
                    for i, sample in enumerate(res.samples):
                        prepared["samples"].append({"model": m.name, "method": method, "index": i,
                                                    "prompt": items[i].question(), "reference": items[i].reference,
                                                    **sample})
                    step += 1
                    seconds = sum(r["seconds"] for r in rows)
                    ctx.state.eval_scores[(m.name or "model", method)] = rows[-1]["score"]  # /metrics
                    if not log_steps:
                        ctx.event("evaluated", model=m.name, method=method, score=rows[-1]["score"])
                        continue
                    ctx.log(step, {"model": m.name, "method": method, "score": rows[-1]["score"],
                                   "tokens": rows[-1]["tokens"], "extraction_failures": rows[-1]["extraction_failures"],
                                   "tokens_per_second": round(rows[-1]["tokens"] / seconds, 2) if seconds else None,
                                   "time_step": round(time.perf_counter() - t0, 4)})
            finally:
                for actor in actors:
                    ray.kill(actor)
    finally:
        for actor in (rewards or []):
            ray.kill(actor)
    if rewards:
        roles["reward"] = {"actors": len(rewards), "rewards": [r.name or r.function or "reward"
                                                              for r in ctx.spec.rewards]}
    return {"roles": roles, "job": ctx.job.metadata.name, "models": [m.model_dump(exclude_none=True) for m in models],
            "methods": list(ev.methods), "samples": list(ev.samples), "prompts": len(items),
            "metric": ev.answer.metric, "extract": ev.answer.extract, "seed": ev.seed,
            "max_new_tokens": ev.max_new_tokens, "temperature": ev.temperature, "engine": roles["rollout"]["engine"],
            "results": results}


def write_results(ctx: RunContext, doc: dict[str, Any], samples: list[dict[str, Any]],
                  folder: str = RESULTS) -> str:
    """eval.json, samples.jsonl, report.md and the plots, published whole to `<output>/<folder>/`."""
    dest = ctx.folder.loc.child(folder)
    with tempfile.TemporaryDirectory(prefix="posttrain-eval-") as tmp:
        out = Path(tmp)
        if ctx.spec.evaluation and ctx.spec.evaluation.plots:
            doc["plots"] = report.plot_scaling(doc, out)
        (out / "eval.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "samples.jsonl").write_text("".join(json.dumps(s, ensure_ascii=False, default=str) + "\n"
                                                   for s in samples))
        (out / "report.md").write_text(report.report_markdown(doc))
        storage.publish_tree(out, dest)
    return dest.uri


def headline(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """summary.json's `evaluation`: model -> {"method" or "method@N": score}."""
    out: dict[str, dict[str, float]] = {}
    for r in doc["results"]:
        key = r["method"] if r["method"] in ("direct", "cot") else f"{r['method']}@{r['n']}"
        out.setdefault(r["model"], {})[key] = r["score"]
    return out


# ---- after training ----------------------------------------------------------------------------------

def training_preflight(ctx: RunContext) -> dict[str, Any] | None:
    """A training job's `spec.evaluation`, checked before the first write (the base model, the extractor, the
    prompts of evaluation.data or data.eval); None when the job has none."""
    ev, spec = ctx.spec.evaluation, ctx.spec
    if ev is None:
        return None
    sources = [DataSource(source=ev.data)] if ev.data else [spec.data.eval]
    return prepare(ctx, ev, [EvalModel(source=spec.model.source, name="base")], sources=sources,
                   where="spec.evaluation.data" if ev.data else "spec.data.eval")


def after_training(ctx: RunContext, prepared: dict[str, Any] | None) -> None:
    """The same evaluation on the base model and the trained result (an adapter on the base, or the written
    model), inside `ctx.ray()` once the training actors are gone: `<output>/eval/`, and the summary's
    `evaluation` (per model) and `evaluation_before_after` (method -> [base, trained])."""
    ev = ctx.spec.evaluation
    if prepared is None or ev is None or not ctx.artifact.get("path"):
        return
    art, source = ctx.artifact, ctx.spec.model.source
    trained = (EvalModel(source=source, adapter=art["path"], name="trained") if art.get("kind") == "adapter"
               else EvalModel(source=art["path"], name="trained"))
    prepared["tokenizers"].append(prepared["tokenizers"][0])  # the trained model keeps the base's tokenizer
    ctx.phase("evaluating")
    doc = evaluate(ctx, ev, [EvalModel(source=source, name="base"), trained], prepared, log_steps=False)
    path = write_results(ctx, doc, prepared["samples"])
    scores = headline(doc)
    ctx.summary.update(evaluation=scores, evaluation_path=path, evaluation_before_after={
        key: [value, scores["trained"].get(key)] for key, value in scores["base"].items()})


# ---- the actors ---------------------------------------------------------------------------------------

def _start_rollouts(ctx: RunContext, model: EvalModel) -> tuple[list[Any], dict[str, Any]]:
    spec = ctx.spec
    engine = spec.evaluation.engine or (spec.roles.rollout.engine if spec.roles.rollout else None) or "auto"
    return start_rollouts(ctx, model_wire(spec, model), engine=engine, seed=spec.evaluation.seed,
                          adapter=model.adapter)


def model_wire(spec: Any, model: EvalModel) -> dict[str, Any]:
    """What a rollout actor loads for `model`: its source with spec.model's settings (dtype, trustRemoteCode).
    `model.keepLayers` belongs to spec.model's own source (a distill job's student before training); a model
    the job wrote already has only the kept layers."""
    wire = {**spec.model.wire(), "source": model.source, "tokenizer": None}
    if model.source != spec.model.source:
        wire.pop("keepLayers", None)
    return {k: v for k, v in wire.items() if v is not None}


def _start_rewards(ctx: RunContext) -> list[Any]:
    import ray

    from posttrain.jobs.rl.workers.scorer import RewardWorker

    actors, _ = role_actors(ctx, RewardWorker, "reward", per_gpu=False)
    ray.get([a.setup.remote([r.wire() for r in ctx.spec.rewards], base_dir=str(ctx.base_dir)) for a in actors])
    return actors


def _generator(ev: EvaluationSpec, actors: list[Any], tokenizer: Any, data: Any):
    """`generate(prompts, n=, greedy=, seed=)` over the rollout actors (generate's `Sampler`: prompts rendered as
    GRPO renders them, split between the actors in chunks), decoded texts back."""
    sampler = Sampler(actors, tokenizer, data)

    def generate(prompts: list[Any], *, n: int, greedy: bool, seed: int) -> list[list[Completion]]:
        sampling = sampler.sampling(n=n, max_new_tokens=ev.max_new_tokens,
                                    temperature=0.0 if greedy else ev.temperature, top_p=ev.top_p)
        return [[Completion(text=t, tokens=len(tok)) for t, tok in zip(gen.texts, gen.token_ids)]
                for gen in sampler.texts(prompts, sampling, seed)]

    return generate


def _reward(actors: list[Any], items: list[Item], texts: list[str]) -> list[float]:
    """The weighted spec.rewards of each (item, completion), split between the reward actors."""
    import ray

    from posttrain.jobs.rl import batch as batching

    index = list(range(len(items)))
    refs = []
    for part in (p for p in batching.split(index, len(actors)) if p):
        keys = sorted({k for i in part for k in items[i].fields})
        fields = {k: [items[i].fields.get(k) for i in part] for k in keys}
        refs.append(actors[len(refs)].score.remote([items[i].question() for i in part], [texts[i] for i in part],
                                                   fields))
    return [float(x) for batch in ray.get(refs) for x in batch.rewards]


def _scorer(ev: EvaluationSpec, rewards: list[Any] | None):
    if ev.answer.metric == "rewards":
        return lambda items, texts, _answers: _reward(rewards or [], items, texts)
    score = answers.scorer(ev.answer)
    return lambda items, _texts, found: [score(a, it.reference) for it, a in zip(items, found)]

