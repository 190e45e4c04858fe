"""An LLM judge as a reward (RLAIF), and the pairwise comparisons a generate job labels pairs with.

    judge = Judge("/models/judge", spec=JudgeSpec(model="...", mode="pairwise").model_dump(), label="judge")
    judge(prompts, completions)                     # the reward signature: one value in [0, 1] per sample
    judge.rank(prompt, [c1, c2, c3])                # a `Ranking`: win rates and the verdict of every pair

The judge runs on one of the rollout engines (`posttrain.jobs.rl.engines`: vLLM where installed, else
transformers), loaded in the reward actor. How a verdict is read (`JudgeSpec.verdict`):

- `logprobs`: the engine's `continuation_logprobs` gives log P(label | judge prompt) for every label
  (each label scored as the text that follows the prompt); a softmax over the labels makes them
  probabilities. pointwise: the expected score; pairwise: P(A) / (P(A) + P(B)).
- `reply`: the engine generates a reply; `parse` (one regex group) reads a number in the scale or A/B.

Scores are normalised to [0, 1]: (score - scaleMin) / (scaleMax - scaleMin). A pairwise verdict is
the probability that the first shown completion is better; with `swap` every pair is also judged in
the other order and the two are averaged. As a reward, pairwise gives each completion its mean
preference against every other completion of its group (the samples with the same prompt, which the
RL loop sends to one reward actor together): a round robin of G x (G - 1) / 2 pairs per group.

A reply with no verdict: `on_error="raise"` raises `RewardError` naming the reward (and its field,
`where`) with the reply; `"skip"` gives that sample NaN, which the reward combiner counts as skipped.
Tests: `.venv/bin/python -m pytest tests/test_judge.py -q`.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.jobs.rewards.score import RewardError

log = logging.getLogger(__name__)
SHOWN = 200  # characters of a reply shown in an error


@dataclass
class Verdict:
    """One judgement: `value` in [0, 1] (a pointwise score, or P(first shown is better)); None when unparseable."""

    value: float | None
    reply: str = ""


@dataclass
class Ranking:
    """A group of candidates judged pairwise: win rate per candidate (None: no readable comparison) and
    `pairs[(i, j)]` the verdicts that candidate i is better than j (one per order judged)."""

    win_rates: list[float | None]
    pairs: dict[tuple[int, int], list[Verdict]] = field(default_factory=dict)
    unparseable: int = 0


class Judge:
    """A reward: an LLM judge over a local model folder (see the module docstring)."""

    def __init__(self, path: str | Path, *, spec: dict[str, Any], label: str = "judge", where: str = "judge",
                 on_error: str = "raise", seed: int = 0, engine_kwargs: dict[str, Any] | None = None) -> None:
        from transformers import AutoTokenizer

        from posttrain.api.judge import JudgeSpec
        from posttrain.jobs.rl.engines import Sampling, make_engine

        self.spec = JudgeSpec.model_validate(spec)
        self.label, self.where, self.on_error = label, where, on_error
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.engine = make_engine(self.spec.engine, path, seed=seed, **(engine_kwargs or {}))
        self.template = self.spec.template_text()
        self.pattern = re.compile(self.spec.parse_text())
        self.labels = self.spec.labels()
        self.chat = self.spec.chat and bool(getattr(self.tokenizer, "chat_template", None))
        # Without a chat template the prompt is plain text ending "Score: ": the space goes with the label
        # (" 7" is how BPE tokenizers write it after a colon), not as a lone token at the prompt's end.
        self.moved_space = not self.chat and self.template.endswith(" ")
        self.label_ids = [self.tokenizer((" " if self.moved_space else "") + lab, add_special_tokens=False)["input_ids"]
                          for lab in self.labels]
        eos = self.tokenizer.eos_token_id
        self.sampling = Sampling(n=1, max_new_tokens=self.spec.max_new_tokens, temperature=self.spec.temperature,
                                 stop_token_ids=(eos,) if eos is not None else ())

    # ---- the reward signature ------------------------------------------------------------------

    def __call__(self, prompts: list[str], completions: list[str], **_: Any) -> list[float]:
        if self.spec.mode == "pointwise":
            verdicts = self.pointwise(prompts, completions)
            return [v.value if v.value is not None else math.nan for v in verdicts]
        out: list[float] = [math.nan] * len(prompts)
        for members in _groups(prompts):
            if len(members) < 2:
                raise RewardError(self.label, f"{self.where}: a pairwise judge compares the completions of one "
                                              "prompt, and a prompt has only one here; use rl.groupSize >= 2")
            ranking = self.rank(prompts[members[0]], [completions[i] for i in members])
            for i, rate in zip(members, ranking.win_rates):
                out[i] = rate if rate is not None else math.nan
        return out

    # ---- judgements ------------------------------------------------------------------------------

    def pointwise(self, prompts: list[str], completions: list[str]) -> list[Verdict]:
        lo, hi = self.spec.scale_min, self.spec.scale_max
        texts = [self.template.format(prompt=p, completion=c, min=lo, max=hi) for p, c in zip(prompts, completions)]
        return self._judge(texts)

    def compare(self, prompts: list[str], firsts: list[str], seconds: list[str]) -> list[Verdict]:
        """P(first is better than second) for each triple, as shown (no swapping here)."""
        return self._judge([self.template.format(prompt=p, a=a, b=b) for p, a, b in zip(prompts, firsts, seconds)])

    def rank(self, prompt: str, candidates: list[str]) -> Ranking:
        """Round robin over the candidates of one prompt (both orders with `swap`)."""
        n = len(candidates)
        order = [(i, j) for i in range(n) for j in range(i + 1, n)]
        if self.spec.swap:
            order += [(j, i) for i, j in order]
        verdicts = self.compare([prompt] * len(order), [candidates[i] for i, _ in order],
                                [candidates[j] for _, j in order])
        ranking = Ranking(win_rates=[None] * n)
        wins: list[list[float]] = [[] for _ in range(n)]
        for (i, j), v in zip(order, verdicts):
            if v.value is None:
                ranking.unparseable += 1
                continue
            key = (min(i, j), max(i, j))
            # stored as "the lower index is better", whichever order it was shown in
            ranking.pairs.setdefault(key, []).append(Verdict(v.value if i < j else 1.0 - v.value, v.reply))
        for (i, j), vs in ranking.pairs.items():
            p = sum(v.value for v in vs) / len(vs)  # type: ignore[misc]
            wins[i].append(p)
            wins[j].append(1.0 - p)
        ranking.win_rates = [sum(w) / len(w) if w else None for w in wins]
        return ranking

    def _judge(self, texts: list[str]) -> list[Verdict]:
        logprobs = self.spec.verdict == "logprobs"
        prompts = [self._encode(t, for_labels=logprobs) for t in texts]
        if logprobs:
            return [Verdict(self._from_logprobs(row)) for row in self.engine.continuation_logprobs(prompts,
                                                                                                   self.label_ids)]
        gens = self.engine.generate(prompts, self.sampling)
        return [self._from_reply(g.texts[0]) for g in gens]

    def _encode(self, text: str, *, for_labels: bool = False) -> list[int]:
        if self.chat:
            rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                          add_generation_prompt=True)
            return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
        if for_labels and self.moved_space:
            text = text[:-1]
        return self.tokenizer(text)["input_ids"]

    def _from_logprobs(self, logps: list[float]) -> float:
        top = max(logps)
        probs = [math.exp(x - top) for x in logps]
        total = sum(probs)
        if self.spec.mode == "pairwise":
            return probs[0] / total  # P(A) among A and B
        lo, hi = self.spec.scale_min, self.spec.scale_max
        expected = sum(p * (lo + k) for k, p in enumerate(probs)) / total
        return (expected - lo) / (hi - lo)

    def _from_reply(self, reply: str) -> Verdict:
        match = self.pattern.search(reply)
        value: float | None = None
        if match is not None and match.group(1) is not None:
            found = match.group(1).strip()
            if self.spec.mode == "pairwise":
                value = {"A": 1.0, "B": 0.0}.get(found.upper())
            else:
                try:
                    score = float(found)
                except ValueError:
                    score = math.nan
                lo, hi = self.spec.scale_min, self.spec.scale_max
                value = (score - lo) / (hi - lo) if lo <= score <= hi else None
        if value is None:
            self._unparseable(reply)
        return Verdict(value, reply)

    def _unparseable(self, reply: str) -> None:
        shown = reply if len(reply) <= SHOWN else reply[:SHOWN] + "..."
        what = "A or B" if self.spec.mode == "pairwise" else f"a score from {self.spec.scale_min} to {self.spec.scale_max}"
        message = (f"{self.where}: no verdict ({what}) in the judge's reply {shown!r} with parse "
                   f"{self.pattern.pattern!r}; change the template or parse, or set onError: skip")
        if self.on_error == "raise":
            raise RewardError(self.label, message)
        log.warning("reward %r: %s (skipped)", self.label, message)

    def close(self) -> None:
        self.engine.close()


def _groups(prompts: list[str]) -> list[list[int]]:
    """Runs of equal consecutive prompts: the samples of one prompt's group, as the RL loop sends them."""
    groups: list[list[int]] = []
    for i, p in enumerate(prompts):
        if groups and prompts[groups[-1][0]] == p:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
