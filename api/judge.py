"""An LLM judge: `rewards: [{judge: {...}}]` (grpo, ppo) and `generate.judge` (judge-labelled preference pairs).

The judge is a causal language model shown the user's template filled in with the prompt and the
completion(s). Its verdict is read one of two ways (`verdict`):

- `logprobs` (the default): no text is generated. The judge's log-probability of each label as the
  next words of its answer is computed (the score labels `scaleMin`..`scaleMax` as decimal strings,
  or `A` / `B`), normalised over the labels; a pointwise score is the expected label, a pairwise
  preference P(A) / (P(A) + P(B)). Deterministic, never unparseable, works with any model.
- `reply`: the judge writes up to `maxNewTokens` tokens (greedy at `temperature: 0`) and `parse`, a
  regular expression with one group, reads the verdict from the reply: a number in the scale, or `A` /
  `B`. A reply the expression does not match follows the reward's `onError`.

    >>> JudgeSpec(model="/models/judge").mode, JudgeSpec(model="m", mode="pairwise").template_text()[:22]
    ('pointwise', 'Which response to the ')
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from posttrain.api.base import ApiModel, check_template

DEFAULT_POINTWISE_TEMPLATE = (
    "Rate the response to the request below for helpfulness, correctness and clarity, on a scale "
    "from {min} to {max} ({max} is best).\n\n"
    "Request:\n{prompt}\n\nResponse:\n{completion}\n\n"
    "Reply with the score only.\nScore: "
)
DEFAULT_PAIRWISE_TEMPLATE = (
    "Which response to the request below is better: more helpful, correct and clear?\n\n"
    "Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Reply with the letter of the better response only, A or B.\nBetter response: "
)
DEFAULT_PARSE = {"pointwise": r"(-?\d+(?:\.\d+)?)", "pairwise": r"\b([AB])\b"}
PAIRWISE_LABELS = ("A", "B")
# placeholders each mode must and may use; {min} and {max} are the scale's ends
PLACEHOLDERS = {"pointwise": ({"prompt", "completion"}, {"min", "max"}), "pairwise": ({"prompt", "a", "b"}, set())}


class JudgeSpec(ApiModel):
    model: str = Field(min_length=1, description="The judge model (same URI forms as spec.model.source).")
    mode: Literal["pointwise", "pairwise"] = Field(
        "pointwise",
        description="pointwise: a score per completion in [0, 1]. pairwise: the judge compares two completions of "
        "the same prompt; as a reward, each completion's win rate against the rest of its group.",
    )
    template: str | None = Field(
        None,
        description="The judge's prompt. pointwise: with {prompt} and {completion} (and optionally {min}, {max}); "
        "pairwise: with {prompt}, {a} and {b}. Literal braces are written {{ and }}. Default: see the README (RLAIF).",
    )
    verdict: Literal["logprobs", "reply"] = Field(
        "logprobs",
        description="logprobs: the judge's next-token probabilities over the labels (deterministic, never "
        "unparseable). reply: the judge writes a reply and `parse` reads the verdict from it.",
    )
    parse: str | None = Field(
        None,
        description="verdict reply: a regular expression whose first group is the verdict (the first match counts). "
        r"Default: pointwise (-?\d+(?:\.\d+)?), pairwise \b([AB])\b.",
    )
    scale_min: int = Field(1, description="pointwise: the lowest score; it maps to reward 0.")
    scale_max: int = Field(10, description="pointwise: the highest score; it maps to reward 1.")
    max_new_tokens: int = Field(16, gt=0, le=4096, description="verdict reply: the longest reply, in tokens.")
    temperature: float = Field(0.0, ge=0.0, description="verdict reply: sampling temperature; 0 is greedy.")
    swap: bool = Field(
        True, description="pairwise: judge every pair in both orders and average, cancelling position bias."
    )
    chat: bool = Field(
        True, description="Send the filled template as a user turn through the judge's chat template (if it has one)."
    )
    engine: Literal["auto", "vllm", "transformers"] = Field(
        "auto", description="Inference engine of the judge: vllm where installed (auto), else transformers."
    )

    def template_text(self) -> str:
        if self.template is not None:
            return self.template
        return DEFAULT_POINTWISE_TEMPLATE if self.mode == "pointwise" else DEFAULT_PAIRWISE_TEMPLATE

    def parse_text(self) -> str:
        return self.parse if self.parse is not None else DEFAULT_PARSE[self.mode]

    def labels(self) -> list[str]:
        """The verdict's labels, in order: scores scaleMin..scaleMax, or A and B."""
        if self.mode == "pairwise":
            return list(PAIRWISE_LABELS)
        return [str(k) for k in range(self.scale_min, self.scale_max + 1)]

    @model_validator(mode="after")
    def _check(self) -> JudgeSpec:
        required, optional = PLACEHOLDERS[self.mode]
        if self.template is not None:
            check_template(self.template, required=required, allowed=required | optional, field="template",
                           hint=f"a {self.mode} judge template")
        if self.parse is not None:
            try:
                groups = re.compile(self.parse).groups
            except re.error as exc:
                raise ValueError(f"@parse: not a regular expression ({exc})") from None
            if groups < 1:
                raise ValueError("@parse: needs a group around the verdict, e.g. Score: (\\d+)")
        if self.scale_max <= self.scale_min:
            raise ValueError(f"@scaleMax: ({self.scale_max}) must exceed scaleMin ({self.scale_min})")
        if self.verdict == "logprobs" and self.scale_max - self.scale_min > 100:
            raise ValueError("@scaleMax: verdict logprobs scores every label of the scale; keep it to 101 labels")
        return self
