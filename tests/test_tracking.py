"""Experiment trackers through the run context: a job's metrics, config and result in MLflow and TensorBoard.

    pytest -m slow tests/test_tracking.py

Both are read back with their own libraries: MLflow's client over the run's local file store,
TensorBoard's event reader over the event files.
"""

from __future__ import annotations

import pytest

from posttrain.api.load import parse_job
from posttrain.api.tracking import TrackingSpec
from posttrain.jobs import driver
from posttrain.jobs.run import outputs, storage, tracking
from support import jobs


@pytest.fixture
def workdir(tmp_path, tiny_model, tiny_train, cache_dir):
    (tmp_path / "model").symlink_to(tiny_model)
    (tmp_path / "train.jsonl").symlink_to(tiny_train)
    return tmp_path


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_an_sft_run_logs_to_mlflow_and_tensorboard(workdir):
    from mlflow import MlflowClient

    doc = jobs.document("sft", name="tracked", adapter=jobs.LORA, tracking={"mlflow": {}, "tensorboard": {}})
    doc["spec"]["training"]["maxSteps"] = 3
    summary = driver.run(parse_job(doc), driver.RunOptions(output=str(workdir / "out"), base_dir=workdir))
    out = workdir / "out"
    losses = [(m["step"], m["loss"]) for m in outputs.read_metrics(out / "metrics.jsonl")]
    assert [s for s, _ in losses] == [1, 2, 3]

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("tracked")
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["posttrain.algorithm"] == "sft"
    assert run.data.params["algorithm"] == "sft" and run.data.params["adapter.type"] == "lora"
    assert run.data.params["training.maxSteps"] == "3"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    assert [s for s, _ in history] == [1, 2, 3] and [v for _, v in history] == pytest.approx([v for _, v in losses])
    assert run.data.metrics["summary.last_loss"] == pytest.approx(summary["last_loss"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in artifacts  # the trained adapter, logged as the run's artifact

    scalars = tensorboard_scalars(out / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss"]] == pytest.approx([v for _, v in losses])
    assert {"learning_rate", "grad_norm"} <= set(scalars)


def test_a_tracker_whose_library_is_missing_is_refused_before_anything_is_written(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(tracking.TrackingError, match=r"spec.tracking.wandb: the wandb package is not installed"):
        tracking.check(TrackingSpec.model_validate({"wandb": {"project": "p"}}))
    tracking.check(TrackingSpec.model_validate({"mlflow": {}, "tensorboard": {}}))  # installed by make test


def test_a_failing_tracker_is_switched_off_and_the_run_goes_on(tmp_path, caplog):
    class Broken(tracking.Sink):
        name = "broken"

        def log(self, step, values):
            raise ConnectionError("tracking server down")

    seen = []

    class Recorder(tracking.Sink):
        name = "recorder"

        def log(self, step, values):
            seen.append((step, values))

    trackers = tracking.Trackers([Broken(), Recorder()], outputs.RunFolder(storage.resolve(str(tmp_path))))
    trackers.log(1, {"loss": 1.0})
    trackers.log(2, {"loss": 0.5})
    assert trackers.names == ["recorder"] and seen == [(1, {"loss": 1.0}), (2, {"loss": 0.5})]
    assert "tracker broken failed in log (ConnectionError: tracking server down)" in caplog.text
