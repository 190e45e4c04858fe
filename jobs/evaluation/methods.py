"""The test-time methods, over any `generate` function: pure mechanics, testable with a scripted model.

    task = Task(spec=evaluation_spec, generate=gen, extract=last_number, score=score, reward=None)
    result = run_method("self_consistency", task, items)
    result.rows        # one per N: {"method", "n", "generations", "scores": [per prompt], "tokens", ...}
    result.samples     # one per prompt: every sample, its extracted answer, the votes, the score

`generate(prompts, n=, greedy=, seed=)` answers each prompt (a string, or chat messages) with `n`
completions (`Completion(text, tokens)`); in a job it runs on the rollout actors, in tests it is a
script. `score(items, texts, answers)` scores one completion per item (match / BLEU / chrF against the
item's reference, or the rewards); `reward(items, texts)` ranks best_of_n's samples (spec.rewards).

- direct / cot: one greedy answer (cot: to `cotTemplate`);
- self_consistency: ONE set of max(samples) samples per prompt; for each N the majority vote over the
  first N extracted answers (`stats.majority_vote`: None casts no vote; ties go to the answer sampled
  first). The row's score is the voted answer's (a prompt with no answer at all scores 0);
- best_of_n: the same sample set (shared when both methods run); for each N the first N samples' best by
  `reward` (ties: the earlier sample);
- refine: round 0 is the direct answer; each round asks for a critique of the current answer (or, with
  `refineFeedback: rewards`, gives the verifier's score as the critique) and then a revision given that
  critique, both greedy; every round is a row (n = the round).

Token counts are the completions' tokens; seconds are generation time, split between a sample set's N
in proportion to the tokens each N uses.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .answers import vote_key
from .stats import majority_vote

Prompt = Any  # a string, or a list of chat messages {role, content}
VERIFIER_FEEDBACK = "A verifier scored this answer {score:.2f} (1 is correct, 0 is wrong)."


@dataclass
class Completion:
    text: str
    tokens: int


@dataclass
class Item:
    """One evaluation record: the prompt as the data gives it, the reference answer, the other fields."""

    prompt: Prompt
    reference: Any
    fields: dict[str, Any] = field(default_factory=dict)

    def question(self) -> str:
        """The text of the question (a chat's last user turn)."""
        if isinstance(self.prompt, list):
            return next((m["content"] for m in reversed(self.prompt) if m.get("role") == "user"), "")
        return str(self.prompt)


class Generate(Protocol):
    def __call__(self, prompts: list[Prompt], *, n: int, greedy: bool, seed: int) -> list[list[Completion]]: ...


@dataclass
class Task:
    spec: Any  # the EvaluationSpec
    generate: Generate
    extract: Callable[[str], str | None]
    score: Callable[[list[Item], list[str], list[str | None]], list[float]]
    reward: Callable[[list[Item], list[str]], list[float]] | None = None
    _samples: dict[str, Any] = field(default_factory=dict)  # the shared sample set of one model


@dataclass
class MethodResult:
    rows: list[dict[str, Any]]
    samples: list[dict[str, Any]]


def fill(prompt: Prompt, template: str, **values: str) -> Prompt:
    """`template` filled with the question (`{prompt}`) and `values`; a chat keeps its other turns and gets
    the filled text as its last user turn."""
    if isinstance(prompt, list):
        chat = copy.deepcopy(prompt)
        last = max((i for i, m in enumerate(chat) if m.get("role") == "user"), default=None)
        if last is None:
            return chat + [{"role": "user", "content": template.format(prompt="", **values)}]
        chat[last]["content"] = template.format(prompt=chat[last]["content"], **values)
        return chat
    return template.format(prompt=prompt, **values)


def _timed(task: Task, prompts: list[Prompt], *, n: int, greedy: bool) -> tuple[list[list[Completion]], float]:
    t0 = time.perf_counter()
    out = task.generate(prompts, n=n, greedy=greedy, seed=task.spec.seed)
    return out, time.perf_counter() - t0


def _row(method: str, n: int, generations: int, scores: list[float], *, tokens: int, seconds: float,
         failures: int, unanswered: int) -> dict[str, Any]:
    return {"method": method, "n": n, "generations": generations, "scores": scores, "tokens": tokens,
            "seconds": round(seconds, 4), "extraction_failures": failures, "unanswered": unanswered}


def greedy(method: str, task: Task, items: list[Item]) -> MethodResult:
    """direct (the prompt as it is) or cot (the cot template): one greedy answer each."""
    prompts = [it.prompt if method == "direct" else fill(it.prompt, task.spec.cot_template) for it in items]
    outs, seconds = _timed(task, prompts, n=1, greedy=True)
    texts = [o[0].text for o in outs]
    answers = [task.extract(t) for t in texts]
    scores = task.score(items, texts, answers)
    missing = sum(a is None for a in answers)
    samples = [{"samples": [{"text": t, "answer": a, "score": s, "tokens": o[0].tokens}], "answer": a, "score": s}
               for t, a, s, o in zip(texts, answers, scores, outs)]
    return MethodResult([_row(method, 1, 1, scores, tokens=sum(o[0].tokens for o in outs), seconds=seconds,
                              failures=missing, unanswered=missing)], samples)


def sample_set(task: Task, items: list[Item]) -> dict[str, Any]:
    """max(samples) sampled completions per prompt with their answers, vote keys and scores (made once per
    model and shared by self_consistency and best_of_n)."""
    if task._samples:
        return task._samples
    spec = task.spec
    n = max(spec.samples)
    prompts = [it.prompt if spec.sample_with == "direct" else fill(it.prompt, spec.cot_template) for it in items]
    outs, seconds = _timed(task, prompts, n=n, greedy=False)
    flat_items = [it for it in items for _ in range(n)]
    texts = [c.text for o in outs for c in o]
    answers = [task.extract(t) for t in texts]
    scores = task.score(flat_items, texts, answers)
    task._samples = {
        "n": n, "seconds": seconds, "outs": outs,
        "texts": [texts[i * n:(i + 1) * n] for i in range(len(items))],
        "answers": [answers[i * n:(i + 1) * n] for i in range(len(items))],
        "scores": [scores[i * n:(i + 1) * n] for i in range(len(items))],
    }
    return task._samples


def _per_n(method: str, task: Task, items: list[Item], pick: Callable[[int, int], int | None],
           extra: Callable[[int], dict[str, Any]]) -> MethodResult:
    """Rows for every N of a sample set; `pick(i, N)` is the chosen sample of prompt i among its first N
    (None: no answer)."""
    s = sample_set(task, items)
    total_tokens = sum(c.tokens for o in s["outs"] for c in o) or 1
    rows, chosen = [], {}
    for n in task.spec.samples:
        scores, unanswered, tokens, failures = [], 0, 0, 0
        for i in range(len(items)):
            j = pick(i, n)
            chosen[(i, n)] = j
            scores.append(0.0 if j is None else s["scores"][i][j])
            unanswered += j is None
            tokens += sum(c.tokens for c in s["outs"][i][:n])
            failures += sum(a is None for a in s["answers"][i][:n])
        rows.append(_row(method, n, n, scores, tokens=tokens, seconds=s["seconds"] * tokens / total_tokens,
                         failures=failures, unanswered=unanswered))
    samples = []
    for i in range(len(items)):
        picks = {str(n): {"sample": chosen[(i, n)],
                          "answer": None if chosen[(i, n)] is None else s["answers"][i][chosen[(i, n)]],
                          "score": 0.0 if chosen[(i, n)] is None else s["scores"][i][chosen[(i, n)]]}
                 for n in task.spec.samples}
        samples.append({
            "samples": [{"text": t, "answer": a, "score": sc, "tokens": c.tokens}
                        for t, a, sc, c in zip(s["texts"][i], s["answers"][i], s["scores"][i], s["outs"][i])],
            "picks": picks, **extra(i)})
    return MethodResult(rows, samples)


def self_consistency(task: Task, items: list[Item]) -> MethodResult:
    s = sample_set(task, items)
    keys = [[vote_key(a) for a in answers] for answers in s["answers"]]
    votes: dict[tuple[int, int], int] = {}

    def pick(i: int, n: int) -> int | None:
        winner, count = majority_vote(keys[i][:n])
        votes[(i, n)] = count
        return None if winner is None else keys[i].index(winner)  # the first sample with the voted answer

    def extra(i: int) -> dict[str, Any]:
        return {"votes": {str(n): votes[(i, n)] for n in task.spec.samples}}

    return _per_n("self_consistency", task, items, pick, extra)


def best_of_n(task: Task, items: list[Item]) -> MethodResult:
    if task.reward is None:
        raise ValueError("best_of_n needs spec.rewards to rank its samples")
    s = sample_set(task, items)
    if "rewards" not in s:
        n = s["n"]
        flat = task.reward([it for it in items for _ in range(n)], [t for ts in s["texts"] for t in ts])
        s["rewards"] = [flat[i * n:(i + 1) * n] for i in range(len(items))]
    rewards = s["rewards"]

    def pick(i: int, n: int) -> int | None:
        first = rewards[i][:n]
        return max(range(len(first)), key=lambda j: (first[j], -j))  # ties: the earlier sample

    return _per_n("best_of_n", task, items, pick, lambda i: {"rewards": rewards[i]})


def refine(task: Task, items: list[Item]) -> MethodResult:
    spec = task.spec
    outs, seconds = _timed(task, [it.prompt for it in items], n=1, greedy=True)
    current = [o[0].text for o in outs]
    tokens = sum(o[0].tokens for o in outs)
    history: list[list[dict[str, Any]]] = [[] for _ in items]
    rows: list[dict[str, Any]] = []

    def score_round(r: int, texts: list[str], critiques: Sequence[str | None]) -> None:
        answers = [task.extract(t) for t in texts]
        scores = task.score(items, texts, answers)
        missing = sum(a is None for a in answers)
        rows.append(_row("refine", r, 1 + per_round * r, scores, tokens=tokens, seconds=seconds, failures=missing,
                         unanswered=missing))
        for h, t, a, sc, c in zip(history, texts, answers, scores, critiques):
            h.append({"round": r, "critique": c, "text": t, "answer": a, "score": sc})

    per_round = 1 if spec.refine_feedback == "rewards" else 2  # completions a round adds per prompt
    score_round(0, current, [None] * len(items))
    for r in range(1, spec.refine_rounds + 1):
        if spec.refine_feedback == "rewards":  # the verifier's verdict instead of the model's own critique
            if task.reward is None:
                raise ValueError("refine with refineFeedback rewards needs spec.rewards")
            crit, dt1 = [], 0.0
            critiques = [VERIFIER_FEEDBACK.format(score=r) for r in task.reward(items, current)]
        else:
            asks = [fill(it.prompt, spec.critique_template, answer=cur) for it, cur in zip(items, current)]
            crit, dt1 = _timed(task, asks, n=1, greedy=True)
            critiques = [o[0].text for o in crit]
        asks = [fill(it.prompt, spec.revise_template, answer=cur, critique=c)
                for it, cur, c in zip(items, current, critiques)]
        rev, dt2 = _timed(task, asks, n=1, greedy=True)
        current = [o[0].text for o in rev]
        tokens += sum(o[0].tokens for o in crit) + sum(o[0].tokens for o in rev)
        seconds += dt1 + dt2
        score_round(r, current, critiques)
    samples = [{"rounds": h, "answer": h[-1]["answer"], "score": h[-1]["score"]} for h in history]
    return MethodResult(rows, samples)


METHODS: dict[str, Callable[[Task, list[Item]], MethodResult]] = {
    "direct": lambda task, items: greedy("direct", task, items),
    "cot": lambda task, items: greedy("cot", task, items),
    "self_consistency": self_consistency,
    "best_of_n": best_of_n,
    "refine": refine,
}


def run_method(name: str, task: Task, items: list[Item]) -> MethodResult:
    """One method on every item (a name of `posttrain.api.evaluation.METHODS`)."""
    return METHODS[name](task, items)
