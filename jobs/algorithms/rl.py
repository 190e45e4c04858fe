"""`algorithm: grpo` and `algorithm: ppo` (and `distill` mode on_policy): training on our single-controller
loop over Ray actors.

    posttrain run examples/grpo/job.yaml --output out/grpo

What grpo, ppo and on-policy distillation differ in is declared in `posttrain.jobs.rl.methods` (ppo has a
critic and defaults to GAE; distill has a teacher instead of rewards); the actors and the step loop are
`posttrain.jobs.rl.loop`. This entry does the
run's own part: refuse what it cannot run and read the prompts and rewards before anything is
written, then start the actors, resume from the newest checkpoint, loop, and publish the policy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from posttrain.api.rl import RLSpec
from posttrain.jobs import data as data_mod
from posttrain.jobs.models import provenance
from posttrain.jobs.rl import batch as batching
from posttrain.jobs.rl.methods import METHODS, Method
from posttrain.jobs.run import storage
from posttrain.jobs.run.context import RunContext


def preflight(ctx: RunContext, method: Method) -> None:
    """RL settings this version cannot run, refused before anything is written."""
    adapter = ctx.spec.adapter.type
    if adapter not in method.adapters:
        raise ValueError(f"spec.adapter.type: {adapter.value} is not supported by {method.name} in this version; "
                         f"use {', '.join(a.value for a in method.adapters)}")


def run(ctx: RunContext) -> dict[str, Any]:
    from posttrain.jobs.algorithms.evaluate import after_training, training_preflight
    from posttrain.jobs.rewards.score import RewardError, build_rewards
    from posttrain.jobs.rl.loop import RLRun, checkpoint, run_steps
    from posttrain.jobs.rl.workers.scorer import reward_function

    if ctx.spec.rl is None:  # the defaults, written into the job every actor receives
        ctx.job = ctx.job.model_copy(update={"spec": ctx.spec.model_copy(update={"rl": RLSpec()})})
        ctx.spec = ctx.job.spec
    spec, rl = ctx.spec, ctx.spec.rl
    method = METHODS.get(spec.algorithm.value)
    preflight(ctx, method)
    ctx.prepare()

    # Bad input fails here, before the first write: tokenizer, prompts, reward functions.
    tokenizer, prompts, stats = read_prompts(ctx, max_new_tokens=rl.max_new_tokens, field="spec.rl.maxNewTokens")
    if method.teacher:  # loadable, and the student's vocabulary
        from posttrain.jobs.distill.teacher import check_teacher

        teacher = check_teacher(spec, tokenizer, base=ctx.base_dir)
    for i, r in enumerate(spec.rewards):
        if r.function is not None:  # import it now: a typo must not cost a cluster start
            try:
                build_rewards([reward_function(r, ctx.base_dir)])
            except RewardError as exc:
                raise ValueError(f"spec.rewards[{i}].function: {exc}") from None
    check_judges(ctx)
    steps = batching.total_steps(spec, len(prompts))
    evaluation = training_preflight(ctx)  # spec.evaluation's models and prompts, before anything is written

    resume = ctx.begin(total_steps=steps, summary={
        "placement": spec.placement,
        "data": {"train_examples": stats.train_examples, "dropped": stats.dropped, "sets": stats.sets},
        **({"teacher": teacher} if method.teacher else {}),
    })
    resume_step = resume[1] if resume else 0
    error: BaseException | None = None
    run_: RLRun | None = None
    try:
        with ctx.ray():
            run_ = RLRun(ctx.job, method, tokenizer=tokenizer, prompts=prompts, ckpts=ctx.ckpts,
                         base_dir=ctx.base_dir, local_cpus=ctx.local_cpus, total_steps=steps)
            try:
                ctx.summary["roles"] = run_.start()
                if resume:
                    run_.load(resume[0])
                    run_.sync.push(resume_step)  # the engines start from the checkpoint's policy
                ctx.phase("training")
                ctx.event("begin", step=resume_step, max_steps=steps)
                run_steps(run_, ctx, start=resume_step, steps=steps)
                every = spec.checkpoint.every_steps
                if every and ctx.state.step % every and ctx.state.step > resume_step:
                    checkpoint(run_, ctx)
                ctx.phase("saving")
                ctx.saved(**publish(run_, ctx.folder.loc, base_dir=ctx.base_dir))
            finally:
                run_.shutdown()
            after_training(ctx, evaluation)  # once the RL actors are gone
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised
        error = unwrap(exc)
    return ctx.finish(error, **results(ctx))


def read_prompts(ctx: RunContext, *, max_new_tokens: int, field: str) -> tuple[Any, list[Any], Any]:
    """The job's tokenizer, prompts (leaving room for `max_new_tokens`, the setting at `field`) and data stats."""
    spec = ctx.spec
    tokenizer = ctx.tokenizer()
    max_prompt = spec.training.max_seq_length - max_new_tokens
    if max_prompt < 1:
        raise ValueError(f"spec.training.maxSeqLength ({spec.training.max_seq_length}) must exceed "
                         f"{field} ({max_new_tokens}): prompts need room")
    prompts, stats = data_mod.build_prompts(spec.data, tokenizer, seed=spec.training.seed,
                                            max_prompt_len=max_prompt, base=ctx.base_dir)
    return tokenizer, prompts, stats


def check_judges(ctx: RunContext) -> None:
    """Judge models on a path or a claim must exist: checked before anything is written (the reward actors
    load them; object storage and the hub are read there)."""
    spec = ctx.spec
    judges = [(f"spec.rewards[{i}].judge.model", r.judge.model) for i, r in enumerate(spec.rewards) if r.judge]
    if spec.generate is not None and spec.generate.judge is not None:
        judges.append(("spec.generate.judge.model", spec.generate.judge.model))
    for field, source in judges:
        loc = storage.resolve(source, base=ctx.base_dir)
        if loc.local is not None and not loc.local.exists():
            raise ValueError(f"{field}: {loc.uri} does not exist; give a model folder, a .gguf file, hf://org/name, "
                             "pvc://claim/path or s3://")


def results(ctx: RunContext) -> dict[str, Any]:
    """The summary's RL figures, from the run's metrics.jsonl."""
    final = ctx.metrics_lines()
    teacher = ends(final, "teacher_kl") if any("teacher_kl" in m for m in final) else {}  # on-policy distill
    return {
        **(teacher or ends(final, "reward_mean", name="reward")),
        "first_loss": next((m["loss"] for m in final if m.get("loss") is not None), None),
        "last_loss": next((m["loss"] for m in reversed(final) if m.get("loss") is not None), None),
        "tokens_per_second": _mean([m.get("tokens_per_second") for m in final]),
        "seconds_per_step": _mean([m.get("time_step") for m in final[1:] or final]),  # step 1 warms up
        "sync_seconds_mean": _mean([m.get("time_sync") for m in final]),
    }


def ends(lines: list[dict[str, Any]], key: str, *, name: str | None = None) -> dict[str, Any]:
    """`key` over the steps: first_<name>, last_<name>, <name>_first_steps_mean, <name>_last_steps_mean (3 steps)."""
    values = [m[key] for m in lines if m.get(key) is not None]
    name = name or key
    head, tail = values[:3], values[-3:]
    return {f"first_{name}": values[0] if values else None, f"last_{name}": values[-1] if values else None,
            f"{name}_first_steps_mean": sum(head) / len(head) if head else None,
            f"{name}_last_steps_mean": sum(tail) / len(tail) if tail else None}


def publish(run: Any, out: storage.Location, *, base_dir: Path) -> dict[str, Any]:
    """The trained policy, written by learner rank 0 straight to the output (with the tokenizer's files):
    `adapter/` for LoRA, `model/` for full fine-tuning, both with `mergeAdapter`."""
    import ray

    with tempfile.TemporaryDirectory(prefix="posttrain-tokenizer-") as tmp:
        run.tokenizer.save_pretrained(tmp)
        tokenizer_files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

    def write(dest: storage.Location, *, merge: bool, kind: str) -> str:
        # posttrain.json names the base, so that a later job can load an adapter with it (ptj://<job>).
        files = {**tokenizer_files, "posttrain.json": provenance(kind=kind, model=run.spec.model, base=base_dir)}
        return ray.get([w.save_pretrained.remote(dest.address, merge=merge, extra_files=files)
                        for w in run.learners])[0]

    if run.is_lora:
        write(out.child("adapter"), merge=False, kind="adapter")
        if not run.spec.output.merge_adapter:
            return {"kind": "adapter", "path": out.child("adapter").uri}
        write(out.child("model"), merge=True, kind="merged-model")
        return {"kind": "model", "path": out.child("model").uri, "adapter_path": out.child("adapter").uri}
    write(out.child("model"), merge=False, kind="model")
    return {"kind": "model", "path": out.child("model").uri}


def unwrap(exc: BaseException) -> BaseException:
    """The error an actor raised (a reward's RewardError, ...) rather than Ray's wrapper around it."""
    from ray.exceptions import RayTaskError

    cause = exc.cause if isinstance(exc, RayTaskError) else None
    return cause if isinstance(cause, BaseException) else exc


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 4) if present else None
