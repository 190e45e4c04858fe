"""`spec.tracking`: experiment trackers that receive every algorithm's metrics, config and result.

Each tracker is on when its section is present (`{}` takes the defaults) and off when absent;
metrics.jsonl and Prometheus are always on.

    >>> TrackingSpec.model_validate({"mlflow": {}}).mlflow.experiment is None
    True
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.api.base import ApiModel


class MlflowSpec(ApiModel):
    tracking_uri: str | None = Field(
        None,
        description="An MLflow tracking server (`http(s)://...`) or store URI. Default: a local file store in "
                    "`mlruns/` inside the output (uploaded with it when the output is object storage).",
    )
    experiment: str | None = Field(None, description="MLflow experiment name (default: the job's name).")
    log_artifacts: bool = Field(
        True, description="Also log the trained adapter or model folder as the run's artifacts.")


class TensorBoardSpec(ApiModel):
    log_dir: str | None = Field(
        None, description="Where event files go (a path or pvc://). Default: `tensorboard/` inside the output.")


class WandbSpec(ApiModel):
    project: str = Field(min_length=1, description="Weights & Biases project.")
    entity: str | None = Field(None, description="W&B entity (team or user).")
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline writes a local run directory (synced later with `wandb sync`); online "
                               "talks to the W&B service and needs WANDB_API_KEY from a Secret (spec.env).")


class TrackingSpec(ApiModel):
    mlflow: MlflowSpec | None = Field(None, description="Log to MLflow (needs `posttrain[tracking]`).")
    tensorboard: TensorBoardSpec | None = Field(None, description="Write TensorBoard event files.")
    wandb: WandbSpec | None = Field(None, description="Log to Weights & Biases where `wandb` is installed.")
