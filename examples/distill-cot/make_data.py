"""The task set of the chain-of-thought distillation example, built offline from a seed.

    python examples/distill-cot/make_data.py                  # demo-output/distill-cot/{train,heldout}.jsonl
    python examples/distill-cot/make_data.py --train 32 --heldout 16 --seed 1 --out /tmp/cot

Multi-step arithmetic word problems (`examples/eval/make_tasks.py`'s `arith`: a start, bags bought, some
given away, sometimes more found), each `{"prompt": [chat messages], "answer": <int>}`. `train.jsonl` holds
the questions the teacher writes traces for (`traces.yaml`); `heldout.jsonl` the questions the student is
evaluated on before and after SFT (`sft.yaml`'s `evaluation`). No question is in both. Same seed, same
files; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUT = REPO / "demo-output" / "distill-cot"
sys.path.insert(0, str(HERE.parent / "eval"))  # examples/ is not a package

import make_tasks  # noqa: E402


def two_step(rng: random.Random) -> dict:
    """An easier problem, within reach of a 135M teacher: a start, some bought, some given away (small numbers)."""
    name, thing = rng.choice(make_tasks.NAMES), rng.choice(make_tasks.THINGS)
    start, more = rng.randint(2, 15), rng.randint(2, 9)
    away = rng.randint(1, start + more - 1)
    text = (f"{name} has {start} {thing}. {name} buys {more} more {thing}, then gives {away} away. "
            f"How many {thing} does {name} have now?")
    return {"prompt": [{"role": "user", "content": text}], "answer": start + more - away}


TASKS = {"arith": make_tasks.arith, "two_step": two_step}


def build(*, n_train: int = 64, n_heldout: int = 32, seed: int = 0,
          task: str = "arith") -> tuple[list[dict], list[dict]]:
    """(train, heldout): distinct problems of `task` drawn from `seed`, the first `n_train` for training."""
    rng = random.Random(f"distill-cot-{seed}" if task == "arith" else f"distill-cot-{task}-{seed}")
    records, seen = [], set()
    while len(records) < n_train + n_heldout:
        record = TASKS[task](rng)
        key = record["prompt"][0]["content"]
        if key not in seen:
            seen.add(key)
            records.append({"prompt": record["prompt"], "answer": record["answer"]})
    return records[:n_train], records[n_train:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=64, help="questions the teacher answers")
    parser.add_argument("--heldout", type=int, default=32, help="questions the student is evaluated on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=sorted(TASKS), default="arith",
                        help="arith: multi-step (a product, a gift, a find); two_step: one purchase and one gift")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    train, heldout = build(n_train=args.train, n_heldout=args.heldout, seed=args.seed, task=args.task)
    for name, records in (("train", train), ("heldout", heldout)):
        path = make_tasks.write_jsonl(args.out / f"{name}.jsonl", records)
        print(f"{name}: {path} ({len(records)} questions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
