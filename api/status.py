"""The `PostTrainingJob` status: phases, conditions and progress.

The vocabulary lives here once; the operator writes it, `kubectl get ptj`
and Grafana read it.
"""

from __future__ import annotations

from enum import Enum

from pydantic import Field

from posttrain.api.spec import ApiModel


class Phase(str, Enum):
    pending = "Pending"
    provisioning = "Provisioning"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    suspended = "Suspended"

    def is_terminal(self) -> bool:
        return self in (Phase.succeeded, Phase.failed)


class Condition(ApiModel):
    type: str = Field(description="Condition type, e.g. Ready, Progressing, Failed.")
    status: str = Field(description="True, False or Unknown.")
    reason: str = Field(description="CamelCase reason, e.g. InvalidSpec, RestartsExhausted.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str | None = Field(None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="The spec generation this condition was computed from.")


class Progress(ApiModel):
    step: int = Field(0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, description="Steps the job will run.")
    loss: float | None = Field(None, description="Latest training loss.")
    reward: float | None = Field(None, description="Latest mean reward (RL algorithms).")
    score: float | None = Field(None, description="Latest evaluation score (evaluate: the last model and method).")
    tokens_per_second: float | None = Field(None, description="Training throughput.")
    rewards_accuracy: float | None = Field(
        None, description="dpo, kto, reward: fraction of the latest step's pairs whose chosen completion out-scores "
        "the rejected one.")
    rewards_margin: float | None = Field(
        None, description="dpo, kto, reward: mean reward margin, chosen minus rejected, of the latest step.")
    eval_rewards_accuracy: float | None = Field(
        None, description="dpo, reward: preference (pairwise) accuracy on the evaluation pairs, latest evaluation.")
    evaluation: dict[str, dict[str, float]] | None = Field(
        None, description="Evaluation scores, model -> method -> score (at the largest N): an evaluate job's "
        "models, or a training job's spec.evaluation on `base` and `trained` (before and after training).")


class PostTrainingJobStatus(ApiModel):
    phase: Phase | None = Field(None, description="Pending, Provisioning, Running, Succeeded, Failed or Suspended.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations, with reasons.")
    observed_generation: int | None = Field(None, description="The spec generation the status reflects.")
    ray_job: str | None = Field(None, description="Name of the current RayJob (`<job>-r<restart>`).")
    start_time: str | None = Field(None, description="When the job started running.")
    completion_time: str | None = Field(None, description="When the job reached Succeeded or Failed.")
    restarts: int = Field(0, description="RayJobs replaced after a failure.")
    last_checkpoint: str | None = Field(None, description="URI of the newest complete checkpoint.")
    progress: Progress | None = Field(None, description="Progress read from the job's driver.")
    last_progress_time: str | None = Field(
        None, description="When the step last advanced in the current Running run (spec.progressDeadlineSeconds).")
    spec_hash: str | None = Field(
        None, description="Hash of the spec the job started with, as written to its spec ConfigMap.")
