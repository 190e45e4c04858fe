"""Majority votes and 95% confidence intervals (pure; no model, no numpy needed).

    majority_vote(["7", None, "8", "7"])          # ('7', 2): None casts no vote
    majority_vote(["8", "7", "7", "8"])           # ('8', 2): a tie goes to the answer sampled first
    wilson(45, 64)                                # (0.5823..., 0.8009...)
    ci95([1.0, 0.0, 1.0])                         # Wilson for 0/1 scores, a seeded bootstrap otherwise

Tie rule (documented in the README): among the answers with the most votes, the one whose first vote
came earliest in sample order wins. Sample order is fixed by the seed, so a vote is reproducible, and
the rule is the one a reader applies by hand to `samples.jsonl`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def majority_vote(keys: Sequence[str | None]) -> tuple[str | None, int]:
    """(the winning key, its votes); (None, 0) when no sample has an answer.

    >>> majority_vote(["a", "b", "b"]), majority_vote([None, None]), majority_vote(["b", "a"])
    (('b', 2), (None, 0), ('b', 1))
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None, 0
    best = min(counts, key=lambda k: (-counts[k], first[k]))
    return best, counts[best]


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927); (0, 0) for n = 0.

    >>> [round(x, 4) for x in wilson(45, 64)]
    [0.5823, 0.8009]
    >>> wilson(0, 10)[0], round(wilson(10, 10)[1], 6)
    (0.0, 1.0)
    """
    if n <= 0:
        return 0.0, 0.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(scores: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap 95% interval of the mean (Efron 1979), from a seeded generator.

    >>> bootstrap([0.5, 0.5, 0.5])
    (0.5, 0.5)
    """
    n = len(scores)
    if n == 0:
        return 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[int(0.025 * resamples)]
    hi = means[min(resamples - 1, int(math.ceil(0.975 * resamples)) - 1)]
    return lo, hi


def ci95(scores: Sequence[float], *, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of the mean score: Wilson when every score is 0 or 1 (an accuracy), else a
    bootstrap (BLEU, chrF, rewards)."""
    if all(s in (0.0, 1.0) for s in scores):
        return wilson(sum(scores), len(scores))
    return bootstrap(scores, seed=seed)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0
