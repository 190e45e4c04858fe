"""The RL sections of a PostTrainingJob: `spec.rl` and `spec.rewards` (grpo and ppo).

Names match the runtime's registries (`posttrain.jobs.rl.algos`, `posttrain.jobs.rewards`),
so a spec value is exactly what the driver looks up.

    >>> RLSpec().loss_type, RLSpec().kl.beta
    ('grpo', 0.0)
    >>> RewardSpec(function="posttrain.jobs.rewards.builtin:exact_answer").source()
    'function'
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.api.base import ApiModel
from posttrain.api.judge import JudgeSpec


class KLSpec(ApiModel):
    beta: float = Field(
        0.0, ge=0.0, description="Coefficient of the KL penalty to the reference policy; 0 disables it and the reference."
    )
    estimator: Literal["k1", "k3"] = Field(
        "k3", description="Per-token KL estimator: k1 (log ratio) or k3 (Schulman's unbiased, non-negative)."
    )


class RLSpec(ApiModel):
    group_size: int = Field(8, ge=2, description="Completions sampled per prompt (the group GRPO normalises over).")
    prompts_per_step: int = Field(8, ge=1, description="Prompts per optimizer step; a step trains on prompts x groupSize samples.")
    max_new_tokens: int = Field(256, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold of the rollouts.")
    advantage: Literal["grpo", "dr_grpo", "rloo", "gae", "grpo_process"] | None = Field(
        None,
        description="Advantage estimator; default grpo for algorithm grpo and gae (with the critic) for ppo. "
        "grpo_process uses process rewards (one score per reasoning step).",
    )
    scale_rewards: bool = Field(True, description="Divide group-centred rewards by the group's std (grpo).")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo",
        description="Policy loss: grpo (per-sequence mean), dr_grpo (token sum over a constant length), "
        "dapo (token-level mean, asymmetric clipping).",
    )
    clip_low: float = Field(0.2, gt=0.0, lt=1.0, description="Lower clip of the probability ratio: 1 - clipLow.")
    clip_high: float | None = Field(
        None, gt=0.0, description="Upper clip: 1 + clipHigh (default: clipLow; DAPO suggests 0.28)."
    )
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's rollouts.")
    micro_batch_tokens: int | None = Field(
        None, gt=0,
        description="Token budget of a learner micro-batch: the step's rows are sorted by length and binned so "
        "that rows x longest row <= this (a longer row goes alone), instead of training.microBatchSize rows. "
        "Either way each micro-batch is cut to its own longest row, and the step's loss is that of the whole "
        "batch. Unset: training.microBatchSize rows.",
    )
    kl: KLSpec = Field(default_factory=KLSpec, description="KL penalty to the reference policy.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount of GAE (ppo).")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="Lambda of GAE (ppo).")
    value_clip: float = Field(0.2, gt=0.0, description="Clip range of the PPO value loss.")
    critic_learning_rate: float | None = Field(
        None, gt=0.0, description="Learning rate of the critic (ppo); default training.learningRate."
    )
    rollout_correction: Literal["none", "tis", "mis"] = Field(
        "none",
        description="Importance-sampling correction of the rollout engine / trainer mismatch (and of async "
        "staleness), per token with ratio rho = pi_trainer(old) / pi_rollout: none (the engines then compute no "
        "logprobs at all), tis (truncated: weight min(rho, cap)) or mis (masked: weight rho, 0 where rho > cap).",
    )
    rollout_correction_cap: float = Field(
        2.0, gt=1.0, description="The cap C of rolloutCorrection (tis truncates at it, mis masks above it).")
    weight_sync: Literal["auto", "object_store", "nccl", "shared_memory"] = Field(
        "auto",
        description="How learners push weights to rollout engines: object_store (Ray's object store), nccl (bucketed "
        "broadcast; Gloo on CPU), shared_memory (one /dev/shm region written once by learner rank 0 and read by "
        "every engine; needs every engine on that rank's node). auto is NCCL on GPU; on CPU shared_memory when "
        "every engine is on learner rank 0's node, else the object store.",
    )
    lora_serving: Literal["auto", "adapter", "merged"] = Field(
        "auto",
        description="How a LoRA / rsLoRA policy reaches the rollout engines after each step: adapter sends only the "
        "adapter's tensors (a few MB) and vLLM serves them as a LoRA adapter over its unchanged base weights (a "
        "new adapter id per step); merged folds the adapter into the base weights and sends the adapted modules "
        "whole. auto is adapter on vLLM engines on GPUs and merged elsewhere: vLLM's LoRA kernels on CPU decode about "
        "5x slower than merged weights (measured on SmolLM2), which costs more than the sync saves. Full "
        "fine-tuning always sends every weight.",
    )
    async_: bool = Field(
        False,
        alias="async",
        description="Generate step t+1 while step t trains (rollouts are at most one step stale).",
    )

    @model_validator(mode="after")
    def _check_correction(self) -> RLSpec:
        # against the default, so a spec dumped with its defaults validates again
        if self.rollout_correction == "none" and self.rollout_correction_cap != 2.0:
            raise ValueError("@rolloutCorrectionCap: applies to rolloutCorrection tis or mis; set rolloutCorrection "
                             "or remove the cap")
        return self


def lora_serving_problem(rl: RLSpec, *, adapter: str, engine: str | None) -> str | None:
    """The error of an `rl.loraServing: adapter` that cannot work (None when fine): it needs a LoRA or rsLoRA
    adapter and an engine that serves adapters (`engine`: roles.rollout.engine; auto may resolve to vLLM).

    >>> lora_serving_problem(RLSpec(loraServing="adapter"), adapter="none", engine=None)[:20]
    '@rl.loraServing: ada'
    """
    if rl.lora_serving != "adapter":
        return None
    if adapter not in ("lora", "rslora"):
        return (f"@rl.loraServing: adapter serves a lora or rslora adapter as a vLLM LoRA; adapter.type is "
                f"{adapter}: use loraServing auto or merged")
    if engine == "transformers":
        return ("@rl.loraServing: adapter needs the vLLM engine; the transformers engine loads merged weights: set "
                "roles.rollout.engine to vllm or auto, or loraServing to auto or merged")
    return None


SOURCES = ("function", "model", "url", "judge")  # a reward is exactly one of these


class RewardSpec(ApiModel):
    function: str | None = Field(
        None,
        description="A reward callable `module:function` with signature "
        "fn(prompts, completions, **fields) -> list[float | None], e.g. posttrain.jobs.rewards.builtin:exact_answer.",
    )
    model: str | None = Field(
        None,
        description="A sequence-classification reward model (same URI forms as spec.model.source, `ptj://<job>` "
        "for the model a reward-training job of this namespace published).")
    url: str | None = Field(None, description="An HTTP verifier: POSTed {prompts, completions, ...}, answers {rewards: [...]}.")
    judge: JudgeSpec | None = Field(
        None, description="An LLM judge on the reward role: pointwise scores or pairwise win rates in [0, 1] (RLAIF)."
    )
    weight: float = Field(1.0, ge=0.0, description="Weight in the combined reward; 0 logs the reward without training on it.")
    name: str | None = Field(None, description="Label in metrics (default: the function name, `reward_model`, `http_verifier` or `judge`).")
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for the function.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    timeout_seconds: float = Field(30.0, gt=0.0, description="Per-request timeout of an HTTP verifier.")
    retries: int = Field(3, ge=0, description="Retries of an HTTP verifier before the step fails.")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A reward that raises or returns NaN, or a judge reply with no verdict: fail the step "
        "(raise) or skip the sample (skip)."
    )

    def source(self) -> str:
        return next(k for k in SOURCES if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        given = [k for k in SOURCES if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("@function: give exactly one of function, model, url or judge"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.function is not None and ":" not in self.function:
            raise ValueError("@function: write module:function, e.g. posttrain.jobs.rewards.builtin:exact_answer")
        if self.judge is not None and self.kwargs:
            raise ValueError("@kwargs: are for reward functions; a judge takes its settings inside judge: {...}")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("@url: an HTTP verifier URL starts with http:// or https://")
        return self
