"""Reward functions the RL tests train with, as a `file.py:function` reward would be given by a user.

Tests copy this file next to their job (`jobs.copy_rewards(folder)`) and name `rl_rewards.py:digits`.
`digits` is learnable from scratch by a tiny random model: the fraction of digit characters.
"""

import pathlib


def digits(prompts, completions, **_):
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]


def flaky(prompts, completions, **_):
    """digits, but raises on the call named in the file FAIL_AT (1-based), to break a run mid-way."""
    here = pathlib.Path(__file__).parent
    calls = here / "calls.txt"
    n = int(calls.read_text()) + 1 if calls.exists() else 1
    calls.write_text(str(n))
    fail_at = here / "FAIL_AT"
    if fail_at.exists() and n == int(fail_at.read_text()):
        raise RuntimeError("verifier crashed")
    return digits(prompts, completions)


def digit_lines(prompts, completions, **_):
    """A process reward: per non-blank line, the fraction of its characters that are digits."""
    out = []
    for t in completions:
        lines = [line for line in t.split("\n") if line.strip()]
        out.append([sum(c.isdigit() for c in line) / len(line) for line in lines] or None)
    return out


def nan_reward(prompts, completions, **_):
    return [float("nan")] + [0.5] * (len(completions) - 1)


def short_reward(prompts, completions, **_):
    return [0.5] * (len(completions) - 1)
