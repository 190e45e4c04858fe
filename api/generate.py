"""`spec.generate`: what an `algorithm: generate` job writes, and with which settings.

A generate job samples from the policy `spec.model` on the rollout role and writes a data set to
`<output>/data/train.jsonl`. Tasks (one entry each in `TASKS`, and one runtime function each in
`posttrain.jobs.algorithms.generate.TASKS`):

- `preference_pairs`: `candidates` completions per prompt, compared by `judge` (pairwise, on the
  reward role); the best and the worst by win rate become `{prompt, chosen, rejected}` (what a `dpo`
  or `reward` job reads), with the judge's scores and reasons as extra fields.

    >>> GenerateSpec.model_validate({"judge": {"model": "/models/judge", "mode": "pairwise"}}).candidates
    4
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.api.base import ApiModel, check_trains_nothing
from posttrain.api.judge import JudgeSpec

# task -> the fields it needs (a later task adds a line here and a function in the runtime's table)
TASKS: dict[str, tuple[str, ...]] = {"preference_pairs": ("judge",)}


class GenerateSpec(ApiModel):
    task: str = Field(
        "preference_pairs",
        description="What to generate: preference_pairs ({prompt, chosen, rejected} labelled by spec.generate.judge).",
    )
    candidates: int = Field(4, description="Completions sampled per prompt (at least 2), compared by the judge.")
    max_new_tokens: int = Field(256, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the candidates.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold of the candidates.")
    prompts_per_batch: int = Field(16, ge=1, description="Prompts generated and judged together (one logged step).")
    judge: JudgeSpec | None = Field(None, description="The judge (preference_pairs); use mode pairwise or pointwise.")
    min_margin: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="preference_pairs: drop a prompt as a tie when the best and the worst candidate's judge scores "
        "differ by this much or less.",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A judge reply with no verdict (verdict reply): fail the job (raise) or leave that "
        "comparison out and count it (skip).",
    )

    @model_validator(mode="after")
    def _check(self) -> GenerateSpec:
        if self.task not in TASKS:
            raise ValueError(f"@task: unknown task {self.task!r}; choose one of {', '.join(sorted(TASKS))}")
        if self.candidates < 2:
            raise ValueError(f"@candidates: ({self.candidates}) must be at least 2: the judge compares candidates")
        for name in TASKS[self.task]:
            if getattr(self, name) is None:
                raise ValueError(f"@{name}: task {self.task} needs a {name}, e.g. "
                                 "{model: hf://HuggingFaceTB/SmolLM2-135M-Instruct, mode: pairwise}")
        return self


def check_generate_job(spec: Any) -> None:
    """algorithm generate (a `PostTrainingJobSpec`): needs spec.generate, runs on the rollout and reward roles,
    trains nothing. Defaults are compared by value, so a resolved spec dumped with them validates again."""
    if spec.generate is None:
        raise ValueError("@generate: algorithm generate needs it, e.g. {task: preference_pairs, candidates: 4, "
                         "judge: {model: hf://HuggingFaceTB/SmolLM2-135M-Instruct, mode: pairwise}}")
    check_trains_nothing(spec, runs_on="roles.rollout and roles.reward",
                         adapter_hint="it samples from spec.model as it is; remove the adapter")
    for name in ("rl", "rewards"):
        if getattr(spec, name):
            raise ValueError(f"@{name}: is for grpo and ppo; generate takes its settings from spec.generate")
