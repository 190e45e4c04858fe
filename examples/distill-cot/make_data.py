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


def build(*, n_train: int = 64, n_heldout: int = 32, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, heldout): distinct problems drawn from `seed`, the first `n_train` for training."""
    rng = random.Random(f"distill-cot-{seed}")
    records, seen = [], set()
    while len(records) < n_train + n_heldout:
        record = make_tasks.arith(rng)
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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    train, heldout = build(n_train=args.train, n_heldout=args.heldout, seed=args.seed)
    for name, records in (("train", train), ("heldout", heldout)):
        path = make_tasks.write_jsonl(args.out / f"{name}.jsonl", records)
        print(f"{name}: {path} ({len(records)} questions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
