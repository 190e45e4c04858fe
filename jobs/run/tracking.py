"""Experiment trackers: one sink interface, fed by the run context for every algorithm.

    trackers = build(spec.tracking, job=job, output=folder)   # the sinks the spec turns on
    trackers.start(job, resumed_from=None)                     # config (the resolved spec) and tags
    trackers.log(step, {"loss": 0.4, "reward_mean": 0.6})      # each step's numeric values
    trackers.finish(summary, artifact={"kind": "adapter", "path": ".../adapter"})

Sinks, each through its own library: MLflow (`mlflow-skinny`; a tracking server URI, or by
default a local file store in the output's `mlruns/`), TensorBoard event files
(`torch.utils.tensorboard`; by default the output's `tensorboard/`) and Weights & Biases (where
`wandb` is installed; offline unless the spec says online). Local files go to the driver's working
copy of the output and are uploaded with it when the output is object storage. A new algorithm
gets all of them by logging through `RunContext.log`; a new tracker is one `Sink` subclass and
one line in `build`.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.jobs.run import storage

if TYPE_CHECKING:
    from posttrain.api.spec import PostTrainingJob
    from posttrain.api.tracking import TrackingSpec
    from posttrain.jobs.run.outputs import RunFolder

log = logging.getLogger(__name__)


class TrackingError(ValueError):
    """A tracker the spec asks for cannot run here; the message names the spec field."""


class Sink:
    """One tracker. Every method is called on the driver; failures are logged, never fatal to the run."""

    name = "sink"

    def start(self, job: PostTrainingJob, resumed_from: int | None) -> None: ...

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, Any], artifact: dict[str, Any] | None) -> None: ...


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """A nested spec as flat `a.b.c` parameters."""
    if isinstance(value, dict):
        for key, item in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list) else value
    return out


class MlflowSink(Sink):
    name = "mlflow"

    def __init__(self, uri: str, experiment: str, log_artifacts: bool) -> None:
        if uri.startswith("file:"):
            # MLflow 3 keeps the file store in maintenance mode behind this switch; it is the local default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import mlflow

        self.mlflow, self.uri, self.experiment, self.log_artifacts = mlflow, uri, experiment, log_artifacts
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.run_id: str | None = None

    def start(self, job: PostTrainingJob, resumed_from: int | None) -> None:
        exp = self.client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        tags = {"posttrain.job": job.metadata.name, "posttrain.algorithm": job.spec.algorithm.value}
        if resumed_from:
            tags["posttrain.resumed_from_step"] = str(resumed_from)
        self.run_id = self.client.create_run(exp_id, run_name=job.metadata.name, tags=tags).info.run_id
        params = _flat("", job.spec.wire(), {})
        self.client.log_batch(self.run_id, params=[self.mlflow.entities.Param(k, str(v)[:6000])
                                                   for k, v in sorted(params.items())])

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        now = int(time.time() * 1000)
        metrics = [self.mlflow.entities.Metric(k, float(v), now, step) for k, v in values.items() if k != "step"]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, summary: dict[str, Any], artifact: dict[str, Any] | None) -> None:
        for key in ("first_loss", "last_loss", "eval_loss_before", "eval_loss_after", "reward_first_steps_mean",
                    "reward_last_steps_mean", "wall_seconds"):
            if isinstance(summary.get(key), (int, float)):
                self.client.log_metric(self.run_id, f"summary.{key}", float(summary[key]))
        path = (artifact or {}).get("path")
        if self.log_artifacts and path and summary.get("status") == "succeeded":
            local = storage.fetch(storage.resolve(path))  # object storage: a copy on this pod first
            self.client.log_artifacts(self.run_id, str(local), artifact_path=Path(path).name)
        self.client.set_terminated(self.run_id, status="FINISHED" if summary.get("status") == "succeeded" else "FAILED")


class TensorBoardSink(Sink):
    name = "tensorboard"

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def start(self, job: PostTrainingJob, resumed_from: int | None) -> None:
        self.writer.add_text("spec", "```\n" + json.dumps(job.spec.wire(), indent=2) + "\n```", global_step=0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            if key != "step":
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def finish(self, summary: dict[str, Any], artifact: dict[str, Any] | None) -> None:
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=2, default=str) + "\n```",
                             global_step=int(summary.get("steps") or 0))
        self.writer.close()


class WandbSink(Sink):
    name = "wandb"

    def __init__(self, project: str, entity: str | None, mode: str, directory: Path) -> None:
        import wandb

        self.wandb, self.args = wandb, {"project": project, "entity": entity, "mode": mode, "dir": str(directory)}
        self.run: Any = None

    def start(self, job: PostTrainingJob, resumed_from: int | None) -> None:
        self.run = self.wandb.init(name=job.metadata.name, config=job.spec.wire(), **self.args)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log({k: v for k, v in values.items() if k != "step"}, step=step)

    def finish(self, summary: dict[str, Any], artifact: dict[str, Any] | None) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish(exit_code=0 if summary.get("status") == "succeeded" else 1)


class Trackers:
    """Every sink of a run, called together; a sink that fails is logged and dropped, the run goes on."""

    def __init__(self, sinks: list[Sink], output: RunFolder | None = None, local_dirs: tuple[str, ...] = ()) -> None:
        self.sinks, self.output, self.local_dirs = sinks, output, local_dirs

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sinks]

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracker must never cost the training run
                log.warning("tracker %s failed in %s (%s: %s); it is switched off for this run",
                            sink.name, method, type(exc).__name__, exc)
                self.sinks.remove(sink)

    def start(self, job: PostTrainingJob, resumed_from: int | None = None) -> None:
        self._each("start", job, resumed_from)

    def log(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._each("log", step, values)

    def finish(self, summary: dict[str, Any], artifact: dict[str, Any] | None = None) -> None:
        self._each("finish", summary, artifact)
        if self.output is not None and self.output.loc.is_remote:  # local trackers' files go with the output
            for name in self.local_dirs:
                if (self.output.work / name).is_dir():
                    storage.upload_tree(self.output.work / name, self.output.loc.child(name))


def check(spec: TrackingSpec) -> None:
    """Refuse, before anything is written, a tracker whose library is not installed."""
    needs = {"mlflow": ("mlflow", "pip install 'posttrain[tracking]'"),
             "tensorboard": ("tensorboard", "pip install 'posttrain[tracking]'"),
             "wandb": ("wandb", "pip install wandb")}
    for field, (module, fix) in needs.items():
        if getattr(spec, field) is not None and importlib.util.find_spec(module) is None:
            raise TrackingError(f"spec.tracking.{field}: the {module} package is not installed here ({fix}), "
                                f"or remove spec.tracking.{field}")


def build(spec: TrackingSpec, *, job: PostTrainingJob, output: RunFolder) -> Trackers:
    """The sinks `spec` turns on, writing local files into the output's working copy."""
    check(spec)
    sinks: list[Sink] = []
    local: list[str] = []
    if spec.mlflow is not None:
        uri = spec.mlflow.tracking_uri or (output.work / "mlruns").resolve().as_uri()
        if spec.mlflow.tracking_uri is None:
            local.append("mlruns")
        sinks.append(MlflowSink(uri, spec.mlflow.experiment or job.metadata.name, spec.mlflow.log_artifacts))
    if spec.tensorboard is not None:
        if spec.tensorboard.log_dir:
            log_dir = storage.resolve(spec.tensorboard.log_dir).local
            if log_dir is None:
                raise TrackingError("spec.tracking.tensorboard.logDir: give a path or pvc:// (event files are "
                                    "written locally); leave it out to write them with the output")
        else:
            log_dir = output.work / "tensorboard"
            local.append("tensorboard")
        sinks.append(TensorBoardSink(log_dir))
    if spec.wandb is not None:
        sinks.append(WandbSink(spec.wandb.project, spec.wandb.entity, spec.wandb.mode, output.work))
    return Trackers(sinks, output, tuple(local))
