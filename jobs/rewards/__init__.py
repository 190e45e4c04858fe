"""Rewards for RL post-training (GRPO, PPO): plain callables with one signature.

    fn(prompts: list[str], completions: list[str], **fields) -> list[float | None]

- `prompts`, `completions`: one string per sample, the same length n.
- `fields`: the data set's other columns, each a list of n values
  (`answer=[...]`); take the ones you need as keyword arguments and accept
  the rest with `**_`.
- Return n values: a float, or None where the reward does not apply to that
  sample (None is left out of the weighted sum and of the reward's mean).
- Parameters of a reward are keyword-only and bound with `functools.partial`
  or a spec's `kwargs`.

Modules:
- `builtin`: exact_answer, format, length_penalty, docstring, step_count, and the process reward
  equation_steps (one score per reasoning step, for `rl.advantage: grpo_process`).
- `score`: `load_reward("module:function")`, the `RewardFunction` spec,
  `combine(...)` (weighted sum, validation, skip counters), `RewardError`.
- `scorers`: `RewardModel` (a local sequence-classification model) and
  `HttpVerifier` (a JSON-over-HTTP service); instances are rewards.

Nothing here imports torch or transformers until a `RewardModel` is made.
Tests: `.venv/bin/python -m pytest tests/test_rewards.py -q`.
"""

from posttrain.jobs.rewards.score import (
    Reward,
    RewardBatch,
    RewardError,
    RewardFunction,
    build_rewards,
    combine,
    load_reward,
)
from posttrain.jobs.rewards.scorers import HttpVerifier, RewardModel

__all__ = [
    "HttpVerifier",
    "Reward",
    "RewardBatch",
    "RewardError",
    "RewardFunction",
    "RewardModel",
    "build_rewards",
    "combine",
    "load_reward",
]
