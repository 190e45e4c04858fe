"""Reading an answer out of a completion and scoring it against the record's answer (pure; no model).

    extract = extractor(AnswerSpec(extract="last_number"))
    extract("6 + 7 is 13.")                                   # '13'
    extract("no number here")                                 # None: counted as an extraction failure
    score_match("13", 13, tolerance=0.0)                      # 1.0
    text_score("the cat sat", "the cat sat", "chrf")          # 1.0 (sacrebleu's chrF / 100)

Extractors: `last_number`, `answer_tag` (the last `<answer>...</answer>`), `regex` (its first group, or the
whole match), `full` (the completion, stripped), or a user function `module:function` / `file.py:function`
taking the completion and returning a string or None. An extractor never raises on a completion: no
match is None, and the caller counts it.

Tests: `.venv/bin/python -m pytest tests/test_eval_methods.py -q`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

Extractor = Callable[[str], "str | None"]


def last_number(text: str) -> str | None:
    """The last number in `text`, thousands separators dropped and a trailing '.0' kept as written.

    >>> last_number("Eli has 51 marbles and 1,099 apples."), last_number("none")
    ('1099', None)
    """
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def answer_tag(text: str) -> str | None:
    """The content of the last `<answer>...</answer>`, stripped.

    >>> answer_tag("<think>2+2</think><answer> 4 </answer>"), answer_tag("4")
    ('4', None)
    """
    found = ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def regex_extractor(pattern: str) -> Extractor:
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        match = None
        for match in compiled.finditer(text):  # the last match: a final answer comes last
            pass
        if match is None:
            return None
        return (match.group(1) if compiled.groups else match.group(0)).strip()

    return extract


def extractor(spec: Any, *, base_dir: str | Path | None = None, where: str = "spec.evaluation.answer") -> Extractor:
    """The extraction function of an `AnswerSpec` (`spec.extract`, `spec.pattern`; `where` is its field path);
    a `module:function` is imported here, so a typo fails before anything is written (ValueError naming the
    field)."""
    name = spec.extract
    if name == "last_number":
        return last_number
    if name == "answer_tag":
        return answer_tag
    if name == "regex":
        return regex_extractor(spec.pattern)
    if name == "full":
        return lambda text: text.strip() or None
    from posttrain.jobs.rewards.score import RewardError, load_reward

    module, _, attr = name.rpartition(":")
    if module.endswith(".py") and base_dir and not Path(module).is_absolute():
        name = f"{Path(base_dir, module)}:{attr}"
    try:
        fn = load_reward(name)
    except RewardError as exc:
        raise ValueError(f"{where}.extract: {exc.message}") from None
    return _guarded(fn, spec.extract, where=where)


def _guarded(fn: Callable[[str], Any], name: str, *, where: str) -> Extractor:
    def extract(text: str) -> str | None:
        out = fn(text)
        if out is not None and not isinstance(out, (str, int, float)):
            raise TypeError(f"{where}.extract: {name} returned {type(out).__name__}; "
                            "return a string or None")
        return None if out is None else str(out)

    return extract


def as_number(text: Any) -> float | None:
    """`text` as a finite number, or None.

    >>> as_number("1,000"), as_number(" 7. "), as_number("seven")
    (1000.0, 7.0, None)
    """
    if isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return float(text) if math.isfinite(text) else None
    cleaned = str(text).strip().replace(",", "").rstrip(".").strip()
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def normalize(text: Any) -> str:
    """How strings are compared for match and for voting: case, outer spaces and a final '.' ignored.

    >>> normalize("  Paris. "), normalize(42)
    ('paris', '42')
    """
    return " ".join(str(text).split()).rstrip(".").strip().lower()


def vote_key(answer: str | None) -> str | None:
    """The key votes are counted under: the number when it reads as one ('7.0' and '7' agree), else the
    normalised text; None (no answer) casts no vote."""
    if answer is None:
        return None
    number = as_number(answer)
    if number is not None:
        return repr(int(number)) if number.is_integer() else repr(number)
    return normalize(answer)


def score_match(answer: str | None, reference: Any, *, tolerance: float = 0.0) -> float:
    """1.0 when `answer` equals `reference` (both numbers: within `tolerance`; else normalised text), else 0.0.

    >>> score_match("13", 13), score_match("12.9", 13, tolerance=0.2), score_match(None, 13), score_match("Paris", "paris.")
    (1.0, 1.0, 0.0, 1.0)
    """
    if answer is None or reference is None:
        return 0.0
    a, r = as_number(answer), as_number(reference)
    if a is not None and r is not None:
        return 1.0 if abs(a - r) <= tolerance else 0.0
    return 1.0 if normalize(answer) == normalize(reference) else 0.0


def text_score(answer: str | None, reference: Any, metric: str) -> float:
    """sacrebleu's sentence BLEU or chrF of `answer` against `reference`, scaled to [0, 1]; no answer is 0."""
    if answer is None or reference is None:
        return 0.0
    import sacrebleu

    fn = {"bleu": sacrebleu.sentence_bleu, "chrf": sacrebleu.sentence_chrf}[metric]
    return round(fn(answer, [str(reference)]).score / 100.0, 6)


def scorer(spec: Any) -> Callable[[str | None, Any], float]:
    """`score(answer, reference)` of an AnswerSpec whose metric reads the reference (match, bleu, chrf)."""
    if spec.metric == "match":
        return lambda answer, reference: score_match(answer, reference, tolerance=spec.tolerance)
    if spec.metric in ("bleu", "chrf"):
        return lambda answer, reference: text_score(answer, reference, spec.metric)
    raise ValueError(f"metric {spec.metric} is scored by the rewards, not against a reference")
