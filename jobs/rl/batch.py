"""Building one RL step's data: which prompts, how they are split over actors, how scores come back
together, and the padded learner batch (with process rewards placed on their tokens).

Pure functions over plain data (token ids, `Generation`s, `RewardBatch`es) and tensors; no actors.

    prompts = step_prompts(all_prompts, step, per_step=8, seed=0)
    parts = split(prompts, 2)                          # one slice per rollout actor
    batch, generated = pad_batch(gens, pad_id)         # input_ids / attention_mask / completion_mask
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from posttrain.jobs.data import Prompt
    from posttrain.jobs.rewards.score import RewardBatch

T = TypeVar("T")


def total_steps(spec: Any, n_prompts: int) -> int:
    """`training.maxSteps`, else `training.epochs` passes over the prompts at `rl.promptsPerStep` a step."""
    if spec.training.max_steps:
        return spec.training.max_steps
    return max(1, math.ceil(spec.training.epochs * n_prompts / spec.rl.prompts_per_step))


def step_prompts(prompts: list[Prompt], step: int, per_step: int, seed: int) -> list[Prompt]:
    """The prompts of `step` (0-based): consecutive slices of one shuffled pass, a new order each pass."""
    import numpy as np

    out = []
    n = len(prompts)
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, index = divmod(position, n)
        order = np.random.default_rng([seed, 31, epoch]).permutation(n) if epoch else None
        out.append(prompts[int(order[index]) if order is not None else index])
    return out


def step_seed(seed: int, step: int, actor: int) -> int:
    """The sampling seed of one actor at one step: a resumed run replays the same draws."""
    return (seed * 1_000_003 + step * 1_009 + actor) % (2**31)


def split(items: list[T], parts: int) -> list[list[T]]:
    """`items` in `parts` contiguous slices of equal size (the last ones may be short or empty).

    >>> split([1, 2, 3, 4, 5], 2)
    [[1, 2, 3], [4, 5]]
    """
    per = math.ceil(len(items) / parts)
    return [items[i * per:(i + 1) * per] for i in range(parts)]


def flatten(prompts: list[Prompt], gens: list[Any]) -> tuple[list[str], list[str], dict[str, list[Any]]]:
    """B = P x G samples for the rewards: prompt text, completion text, and every other data field."""
    texts, completions, fields = [], [], {}
    keys = sorted({k for p in prompts for k in p.fields})
    for p, g in zip(prompts, gens):
        for text in g.texts:
            texts.append(p.text)
            completions.append(text)
            for k in keys:
                fields.setdefault(k, []).append(p.fields.get(k))
    return texts, completions, fields


def merge_scores(parts: list[RewardBatch], *, step_rewards: bool) -> RewardBatch:
    """The reward actors' batches in order, as one; each reward's mean over the whole step."""
    from posttrain.jobs.rewards.score import RewardBatch

    merged = RewardBatch(rewards=[], per_function={}, means={}, skipped={}, unscored=0,
                         steps=[] if step_rewards else None)
    for part in parts:
        merged.rewards.extend(part.rewards)
        if merged.steps is not None:
            merged.steps.extend(part.steps or [])
        for label, values in part.per_function.items():
            merged.per_function.setdefault(label, []).extend(values)
            merged.skipped[label] = merged.skipped.get(label, 0) + part.skipped.get(label, 0)
        merged.unscored += part.unscored
    for label, values in merged.per_function.items():
        present = [x for v in values if v is not None for x in (v if isinstance(v, list) else [v])]
        merged.means[label] = sum(present) / len(present) if present else None
    return merged


def pad_batch(gens: list[Any], pad_id: int) -> tuple[dict[str, Any], int]:
    """Learner rows (prompt + completion, right-padded) and the number of generated tokens.

    Returns `input_ids`, `attention_mask`, `completion_mask`, each (B, L) long tensors, and, when the
    engines returned every sampled token's logprob, `rollout_logprobs` (B, L) float32 aligned with
    `input_ids` (0 off the completion): what `rl.rolloutCorrection` weighs against the trainer's.
    """
    import torch

    rows, masks, logps = [], [], []
    for g in gens:
        for i, toks in enumerate(g.token_ids):
            rows.append(list(g.prompt_token_ids) + list(toks))
            masks.append([0] * len(g.prompt_token_ids) + [1] * len(toks))
            lp = g.logprobs[i] if i < len(g.logprobs) else None
            logps.append([0.0] * len(g.prompt_token_ids) + list(lp) if lp is not None and len(lp) == len(toks)
                         else None)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    completion = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, :len(r)] = torch.tensor(r)
        attention[i, :len(r)] = 1
        completion[i, :len(m)] = torch.tensor(m)
    out = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}
    if rows and all(lp is not None for lp in logps):
        rollout = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, lp in enumerate(logps):
            rollout[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        out["rollout_logprobs"] = rollout
    return out, int(completion.sum())


def line_end_tokens(token_ids: list[int], tokenizer: Any) -> list[int]:
    """For each non-blank line of the decoded completion, the index of the token that ends it.

    A line ends at the token holding its newline (the last line at the last token). Tokens are
    decoded one by one only to find newlines, which byte-level and SentencePiece tokenizers both
    keep whole in a single token.
    """
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    newline_tokens = [i for i, t in enumerate(token_ids)
                      for _ in range(tokenizer.decode([t], skip_special_tokens=True).count("\n"))]
    out = []
    for k, line in enumerate(text.split("\n")):
        if line.strip():
            out.append(newline_tokens[k] if k < len(newline_tokens) else max(0, len(token_ids) - 1))
    return out


def place_step_rewards(steps: list[list[float]], gens: list[Any], mask: Any, tokenizer: Any):
    """Process rewards as (B, L) tensors: each step's score on the token that ends its line, and the step mask.

    A sample scored per step must have one score per non-blank line of its completion
    (`posttrain.jobs.rewards.builtin.reasoning_steps`); a sample with one (outcome) score gets it on its
    last token.
    """
    import torch

    rewards = torch.zeros(mask.shape, dtype=torch.float32)
    ends = torch.zeros(mask.shape, dtype=torch.bool)
    row = 0
    for g in gens:
        start = len(g.prompt_token_ids)
        for toks, text in zip(g.token_ids, g.texts):
            scores = steps[row]
            positions = line_end_tokens(toks, tokenizer) if len(scores) > 1 else []
            if len(scores) > 1 and len(positions) != len(scores):
                raise ValueError(f"process rewards gave {len(scores)} step scores for a completion with "
                                 f"{len(positions)} non-blank lines; a process reward returns one score per "
                                 f"non-blank line (completion: {text[:80]!r})")
            for score, pos in zip(scores, positions or [max(0, len(toks) - 1)]):
                rewards[row, start + pos] += score
                ends[row, start + pos] = True
            row += 1
    return rewards, ends


def std(values: list[float]) -> float:
    """Sample standard deviation (0 for fewer than two values)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
