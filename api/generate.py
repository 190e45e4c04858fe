"""`spec.generate`: what an `algorithm: generate` job writes, and with which settings.

A generate job samples from the policy `spec.model` on the rollout role and writes a data set to
`<output>/data/train.jsonl`, with `<output>/data/manifest.json` beside it. Tasks (one entry each in
`TASKS`, and one runtime class each in `posttrain.jobs.algorithms.generate.TASKS`):

- `preference_pairs`: `candidates` completions per prompt, compared by `judge` (pairwise, on the
  reward role); the best and the worst by win rate become `{prompt, chosen, rejected}` (what a `dpo`
  or `reward` job reads), with the judge's scores and reasons as extra fields.
- `traces` (chain-of-thought distillation data): `candidates` reasoning traces per prompt, asked for
  with `traceTemplate`; the final answer is read with `answer`, and with `verify` only traces whose
  answer matches the record's `answer` field are kept (at most `keepPerPrompt` a prompt). Records are
  `{prompt, reasoning, answer}`, what an sft job with `format: cot` reads.
- `instructions` (self-instruct): `requests` prompts, each showing `seedsPerRequest` random seed
  records (`instructionTemplate`), ask for a new instruction (`candidates` samples each); new ones that
  repeat a seed or a kept one (exactly after normalisation, or with ROUGE-L above `maxSimilarity`) are
  dropped, the rest answered (`outputTemplate`). Records are `{prompt, completion}` (sft's default).

A field that only another task reads is refused unless it holds its default, so a resolved spec
dumped with every default validates again.

    >>> GenerateSpec.model_validate({"judge": {"model": "/models/judge", "mode": "pairwise"}}).candidates
    4
    >>> GenerateSpec.model_validate({"task": "traces", "keepPerPrompt": 2}).answer.extract
    'last_number'
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.api.base import ApiModel, check_template, check_trains_nothing
from posttrain.api.evaluation import DEFAULT_COT, AnswerSpec
from posttrain.api.judge import JudgeSpec

# task -> the fields it reads besides the shared sampling ones (a later task adds a line here and a class
# in the runtime's table); a field no task of the job reads must hold its default
TASKS: dict[str, tuple[str, ...]] = {
    "preference_pairs": ("judge", "min_margin", "on_error"),
    "traces": ("trace_template", "answer", "verify", "keep_per_prompt"),
    "instructions": ("instruction_template", "output_template", "requests", "seeds_per_request",
                     "max_similarity", "chat"),
}

# The default trace prompt is the cot prompt of `algorithm: evaluate`, so the teacher is asked exactly
# what an evaluation's `cot` method measures.
DEFAULT_TRACE = DEFAULT_COT
DEFAULT_INSTRUCTION = ("Here are some example tasks, each with a good answer:\n\n{examples}\n\nWrite one new task "
                       "that is different from all of the examples. Reply with the new task only, in one or two "
                       "sentences, without answering it.")
DEFAULT_OUTPUT = "{instruction}"


class GenerateSpec(ApiModel):
    task: str = Field(
        "preference_pairs",
        description="What to generate: preference_pairs ({prompt, chosen, rejected} labelled by "
        "spec.generate.judge), traces ({prompt, reasoning, answer} chain-of-thought data, filtered by the "
        "record's answer) or instructions (self-instruct {prompt, completion} from seed records).",
    )
    candidates: int = Field(4, description="Samples per prompt: completions compared by the judge "
                            "(preference_pairs, at least 2), traces per prompt (traces), new instructions per "
                            "request (instructions).")
    max_new_tokens: int = Field(256, gt=0, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    prompts_per_batch: int = Field(16, ge=1, description="Prompts (instructions: requests) generated together "
                                   "(one logged step).")
    judge: JudgeSpec | None = Field(None, description="The judge (preference_pairs); use mode pairwise or pointwise.")
    min_margin: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="preference_pairs: drop a prompt as a tie when the best and the worst candidate's judge scores "
        "differ by this much or less.",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="preference_pairs: a judge reply with no verdict (verdict reply): fail the job (raise) "
        "or leave that comparison out and count it (skip).",
    )
    trace_template: str = Field(DEFAULT_TRACE, description="traces: the prompt asking for a reasoning trace and a "
                                "final answer; {prompt} is the record's question (a chat's last user turn).")
    answer: AnswerSpec = Field(default_factory=AnswerSpec, description="traces: how the final answer is read from "
                               "a trace (extract, pattern) and compared with the record's answer (metric match, "
                               "tolerance).")
    verify: bool = Field(True, description="traces: keep only traces whose answer matches the record's answer "
                         "field (a record without one keeps its traces unverified); false keeps every trace that "
                         "has an answer.")
    keep_per_prompt: int = Field(1, ge=1, description="traces: most traces kept per prompt (distinct texts, in "
                                 "sampling order).")
    instruction_template: str = Field(DEFAULT_INSTRUCTION, description="instructions: the prompt asking for a new "
                                      "instruction; {examples} is seedsPerRequest seed records.")
    output_template: str = Field(DEFAULT_OUTPUT, description="instructions: the prompt answering a new "
                                 "instruction; {instruction} is its text.")
    requests: int = Field(64, ge=1, description="instructions: instruction-writing prompts, each sampled "
                          "candidates times.")
    seeds_per_request: int = Field(3, ge=1, description="instructions: random seed records shown per request.")
    max_similarity: float = Field(0.7, gt=0.0, le=1.0, description="instructions: drop a new instruction whose "
                                  "ROUGE-L F1 (word level) with a seed or a kept instruction is above this.")
    chat: bool = Field(True, description="instructions: send requests and instructions as a user turn through the "
                       "model's chat template (false: as plain text).")

    @model_validator(mode="after")
    def _check(self) -> GenerateSpec:
        if self.task not in TASKS:
            raise ValueError(f"@task: unknown task {self.task!r}; choose one of {', '.join(sorted(TASKS))}")
        least = 2 if self.task == "preference_pairs" else 1
        if self.candidates < least:
            why = "the judge compares candidates" if least == 2 else "a prompt needs a sample"
            raise ValueError(f"@candidates: ({self.candidates}) must be at least {least}: {why}")
        if self.task == "preference_pairs" and self.judge is None:
            raise ValueError("@judge: task preference_pairs needs a judge, e.g. "
                             "{model: hf://HuggingFaceTB/SmolLM2-135M-Instruct, mode: pairwise}")
        used = set(TASKS[self.task])
        for name in (n for names in TASKS.values() for n in names if n not in used):
            info = type(self).model_fields[name]
            if getattr(self, name) != info.get_default(call_default_factory=True):
                owner = next(t for t, names in TASKS.items() if name in names)
                raise ValueError(f"@{info.alias or name}: is read by task {owner}, not {self.task}; remove it")
        if self.task == "traces":
            self._check_traces()
        elif self.task == "instructions":
            check_template(self.instruction_template, required={"examples"}, allowed={"examples"},
                           field="instructionTemplate", hint="the instruction template")
            check_template(self.output_template, required={"instruction"}, allowed={"instruction"},
                           field="outputTemplate", hint="the output template")
        return self

    def _check_traces(self) -> None:
        check_template(self.trace_template, required={"prompt"}, allowed={"prompt"}, field="traceTemplate",
                       hint="the trace template")
        if self.answer.metric != "match":
            raise ValueError(f"@answer.metric: traces keep a trace when its answer matches the record's; use match "
                             f"(with tolerance for numbers), not {self.answer.metric}")
        if self.keep_per_prompt > self.candidates:
            raise ValueError(f"@keepPerPrompt: ({self.keep_per_prompt}) cannot exceed candidates "
                             f"({self.candidates}); raise candidates or lower keepPerPrompt")

    def uses_judge(self) -> bool:
        """Only preference_pairs has reward-role actors (the judge)."""
        return self.task == "preference_pairs"


def check_generate_job(spec: Any) -> None:
    """algorithm generate (a `PostTrainingJobSpec`): needs spec.generate, runs on the rollout role (and reward for
    the judge), trains nothing. Defaults are compared by value, so a resolved spec dumped with them validates
    again."""
    if spec.generate is None:
        raise ValueError("@generate: algorithm generate needs it, e.g. {task: preference_pairs, candidates: 4, "
                         "judge: {model: hf://HuggingFaceTB/SmolLM2-135M-Instruct, mode: pairwise}}")
    check_trains_nothing(spec, runs_on="roles.rollout and roles.reward",
                         adapter_hint="it samples from spec.model as it is; remove the adapter")
    for name in ("rl", "rewards"):
        if getattr(spec, name):
            raise ValueError(f"@{name}: is for grpo and ppo; generate takes its settings from spec.generate")
    if spec.roles.reward is not None and not spec.generate.uses_judge():
        raise ValueError(f"@roles.reward: task {spec.generate.task} has no judge and runs on roles.rollout only; "
                         "remove roles.reward")
