"""Text statistics of generated data sets (pure): near-duplicate detection and a diversity report.

    pool = Dedup(max_similarity=0.7, seeds=["Name three colours."])
    pool.check("Name three colours!")      # 'duplicate' (equal after normalisation)
    pool.check("Name three bright colours.")  # 'similar_to_seed' (ROUGE-L F1 0.86 > 0.7)
    pool.check("Write a haiku about rain.")   # 'new' (and it joins the pool)
    diversity(["a b", "a c"])              # distinct-1 3/4, distinct-2 2/2, word lengths 2 / 2 / 2, stdev 0

Words are lowercase runs of letters, digits and underscores (`\\w+`); the normal form of a text is its
words joined by one space, so case, punctuation and spacing do not make a text new.

Tests: `.venv/bin/python -m pytest tests/test_generate_tasks.py -q`.
"""

from __future__ import annotations

import re
import statistics
from typing import Any

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """The words of `text`, lowercase.

    >>> words("Name THREE colours, please!")
    ['name', 'three', 'colours', 'please']
    """
    return WORD.findall(text.lower())


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F1 of two word lists: the longest common subsequence's length over each list's length,
    combined as 2PR / (P + R).

    >>> rouge_l("name three colours".split(), "name three bright colours".split())
    0.857143
    >>> rouge_l([], ["x"])
    0.0
    """
    if not a or not b:
        return 0.0
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return round(2 * p * r / (p + r), 6)


class Dedup:
    """The pool new texts are compared with: the seeds, then every text `check` accepted.

    `check(text)` is `duplicate` (its normal form equals a seed's or a kept text's), `similar_to_seed`
    (ROUGE-L F1 with a seed above `max_similarity`), `near_duplicate` (the same with a kept text) or `new`
    (then the text joins the pool)."""

    def __init__(self, *, max_similarity: float, seeds: list[str]) -> None:
        self.max_similarity = max_similarity
        self.seen = {" ".join(words(s)) for s in seeds}
        self.seeds = [words(s) for s in seeds]
        self.kept: list[list[str]] = []

    def check(self, text: str) -> str:
        w = words(text)
        if " ".join(w) in self.seen:
            return "duplicate"
        if any(rouge_l(w, s) > self.max_similarity for s in self.seeds):
            return "similar_to_seed"
        if any(rouge_l(w, k) > self.max_similarity for k in self.kept):
            return "near_duplicate"
        self.seen.add(" ".join(w))
        self.kept.append(w)
        return "new"


def distinct(texts: list[str], n: int) -> float | None:
    """Distinct-n: distinct word n-grams over all word n-grams of `texts` (None when there are none).

    >>> distinct(["a b a", "a b"], 1), distinct(["a b a", "a b"], 2)
    (0.4, 0.666667)
    """
    grams = [tuple(w[i:i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return round(len(set(grams)) / len(grams), 6) if grams else None


def lengths(texts: list[str]) -> dict[str, Any]:
    """The spread of lengths in words: min, median, max, stdev (sample; 0 for one text).

    >>> lengths(["a", "a b c", "a b c d e"])
    {'min': 1, 'median': 3, 'max': 5, 'stdev': 2.0}
    """
    sizes = [len(words(t)) for t in texts]
    if not sizes:
        return {"min": None, "median": None, "max": None, "stdev": None}
    return {"min": min(sizes), "median": statistics.median(sizes), "max": max(sizes),
            "stdev": round(statistics.stdev(sizes), 6) if len(sizes) > 1 else 0.0}


def diversity(texts: list[str]) -> dict[str, Any]:
    """distinct-1, distinct-2 and the length spread of a list of texts."""
    return {"distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2), "length_words": lengths(texts)}
