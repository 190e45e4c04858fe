"""The run context: everything a post-training method shares, owned once, handed to its `run(ctx)`.

An algorithm (one module under `posttrain.jobs.algorithms`) does only its own work:

    def run(ctx: RunContext) -> dict:
        ctx.prepare()                              # the output is checked; nothing is written yet
        tokenizer = ctx.tokenizer()                # spec.model.tokenizer or the model's own (no weights)
        data = ...                                 # the algorithm's own bad-input checks, still before writing
        resume = ctx.begin(total_steps=100)        # run.json, metrics.jsonl restored, /metrics, trackers
        try:
            with ctx.ray():                        # an embedded Ray, or the cluster at RAY_ADDRESS
                ... ctx.log(step, {"loss": ...}) ... ctx.checkpoint_saved(step, uri) ...
        except BaseException as exc:
            return ctx.finish(error=exc)           # summary.json with the error, uploads, re-raised as RunFailed
        return ctx.finish()

The context owns the output location and its overwrite rules (`outputs.RunFolder`), the checkpoint
location (`checkpoints.Checkpoints`), `run.json`, the live progress (`progress.RunState`, served as
`/metrics` and `/progress`), the display hook, the experiment trackers (`tracking`), Ray start and
join, the summary, and the one end-of-run path. Nothing in an algorithm imports the driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.api import runtime
from posttrain.api.spec import PostTrainingJob
from posttrain.jobs.run import outputs, storage, tracking
from posttrain.jobs.run.checkpoints import Checkpoints
from posttrain.jobs.run.progress import PREFERENCE_GAUGES, Metrics, ProgressServer, RunState

log = logging.getLogger("posttrain")

# Values of a step's line that also move the live state (and so /progress and the Prometheus gauges).
STATE_KEYS = {"loss": "loss", "reward_mean": "reward", "learning_rate": "learning_rate", "grad_norm": "grad_norm",
              "tokens_per_second": "tokens_per_second", "eval_loss": "eval_loss", "score": "score"}


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
    # At the end, how long the driver may wait for a poller of /progress (the operator, every 10 s by default)
    # to read the final phase and figures before it exits (only when one has been polling; see ProgressServer).
    progress_linger: float = 30.0
    local_cpus: int = 8  # logical CPUs of an embedded Ray at least (RL roles hold one each)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("posttrain", "torch", "transformers", "trl", "peft", "ray", "datasets", "accelerate", "vllm"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def output_location(job: PostTrainingJob, opts: RunOptions) -> storage.Location:
    """Where a run writes: `--output` (relative to the working directory), else `spec.output.uri` (relative to the
    spec's folder), else `posttrain-output/<job>` beside the spec."""
    uri = opts.output or job.spec.output.uri or f"posttrain-output/{job.metadata.name}"
    return storage.resolve(uri, base=opts.base_dir if opts.output is None else Path.cwd())


class RunContext:
    """One run of one job: see the module docstring for the order of calls."""

    def __init__(self, job: PostTrainingJob, opts: RunOptions) -> None:
        self.job, self.spec, self.opts = job, job.spec, opts
        self.base_dir = opts.base_dir
        self.started = time.time()
        self.folder = outputs.RunFolder(output_location(job, opts))
        self.ckpts = Checkpoints(self._checkpoint_location())
        self.state = RunState(job=job.metadata.name, algorithm=self.spec.algorithm.value)
        self.summary: dict[str, Any] = {}
        self.run_info: dict[str, Any] = {}
        self.metrics: Metrics | None = None
        self.server: ProgressServer | None = None
        self.writer: outputs.MetricsWriter | None = None
        self.trackers = tracking.Trackers([])
        self.artifact: dict[str, Any] = {}
        self.local_cpus: int | None = None  # the machine's CPUs when this run started an embedded Ray
        self._output_state = "fresh"

    def _checkpoint_location(self) -> storage.Location:
        """`spec.checkpoint.uri`, or `checkpoints/` inside the output (a path, a PVC or object storage)."""
        uri = self.spec.checkpoint.uri
        if uri is None:
            return self.folder.loc.child("checkpoints")
        loc = storage.resolve(uri, base=self.base_dir)
        if loc.is_hub:
            raise ValueError(f"spec.checkpoint.uri: {uri} is a hub reference; checkpoints go to a path, pvc:// or s3://")
        return loc

    # ---- before the first write --------------------------------------------------------------------

    def prepare(self) -> None:
        """Check the output (a finished run is refused without --overwrite; a foreign folder always) and that
        every tracker the spec asks for can run here."""
        self._output_state = self.folder.prepare(overwrite=self.opts.overwrite)
        tracking.check(self.spec.tracking)

    def tokenizer(self) -> Any:
        """The job's tokenizer (spec.model.tokenizer, else the model's), read without the model's weights."""
        from posttrain.jobs import models

        spec = self.spec.model
        source = spec.model_copy(update={"source": spec.tokenizer}) if spec.tokenizer else spec
        path = models.materialize(source, base=self.base_dir, weights=False)
        return models.load_tokenizer(path, revision=models.hub_revision(source),
                                     trust_remote_code=spec.trust_remote_code)

    # ---- the run ---------------------------------------------------------------------------------

    def begin(self, *, total_steps: int | None,
              history_of: Callable[[storage.Location], list[dict[str, Any]]] | None = None,
              summary: dict[str, Any] | None = None) -> tuple[storage.Location, int] | None:
        """Start writing: clear a replaced run, write run.json, keep metrics.jsonl up to the checkpoint the run
        resumes from (`history_of(folder)` rebuilds lines a killed driver never wrote), start /metrics and the
        trackers. Returns the checkpoint to resume from, or None."""
        if self._output_state == "finished":  # --overwrite was given
            self.folder.clear()
        self.folder.pull()
        self.folder.work.mkdir(parents=True, exist_ok=True)
        resume = self.ckpts.latest()
        step = resume[1] if resume else 0
        run_file = self.folder.path(outputs.RUN_FILE)
        self.run_info = outputs.read_json(run_file) if resume else {}
        self.run_info.update({"job": self.job.metadata.name, "spec": self.spec.wire()})
        outputs.write_json(run_file, self.run_info)
        history = history_of(resume[0]) if (resume and history_of) else []
        self.history = outputs.restore_metrics(self.folder.path(outputs.METRICS_FILE), after_step=step,
                                               log_history=history)
        self.folder.push()
        self.state.step, self.state.total_steps = step, total_steps
        self.metrics = Metrics(self.state)
        if self.opts.metrics_port is not None:
            self.server = ProgressServer(self.metrics, self.opts.metrics_port, self.opts.metrics_host)
            log.info("serving /metrics and /progress on port %d", self.server.port)
        self.writer = outputs.MetricsWriter(self.folder.path(outputs.METRICS_FILE))
        run_index = os.environ.get(runtime.RUN_ENV)  # set in a RayJob: which run (restart) this driver is
        self.summary = {
            "status": "running", "job": self.job.metadata.name, "algorithm": self.spec.algorithm.value,
            **({"rayjob_run": int(run_index)} if run_index and run_index.isdigit() else {}),
            "model": self.spec.model.source, "adapter": self.spec.adapter.type.value,
            "resumed_from_step": step or None, "output": self.folder.loc.uri, "checkpoint_dir": self.ckpts.root.uri,
            **(summary or {}), "versions": versions(),
        }
        self.trackers = tracking.build(self.spec.tracking, job=self.job, output=self.folder)
        self.trackers.start(self.job, resumed_from=step or None)
        if resume:
            log.info("resuming from %s (step %d)", resume[0].uri, step)
        self.event("resume" if resume else "start", step=step)
        return resume

    def event(self, kind: str, /, **fields: Any) -> None:
        """Refresh /metrics and tell the display (`posttrain run`'s progress bar) what happened."""
        if self.metrics is not None:
            self.metrics.refresh(new_checkpoints=1 if kind == "checkpoint" else 0)
        if self.opts.on_event:
            self.opts.on_event(self.state, {"type": kind, **fields})

    def phase(self, name: str) -> None:
        self.state.phase = name
        self.event("phase", phase=name)

    def log(self, step: int, values: dict[str, Any], *, flush: bool = True, announce: bool = True) -> None:
        """One step's values: a line of metrics.jsonl (merged with others of the same step), the live state,
        every tracker, and the display."""
        assert self.writer is not None, "begin() first"
        self.state.step = max(self.state.step, step)
        for key, attr in STATE_KEYS.items():
            if values.get(key) is not None:
                setattr(self.state, attr, values[key])
        if values.get("tokens_seen") is not None:
            self.state.tokens_seen = values["tokens_seen"]
        self.state.preference.update({k: v for k, v in values.items() if k in PREFERENCE_GAUGES and v is not None})
        self.writer.add(step, values)
        if flush:
            self.writer.flush()
        self.trackers.log(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})
        if announce:
            self.event("log", step=step, **values)

    def checkpoint_saved(self, step: int, uri: str) -> None:
        """A checkpoint is complete: the metrics up to it are stored with it (uploaded for object storage)."""
        assert self.writer is not None, "begin() first"
        self.writer.flush()
        self.folder.push(outputs.METRICS_FILE, outputs.RUN_FILE)
        self.state.last_checkpoint = uri
        self.state.checkpoints_saved += 1
        self.event("checkpoint", step=step, path=uri)

    def record(self, **values: Any) -> None:
        """Keep values in run.json (e.g. the eval loss measured before training)."""
        self.run_info.update(values)
        outputs.write_json(self.folder.path(outputs.RUN_FILE), self.run_info)

    def saved(self, **artifact: Any) -> None:
        """The trained result is written (`kind`, `path`, ...): the summary's `artifact`."""
        self.artifact.update(artifact)
        self.event("saved", **artifact)

    @contextlib.contextmanager
    def ray(self) -> Iterator[None]:
        """Join Ray (RAY_ADDRESS / RunOptions.ray_address) or start an embedded one for the run."""
        import ray

        started = False
        if not ray.is_initialized():
            address = self.opts.ray_address or os.environ.get("RAY_ADDRESS") or None
            ray.init(address=address, log_to_driver=os.environ.get(runtime.RAY_LOGS_ENV) == "1",
                     include_dashboard=False, logging_level=logging.WARNING,
                     # embedded: logical CPUs as many as the roles ask for; their phases mostly take turns
                     **({} if address else {"num_cpus": max(os.cpu_count() or 1, self.opts.local_cpus)}))
            started = True
            self.local_cpus = None if address else os.cpu_count()
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    # ---- the end ---------------------------------------------------------------------------------

    def metrics_lines(self) -> list[dict[str, Any]]:
        """Every line of metrics.jsonl so far (a step still being merged is written first)."""
        if self.writer is not None:
            self.writer.flush()
        return outputs.read_metrics(self.folder.path(outputs.METRICS_FILE))

    def finish(self, error: BaseException | None = None, **summary: Any) -> dict[str, Any]:
        """The end of every run: summary.json (with the error, if any), the final phase, the upload of the
        driver's files, the trackers; then re-raise a failure as RunFailed (Ctrl-C stays KeyboardInterrupt)."""
        if self.writer is not None:
            self.writer.flush()
        newest = self.ckpts.latest()
        self.summary.update({"status": "failed" if error else "succeeded", "steps": self.state.step,
                             "total_steps": self.state.total_steps,
                             "wall_seconds": round(time.time() - self.started, 2),
                             "last_checkpoint": newest[0].uri if newest else None,
                             "artifact": self.artifact or None, **summary})
        if error:
            self.summary["error"] = f"{type(error).__name__}: {error}"
        self.state.phase = "failed" if error else "succeeded"
        if self.metrics is not None:
            self.metrics.refresh()
        written = False
        try:
            outputs.write_json(self.folder.path(outputs.SUMMARY_FILE), self.summary)
            self.folder.push()
            self.trackers.finish(self.summary, artifact=self.artifact or None)
            written = True
        finally:
            # Last, and only once the results are out: the poller reads the final phase and figures.
            linger = self.opts.progress_linger if written else 0.0
            if self.server is not None and not self.server.close(linger=linger):
                log.warning("no poller read the final /progress within %.0f s", linger)
        if error:
            if isinstance(error, KeyboardInterrupt):
                raise error
            raise RunFailed(self.summary["error"]) from error
        return self.summary
