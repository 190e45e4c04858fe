"""The driver: one program that runs a PostTrainingJob on Ray, locally or in a RayJob.

    posttrain run examples/sft-lora.yaml --output out/      # embedded Ray on this machine
    python -m posttrain.jobs --spec /etc/posttrain/job.yaml # inside the RayJob's head pod

Order of work, so that bad input costs nothing: validate the spec, check the
output folder, resolve the model, read and tokenize the data; only then write
into the output, start Ray and train. Checkpoints resume automatically.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posttrain.api import runtime
from posttrain.api.spec import PostTrainingJob
from posttrain.jobs import data as data_mod
from posttrain.jobs import models, outputs, sft, storage
from posttrain.jobs.checkpoints import Checkpoints
from posttrain.jobs.progress import Metrics, ProgressServer, RunState

log = logging.getLogger("posttrain")


class RunFailed(RuntimeError):
    """Training itself failed; summary.json says why and checkpoints are kept."""


@dataclass
class RunOptions:
    output: str | None = None  # overrides spec.output.uri
    base_dir: Path = field(default_factory=Path.cwd)  # relative paths in the spec are relative to this
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    overwrite: bool = False
    ray_address: str | None = None
    on_event: Callable[[RunState, dict[str, Any]], None] | None = None  # progress display hook
    poll_seconds: float = 0.5
    local_cpus: int = 8  # logical CPUs of an embedded Ray at least (RL roles hold one each)


def output_location(job: PostTrainingJob, opts: RunOptions) -> storage.Location:
    uri = opts.output or job.spec.output.uri or f"posttrain-output/{job.metadata.name}"
    return storage.resolve(uri, base=opts.base_dir if opts.output is None else Path.cwd())


def checkpoint_location(job: PostTrainingJob, out: storage.Location, opts: RunOptions) -> storage.Location:
    """`spec.checkpoint.uri`, or `checkpoints/` inside the output (a path, a PVC or object storage)."""
    uri = job.spec.checkpoint.uri
    if uri is None:
        return out.child("checkpoints")
    loc = storage.resolve(uri, base=opts.base_dir)
    if loc.is_hub:
        raise ValueError(f"spec.checkpoint.uri: {uri} is a hub reference; checkpoints go to a path, pvc:// or s3://")
    return loc


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("posttrain", "torch", "transformers", "trl", "peft", "ray", "datasets", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def run(job: PostTrainingJob, opts: RunOptions) -> dict[str, Any]:
    """Run one job to the end; returns the summary (also written to summary.json)."""
    if job.spec.algorithm.is_rl():
        from posttrain.jobs.rl.loop import run_rl

        return run_rl(job, opts)
    spec = job.spec
    started = time.time()
    folder = outputs.RunFolder(output_location(job, opts))
    state_of_folder = folder.prepare(overwrite=opts.overwrite)
    ckpts = Checkpoints(checkpoint_location(job, folder.loc, opts))

    # Everything that can fail on bad input happens before the first write. The head only needs the
    # tokenizer (the workers materialise the model on their own pods).
    tok_spec = spec.model.model_copy(update={"source": spec.model.tokenizer}) if spec.model.tokenizer else spec.model
    tok_source = models.materialize(tok_spec, base=opts.base_dir, weights=False)
    tokenizer = models.load_tokenizer(tok_source, revision=models.hub_revision(tok_spec),
                                      trust_remote_code=spec.model.trust_remote_code)
    train_ds, eval_ds, data_stats = data_mod.build(spec.data, tokenizer, seed=spec.training.seed,
                                                   max_len=spec.training.max_seq_length, base=opts.base_dir)

    if state_of_folder == "finished":  # --overwrite was given
        folder.clear()
    folder.pull()
    folder.work.mkdir(parents=True, exist_ok=True)
    run_file = folder.path(outputs.RUN_FILE)
    resume = ckpts.latest()
    resume_step = resume[1] if resume else 0
    run_info = outputs.read_json(run_file) if resume else {}
    run_info.update({"job": job.metadata.name, "spec": spec.wire()})
    outputs.write_json(run_file, run_info)
    log_history = ckpts.read_json(resume[0], "trainer_state.json").get("log_history", []) if resume else []
    history = outputs.restore_metrics(folder.path(outputs.METRICS_FILE), after_step=resume_step,
                                      log_history=log_history)
    folder.push()

    state = RunState(job=job.metadata.name, algorithm=spec.algorithm.value, step=resume_step,
                     total_steps=spec.training.max_steps)
    metrics = Metrics(state)
    server = ProgressServer(metrics, opts.metrics_port, opts.metrics_host) if opts.metrics_port is not None else None
    if server:
        log.info("serving /metrics and /progress on port %d", server.port)
    writer = outputs.MetricsWriter(folder.path(outputs.METRICS_FILE))
    summary: dict[str, Any] = {
        "status": "running",
        "job": job.metadata.name,
        "algorithm": spec.algorithm.value,
        "model": spec.model.source,
        "adapter": spec.adapter.type.value,
        "workers": spec.trainer_workers(),
        "resumed_from_step": resume_step or None,
        "data": {"train_examples": data_stats.train_examples, "eval_examples": data_stats.eval_examples,
                 "truncated": data_stats.truncated, "dropped": data_stats.dropped, "sets": data_stats.sets},
        "output": folder.loc.uri,
        "checkpoint_dir": ckpts.root.uri,
        "versions": versions(),
    }
    losses = [m["loss"] for m in history if m.get("loss") is not None]
    first_loss = losses[0] if losses else None
    train_metrics: dict[str, Any] = {}
    artifact: dict[str, Any] = {}

    def apply(event: dict[str, Any]) -> None:
        nonlocal first_loss
        kind = event["type"]
        new_ckpt = 0
        if kind == "begin":
            state.total_steps, state.step = event["max_steps"], event["step"]
            state.phase = "training"
        elif kind == "phase":
            state.phase = event["phase"]
        elif kind == "log":
            step = event["step"]
            state.step = step
            if "loss" in event:
                state.loss = event["loss"]
                first_loss = first_loss if first_loss is not None else event["loss"]
                state.learning_rate = event.get("learning_rate", state.learning_rate)
                state.grad_norm = event.get("grad_norm", state.grad_norm)
                state.tokens_per_second = event.get("tokens_per_second", state.tokens_per_second)
                state.tokens_seen = event.get("tokens_seen", state.tokens_seen)
                keep = ("loss", "grad_norm", "learning_rate", "epoch", "tokens_per_second", "tokens_seen")
                writer.add(step, {k: event[k] for k in keep if k in event})
            if "eval_loss" in event:
                state.eval_loss = event["eval_loss"]
                if step > 0:  # the evaluation before training goes to summary.json, not to a step line
                    writer.add(step, {"eval_loss": event["eval_loss"]})
        elif kind == "eval_before":
            state.eval_loss = event["eval_loss"]
            run_info["eval_loss_before"] = event["eval_loss"]
            outputs.write_json(run_file, run_info)
        elif kind == "eval_after":
            state.eval_loss = event["eval_loss"]
            writer.add(event["step"], {"eval_loss": event["eval_loss"]})
        elif kind == "checkpoint":
            writer.flush()  # metrics up to a checkpoint are stored before it counts
            folder.push(outputs.METRICS_FILE, outputs.RUN_FILE)
            state.last_checkpoint = event["path"]
            state.checkpoints_saved += 1
            new_ckpt = 1
        elif kind == "train_done":
            train_metrics.update(event["metrics"])
            state.step = event["step"]
        elif kind == "saved":
            artifact.update({k: v for k, v in event.items() if k != "type"})
        metrics.refresh(new_checkpoints=new_ckpt)
        if opts.on_event:
            opts.on_event(state, event)

    cfg = {
        "spec": spec.wire(),
        "base_dir": str(opts.base_dir),
        "train": train_ds,
        "eval": eval_ds,
        "checkpoints": ckpts.root.address,
        "output": folder.loc.address,
        "resume_step": resume_step or None,
        "torch_threads": (max(1, int(per_worker)) if (per_worker := cpus_per_worker(spec.roles.trainer))
                          else sft.default_torch_threads(spec.trainer_workers())),
    }
    if resume:
        log.info("resuming from %s (step %d)", resume[0], resume_step)
    if opts.on_event:
        opts.on_event(state, {"type": "resume" if resume else "start", "step": resume_step})
    error: BaseException | None = None
    try:
        _fit(spec, cfg, apply, opts)
    except BaseException as exc:  # noqa: BLE001 - recorded in summary.json, then re-raised
        error = exc
    finally:
        writer.flush()
        if server:
            server.close()

    final = outputs.read_metrics(folder.path(outputs.METRICS_FILE))
    newest = ckpts.latest()
    last_loss = next((m["loss"] for m in reversed(final) if m.get("loss") is not None), None)
    runtime = train_metrics.get("train_runtime")
    tokens = state.tokens_seen
    summary.update(
        {
            "status": "failed" if error else "succeeded",
            "steps": state.step,
            "total_steps": state.total_steps,
            "wall_seconds": round(time.time() - started, 2),
            "train_seconds": runtime,
            "train_tokens": tokens,
            "tokens_per_second": round(tokens / runtime, 2) if runtime and tokens else state.tokens_per_second,
            "first_loss": first_loss,
            "last_loss": last_loss,
            "eval_loss_before": run_info.get("eval_loss_before"),
            "eval_loss_after": state.eval_loss if eval_ds is not None and not error else None,
            "last_checkpoint": newest[0].uri if newest else None,
            "artifact": artifact or None,
        }
    )
    return finish(summary, error, state, metrics, folder)


def finish(summary: dict[str, Any], error: BaseException | None, state: RunState, metrics: Metrics,
           folder: outputs.RunFolder) -> dict[str, Any]:
    """The end of every run: summary.json (with the error, if any), the final phase, the upload of the
    driver's files; then re-raise a failure as RunFailed (Ctrl-C stays KeyboardInterrupt)."""
    if error:
        summary["error"] = f"{type(error).__name__}: {error}"
    state.phase = "failed" if error else "succeeded"
    metrics.refresh()
    outputs.write_json(folder.path(outputs.SUMMARY_FILE), summary)
    folder.push()
    if error:
        if isinstance(error, KeyboardInterrupt):
            raise error
        raise RunFailed(summary["error"]) from error
    return summary


def cpus_per_worker(role: Any) -> float | None:
    """A replica's CPUs shared among its workers (one per GPU), or None when the spec sets none."""
    return role.cpus / max(1, role.gpus) if role.cpus else None


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


def ensure_ray(opts: RunOptions) -> bool:
    """Join Ray (RAY_ADDRESS / --ray-address) or start an embedded one; True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = opts.ray_address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, log_to_driver=os.environ.get("POSTTRAIN_RAY_LOGS") == "1",
             include_dashboard=False, logging_level=logging.WARNING,
             # embedded: logical CPUs as many as the roles ask for; their phases mostly take turns
             **({} if address else {"num_cpus": max(os.cpu_count() or 1, opts.local_cpus)}))
    return True


def _fit(spec: Any, cfg: dict[str, Any], apply: Callable[[dict[str, Any]], None], opts: RunOptions) -> None:
    """Start (or join) Ray, run the TorchTrainer, and relay worker events while it trains."""
    import ray
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from posttrain.jobs.progress import tracker_actor

    started_ray = ensure_ray(opts)
    tracker = tracker_actor().remote()
    cfg["tracker"] = tracker
    trainer = TorchTrainer(
        sft.train_loop,
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
        while not done.wait(opts.poll_seconds):
            for event in ray.get(tracker.drain.remote()):
                apply(event)
        for event in ray.get(tracker.drain.remote()):
            apply(event)
    finally:
        ray.kill(tracker)
        if started_ray:
            ray.shutdown()
    if failure:
        raise failure[0]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "urllib3", "filelock", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
