"""Learner seconds per step by micro-batching: the old fixed-row micro-batches padded to the step's widest row,
against `rl.micro` (rows cut to their own longest row; `rl.microBatchTokens` bins).

One process, one torch thread, the learner's own forward / loss / backward (`learner.forward`,
`rl.micro`, the grpo loss) on a random tiny Llama (hidden 128, as benchmarks/grpo_vs_trl.py) and a step
of P x G = 32 rows, prompts of 8-24 tokens and completion lengths drawn between 1 and maxNewTokens (a
quarter of them at the limit, as truncated completions are). Configurations run interleaved, `--rounds`
times; the median is printed with the load average (a shared machine: read the least disturbed round).

    .venv/bin/python benchmarks/learner_micro.py                          # maxNewTokens 16 and 256
    .venv/bin/python benchmarks/learner_micro.py --max-new-tokens 256 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # tiny models

from posttrain.jobs.rl.math.algos import POLICY_LOSSES  # noqa: E402
from posttrain.jobs.rl.micro import loss_shares, micro_batches  # noqa: E402
from posttrain.jobs.rl.workers.learner import forward  # noqa: E402


def step_batch(rows: int, max_new: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(8, 25, (rows,), generator=g).tolist()
    done = torch.randint(1, max_new + 1, (rows,), generator=g).tolist()
    completions = [max_new if i % 4 == 0 else c for i, c in enumerate(done)]
    width = max(p + c for p, c in zip(prompts, completions))
    ids = torch.zeros((rows, width), dtype=torch.long)
    att, comp = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :p + c] = torch.randint(5, 60, (p + c,), generator=g)
        att[i, :p + c], comp[i, p:p + c] = 1, 1
    adv = torch.where(comp.bool(), torch.randn(rows, 1, generator=g), 0.0)
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp, "advantages": adv,
            "old_logprobs": torch.where(comp.bool(), -3.0, 0.0)}


def old_parts(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """Before: `rows` rows at a time, every one at the step's full width."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + rows] for k, v in batch.items()} for i in range(0, n, rows)]


def one_step(model, parts, weights) -> float:
    loss_fn = POLICY_LOSSES.get("grpo")
    start = time.perf_counter()
    for mb, w in zip(parts, weights):
        logp, _ = forward(model, mb)
        loss, _ = loss_fn(logp, mb["old_logprobs"], mb["advantages"], mb["completion_mask"])
        (loss * w).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, nargs="*", default=[16, 256])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import tiny
    from transformers import AutoModelForCausalLM

    path = tiny.make_model(Path(tempfile.mkdtemp(prefix="bench-micro-")), hidden=128)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for max_new in args.max_new_tokens:
        batch = step_batch(args.rows, max_new, seed=0)
        real = int(batch["attention_mask"].sum())
        budget = 4 * (24 + max_new)  # about four of the longest rows
        configs = {
            "before: microBatchSize 1 (padded)": old_parts(batch, 1),
            f"before: microBatchSize {args.rows} (padded)": old_parts(batch, args.rows),
            "after: microBatchSize 1 (cut)": micro_batches(batch, rows=1),
            f"after: microBatchTokens {budget}": micro_batches(batch, tokens=budget),
        }
        times: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, parts in configs.items():
                weights = loss_shares(parts, "sequences")
                times[name].append(one_step(model, parts, weights))
        print(f"maxNewTokens {max_new}: {args.rows} rows, width {batch['input_ids'].shape[1]}, "
              f"{real} real tokens; load {[round(x, 2) for x in os.getloadavg()]}")
        for name, parts in configs.items():
            slots = sum(mb["input_ids"].numel() for mb in parts)
            print(f"  {name:40s} {statistics.median(times[name]):7.3f} s/step (median of {args.rounds}), "
                  f"{len(parts)} forwards, {slots} token slots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
