"""`algorithm: sft` (supervised fine-tuning, incl. chain-of-thought data), and through the same path `dpo`,
`kto` and `reward`: a TRL trainer on Ray Train's TorchTrainer.

    posttrain run examples/sft-lora.yaml --output out/
    posttrain run examples/dpo-lora.yaml --output out/

The driver side: read the data (`data.build` tokenizes SFT examples; `preference_data` checks and
normalizes preference records, which TRL tokenizes; bad input fails before anything is written),
start `roles.trainer` as Ray Train workers running the algorithm's TRL trainer
(`sft_worker.train_loop` with `methods.METHODS`: DDP over gloo on CPU, FSDP on several GPUs), which read
the rows from the run's output where the driver wrote them once (`prepared`), not from their config, and
turn the workers' events (logs, evaluations, checkpoints, the saved result) into the run's metrics,
progress and summary through the context.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from posttrain.api import runtime
from posttrain.jobs import data as data_mod
from posttrain.jobs import preference_data
from posttrain.jobs.algorithms import prepared
from posttrain.jobs.algorithms.methods import EVALUATED, LOGGED, METHODS, flat_metrics
from posttrain.jobs.algorithms.evaluate import after_training, training_preflight
from posttrain.jobs.run import storage
from posttrain.jobs.run.context import RunContext


def run(ctx: RunContext, *, teacher: Any = None) -> dict[str, Any]:
    """`teacher` (distill): checks the teacher before anything is written (`check(ctx, tokenizer)`), adds its
    scores to the data once Ray is up (`attach(ctx, cfg)`), and adds to the summary (`summary()`)."""
    spec = ctx.spec
    ctx.prepare()
    tokenizer = ctx.tokenizer()
    if METHODS[spec.algorithm.value].data == "preference":
        train_ds, eval_ds, stats = preference_data.build_preference(spec.data, algorithm=spec.algorithm.value,
                                                                    seed=spec.training.seed, base=ctx.base_dir)
    else:
        train_ds, eval_ds, stats = data_mod.build(spec.data, tokenizer, seed=spec.training.seed,
                                                  max_len=spec.training.max_seq_length, base=ctx.base_dir)
    evaluation = training_preflight(ctx)  # spec.evaluation's models and prompts, before anything is written
    if teacher is not None:
        teacher.check(ctx, tokenizer)

    def history(folder: storage.Location) -> list[dict[str, Any]]:  # HF's own log of the checkpoint's steps
        return ctx.ckpts.read_json(folder, "trainer_state.json").get("log_history", [])

    resume = ctx.begin(total_steps=spec.training.max_steps, history_of=history, summary={
        "workers": spec.trainer_workers(),
        "data": {"train_examples": stats.train_examples, "eval_examples": stats.eval_examples,
                 "truncated": stats.truncated, "dropped": stats.dropped, "sets": stats.sets,
                 **({"bad": stats.bad} if stats.bad else {})},
    })
    losses = [m["loss"] for m in ctx.history if m.get("loss") is not None]
    relay = Relay(ctx, first_loss=losses[0] if losses else None)
    cfg = {
        "spec": spec.wire(),
        "base_dir": str(ctx.base_dir),
        "train": train_ds,
        "eval": eval_ds,
        "checkpoints": ctx.ckpts.root.address,
        "output": ctx.folder.loc.address,
        "resume_step": resume[1] if resume else None,
        "torch_threads": (max(1, int(per_worker)) if (per_worker := cpus_per_worker(spec.roles.trainer))
                          else default_torch_threads(spec.trainer_workers())),
    }
    error: BaseException | None = None
    try:
        with ctx.ray():
            if teacher is not None:
                teacher.attach(ctx, cfg)
            cfg = prepared.publish(ctx.folder.loc, cfg)  # the workers read the rows there, not from cfg
            fit(spec, cfg, relay, poll_seconds=ctx.opts.poll_seconds)
            after_training(ctx, evaluation)
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised
        error = exc
    final = ctx.metrics_lines()
    runtime_s = relay.train_metrics.get("train_runtime")
    tokens = ctx.state.tokens_seen
    return ctx.finish(
        error,
        train_seconds=runtime_s,
        train_tokens=tokens,
        tokens_per_second=round(tokens / runtime_s, 2) if runtime_s and tokens else ctx.state.tokens_per_second,
        first_loss=relay.first_loss,
        last_loss=next((m["loss"] for m in reversed(final) if m.get("loss") is not None), None),
        **evaluations(ctx.run_info, relay.after if eval_ds is not None and not error else {}),
        **(teacher.summary() if teacher is not None else {}),
    )


def evaluations(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The summary's eval_<name>_before/_after: eval_loss always (None when not measured), the rest when measured.

    >>> evaluations({"eval_loss_before": 2.0, "eval_rewards_accuracy_before": 0.5}, {"eval_loss": 1.0})
    {'eval_loss_before': 2.0, 'eval_loss_after': 1.0, 'eval_rewards_accuracy_before': 0.5, 'eval_rewards_accuracy_after': None}
    """
    out: dict[str, Any] = {}
    for name in EVALUATED:
        key = f"eval_{name}"
        if name == "loss" or f"{key}_before" in before or key in after:
            out[f"{key}_before"], out[f"{key}_after"] = before.get(f"{key}_before"), after.get(key)
    return out


class Relay:
    """Applies the events SFT's rank 0 pushes (through the tracker actor) to the run context."""

    def __init__(self, ctx: RunContext, first_loss: float | None) -> None:
        self.ctx, self.first_loss = ctx, first_loss
        self.train_metrics: dict[str, Any] = {}
        self.after: dict[str, Any] = {}  # the evaluation after training

    def __call__(self, event: dict[str, Any]) -> None:
        ctx, kind = self.ctx, event["type"]
        if kind == "begin":
            ctx.state.total_steps, ctx.state.step = event["max_steps"], event["step"]
            ctx.phase("training")
        elif kind == "phase":
            ctx.phase(event["phase"])
        elif kind == "log":
            step, logs = event["step"], flat_metrics(event)
            # a training step's values; the Trainer's closing log (train_runtime, epoch, no loss) is not a step
            values = {k: logs[k] for k in LOGGED if k in logs} if "loss" in logs else {}
            if "loss" in logs and self.first_loss is None:
                self.first_loss = logs["loss"]
            if "eval_loss" in logs and step > 0:  # the evaluation before training goes to run.json instead
                values.update({f"eval_{k}": logs[f"eval_{k}"] for k in EVALUATED if f"eval_{k}" in logs})
            if values:
                ctx.log(step, values, flush=False)  # evaluations of the same step join its line
        elif kind == "eval_before":
            found = {k: v for k, v in event.items() if k.startswith("eval_")}
            ctx.state.eval_loss = found.get("eval_loss")
            ctx.state.preference.update({k: v for k, v in found.items() if k != "eval_loss"})
            ctx.record(**{f"{k}_before": v for k, v in found.items()})
            ctx.event("eval_before", **found)
        elif kind == "eval_after":
            self.after = {k: v for k, v in event.items() if k.startswith("eval_")}
            ctx.log(event["step"], self.after, flush=False, announce=False)
            ctx.event("eval_after", step=event["step"], **self.after)
        elif kind == "checkpoint":
            ctx.checkpoint_saved(event["step"], event["path"])
        elif kind == "train_done":
            self.train_metrics.update(event["metrics"])
            ctx.state.step = event["step"]
        elif kind == "saved":
            ctx.saved(**{k: v for k, v in event.items() if k != "type"})


def cpus_per_worker(role: Any) -> float | None:
    """A replica's CPUs shared among its workers (one per GPU), or None when the spec sets none."""
    return role.cpus / max(1, role.gpus) if role.cpus else None


def default_torch_threads(workers: int) -> int:
    """Threads per worker so that workers x threads fills this machine's cores, not more."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def scaling(spec: Any, role_name: str):
    """Ray Train workers of a role: one per GPU of each replica (one per replica on CPU).

    In a RayJob built by the operator (POSTTRAIN_PLACEMENT=roles) each worker also asks for
    one unit of its role's custom resource, which only that role's worker group offers.
    """
    from ray.train import ScalingConfig

    role = getattr(spec.roles, role_name)
    resources: dict[str, float] = {"CPU": cpus_per_worker(role) or 1}
    if role.gpus:
        resources["GPU"] = 1
    if os.environ.get(runtime.PLACEMENT_ENV) == runtime.PLACEMENT_ROLES:
        resources[runtime.ray_resource(role_name)] = 1
    return ScalingConfig(num_workers=role.replicas * max(1, role.gpus), use_gpu=role.gpus > 0,
                         resources_per_worker=resources)


def fit(spec: Any, cfg: dict[str, Any], relay: Relay, *, poll_seconds: float) -> None:
    """Run the TorchTrainer on the Ray the context joined, relaying worker events while it trains."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from posttrain.jobs.algorithms.sft_worker import train_loop
    from posttrain.jobs.run.progress import tracker_actor

    tracker = tracker_actor().remote()
    cfg["tracker"] = tracker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=cfg,
        scaling_config=scaling(spec, "trainer"),
        run_config=RunConfig(
            name=f"posttrain-{spec.algorithm.value}",
            storage_path=str(storage.cache_root() / "ray-train"),  # Ray Train's own files, not ours
            failure_config=FailureConfig(max_failures=0),  # restarts belong to the operator, with resume
        ),
    )
    done = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=target, name="posttrain-fit", daemon=True)
    thread.start()
    try:
        while not done.wait(poll_seconds):
            for event in ray.get(tracker.drain.remote()):
                relay(event)
        for event in ray.get(tracker.drain.remote()):
            relay(event)
    finally:
        ray.kill(tracker)
    if failure:
        raise failure[0]
