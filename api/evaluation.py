"""`spec.evaluation`: how models are evaluated, and which test-time scaling methods are compared.

An `algorithm: evaluate` job runs it on its own (the prompts are `spec.data.train`, records
`{prompt, answer}`); a training job (sft, grpo, ...) with `spec.evaluation` runs it on the base and the
trained model at the end (the prompts are `evaluation.data`, else `spec.data.eval`).

Methods (`methods`; every model answers the same prompts with the same seeds):

- `direct`: one greedy answer to the prompt as it is.
- `cot`: one greedy answer to `cotTemplate` (chain-of-thought prompting).
- `self_consistency`: `max(samples)` sampled answers (at `temperature`, to the cot prompt when
  `sampleWith: cot`); for each N in `samples` the majority vote over the first N extracted answers.
  One sample set gives the whole scaling curve.
- `best_of_n`: the same sample set, and for each N the first N samples' best by `spec.rewards`
  (the rewards GRPO uses: functions, reward models, verifiers, judges).
- `refine`: the direct answer, then `refineRounds` rounds of critique (`critiqueTemplate`, or with
  `refineFeedback: rewards` the verifier's score of the answer) and revision (`reviseTemplate`) by the
  model itself, each round scored.

    >>> EvaluationSpec.model_validate({"methods": ["direct", "self_consistency"], "samples": [1, 4]}).samples
    [1, 4]
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.api.base import ApiModel, check_template, check_trains_nothing

METHODS = ("direct", "cot", "self_consistency", "best_of_n", "refine")
EXTRACTORS = ("last_number", "answer_tag", "regex", "full")
METRICS = ("match", "rewards", "bleu", "chrf")

DEFAULT_COT = "{prompt}\nThink step by step, then give the final answer as a number on the last line."
DEFAULT_CRITIQUE = ("{prompt}\n\nA proposed answer:\n{answer}\n\nCheck this answer step by step and point out any "
                    "mistake. Do not give a new answer yet.")
DEFAULT_REVISE = ("{prompt}\n\nA proposed answer:\n{answer}\n\nFeedback on it:\n{critique}\n\nUsing the feedback, "
                  "give the corrected final answer.")


class EvalModel(ApiModel):
    source: str = Field(min_length=1, description="The model: the same forms as spec.model.source (hub, path, "
                        "GGUF, pvc://, object storage).")
    adapter: str | None = Field(None, min_length=1, description="A PEFT adapter folder applied on top of source "
                                "(merged into the weights where the model is loaded).")
    name: str | None = Field(None, min_length=1, max_length=63,
                             description="The name in the results (default: model-<i>, or base / trained).")


class AnswerSpec(ApiModel):
    extract: str = Field(
        "last_number",
        description="How the answer is read from a completion: last_number, answer_tag (<answer>...</answer>), "
        "regex (pattern, its first group or the whole match), full (the whole completion, stripped), or a "
        "function module:function (completion -> str | None). A completion with no answer counts as wrong and "
        "is counted in extraction_failures.",
    )
    pattern: str | None = Field(None, description="The regular expression of extract: regex.")
    metric: Literal["match", "rewards", "bleu", "chrf"] = Field(
        "match",
        description="Score of one answer: match (equal to the record's answer; numbers within tolerance), rewards "
        "(the weighted spec.rewards of the completion), bleu or chrf (sacrebleu's sentence score / 100 of the "
        "answer against the record's answer, for free text).",
    )
    tolerance: float = Field(0.0, ge=0.0, description="match: numbers this close to the reference count as equal.")

    @model_validator(mode="after")
    def _check(self) -> AnswerSpec:
        if self.extract not in EXTRACTORS and ":" not in self.extract:
            raise ValueError(f"@extract: unknown extractor {self.extract!r}; use one of {', '.join(EXTRACTORS)} "
                             "or module:function")
        if self.extract == "regex":
            if not self.pattern:
                raise ValueError("@pattern: extract regex needs a pattern, e.g. 'Answer: (\\S+)'")
            import re

            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"@pattern: not a regular expression: {exc}") from None
        elif self.pattern is not None:
            raise ValueError(f"@pattern: only extract regex reads a pattern (extract is {self.extract})")
        return self


class EvaluationSpec(ApiModel):
    models: list[EvalModel] = Field(
        default_factory=list, max_length=16,
        description="Models compared side by side (evaluate; default: spec.model). A training job evaluates "
        "spec.model and the trained result and must leave this empty.")
    methods: list[str] = Field(["direct"], min_length=1, max_length=8,
                               description=f"Methods to run: {', '.join(METHODS)}.")
    samples: list[int] = Field(
        [1, 2, 4, 8, 16], min_length=1, max_length=16,
        description="self_consistency and best_of_n: the N values of the scaling curve, all from one set of "
        "max(samples) samples per prompt.")
    sample_with: Literal["direct", "cot"] = Field(
        "cot", description="The prompt self_consistency and best_of_n sample from: as it is, or the cot template.")
    refine_rounds: int = Field(2, ge=1, le=8, description="refine: critique-and-revise rounds after the first answer.")
    refine_feedback: Literal["self", "rewards"] = Field(
        "self", description="refine: the critique is the model's own reply to critiqueTemplate (self), or the "
        "verifier's verdict: the weighted spec.rewards of the answer, as text (rewards).")
    cot_template: str = Field(DEFAULT_COT, description="cot: the prompt; {prompt} is the record's question.")
    critique_template: str = Field(DEFAULT_CRITIQUE, description="refine: asks for feedback; {prompt}, {answer}.")
    revise_template: str = Field(DEFAULT_REVISE,
                                 description="refine: asks for a revision; {prompt}, {answer}, {critique}.")
    answer: AnswerSpec = Field(default_factory=AnswerSpec, description="Answer extraction and scoring.")
    max_new_tokens: int = Field(256, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(0.7, gt=0.0, description="Sampling temperature (self_consistency, best_of_n); "
                               "direct, cot and refine are greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold of the samples.")
    seed: int = Field(0, ge=0, description="Seed of the samples; every model gets the same seeds.")
    max_prompts: int | None = Field(None, gt=0, description="Evaluate only the first this many prompts.")
    data: str | None = Field(
        None, min_length=1, description="The prompts: a data set of {prompt, answer} records (the forms of "
        "data.train[].source). Default: spec.data.train (evaluate), spec.data.eval (a training job).")
    plots: bool = Field(True, description="Write the PNG plots (matplotlib).")
    engine: Literal["auto", "vllm", "transformers"] | None = Field(
        None, description="The engine the models run on (default: roles.rollout.engine, else auto: vLLM where "
        "installed, else transformers).")

    @model_validator(mode="after")
    def _check(self) -> EvaluationSpec:
        for i, name in enumerate(self.methods):
            if name not in METHODS:
                raise ValueError(f"@methods[{i}]: unknown method {name!r}; choose from {', '.join(METHODS)}")
            if name in self.methods[:i]:
                raise ValueError(f"@methods[{i}]: {name} is listed twice")
        for i, n in enumerate(self.samples):
            if n < 1:
                raise ValueError(f"@samples[{i}]: N = {n}; samples per prompt must be at least 1")
        if sorted(set(self.samples)) != self.samples:
            raise ValueError(f"@samples: {self.samples} must be increasing with no repeats, e.g. [1, 2, 4, 8, 16]")
        check_template(self.cot_template, required={"prompt"}, allowed={"prompt"}, field="cotTemplate",
                       hint="the cot template")
        check_template(self.critique_template, required={"prompt", "answer"}, allowed={"prompt", "answer"},
                       field="critiqueTemplate", hint="the critique template")
        check_template(self.revise_template, required={"prompt", "answer", "critique"},
                       allowed={"prompt", "answer", "critique"}, field="reviseTemplate", hint="the revise template")
        names = [m.name for m in self.models if m.name]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"@models: two models are named {name}; names must differ")
        return self

    def needs_rewards(self) -> bool:
        """best_of_n picks by spec.rewards, metric rewards scores by them, refine with rewards feedback reads
        them: the job then has reward actors."""
        return ("best_of_n" in self.methods or self.answer.metric == "rewards"
                or ("refine" in self.methods and self.refine_feedback == "rewards"))

    def model_list(self, spec: Any) -> list[EvalModel]:
        """The models of an evaluate job: `models`, else spec.model alone."""
        if self.models:
            return [m if m.name else m.model_copy(update={"name": f"model-{i}"}) for i, m in enumerate(self.models)]
        return [EvalModel(source=spec.model.source, name="model")]


def check_evaluate_job(spec: Any) -> None:
    """algorithm evaluate (a `PostTrainingJobSpec`): needs spec.evaluation, runs on rollout (and reward when the
    rewards are used), trains nothing."""
    ev = spec.evaluation
    if ev is None:
        raise ValueError("@evaluation: algorithm evaluate needs it, e.g. {methods: [direct, self_consistency], "
                         "samples: [1, 4, 16]}")
    check_trains_nothing(spec, runs_on="roles.rollout and roles.reward (with rewards)",
                         adapter_hint="give a trained adapter as evaluation.models[].adapter")
    if spec.rl is not None:
        raise ValueError("@rl: is for grpo and ppo; evaluate takes its settings from spec.evaluation")
    if ev.needs_rewards() and not spec.rewards:
        what = ("best_of_n" if "best_of_n" in ev.methods else "answer.metric rewards"
                if ev.answer.metric == "rewards" else "refineFeedback rewards")
        raise ValueError(f"@rewards: {what} scores with spec.rewards; add one, e.g. "
                         "[{function: posttrain.jobs.rewards.builtin:exact_answer}]")
    if spec.rewards and not ev.needs_rewards():
        raise ValueError("@rewards: evaluate uses rewards only for best_of_n, answer.metric rewards or "
                         "refineFeedback rewards; remove them")
    if spec.roles.reward is not None and not ev.needs_rewards():
        raise ValueError("@roles.reward: no reward actors without best_of_n, answer.metric rewards or "
                         "refineFeedback rewards")


def check_training_evaluation(spec: Any) -> None:
    """spec.evaluation on a training job: the base and the trained model, on evaluation.data or data.eval."""
    ev = spec.evaluation
    if ev.models:
        raise ValueError(f"@evaluation.models: a {spec.algorithm.value} job evaluates spec.model and the model it "
                         "trains; list models only in an algorithm evaluate job")
    if spec.adapter.type.is_virtual_tokens():
        raise ValueError(f"@evaluation: evaluates a merged model; a {spec.adapter.type.value} adapter cannot be "
                         "merged (use lora or full fine-tuning, or evaluate it in your own code)")
    if ev.data is None and spec.data.eval is None:
        raise ValueError("@evaluation.data: give the held-out prompts ({prompt, answer} records) here or in "
                         "data.eval")
    if ev.needs_rewards() and not spec.rewards:
        raise ValueError("@rewards: best_of_n and answer.metric rewards score with spec.rewards; a "
                         f"{spec.algorithm.value} job has none")
