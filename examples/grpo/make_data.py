"""Verifiable questions for the GRPO demo, generated offline from a seed.

    python examples/grpo/make_data.py                   # writes demo-output/grpo/data/{train,eval}.jsonl
    python examples/grpo/make_data.py --train 512 --eval 64 --seed 1 --out /tmp/data

Each record asks about one of two counts in a sentence, and its answer is one
exact number:

    {"prompt": [{"role": "system", "content": "Reply with only the number."},
                {"role": "user", "content": "Eli has 51 marbles and 99 apples. How many apples does Eli have?"}],
     "answer": 99}

`prompt` is a chat, so `posttrain` renders it through the model's chat
template; `answer` reaches the reward `posttrain.jobs.rewards.builtin:exact_answer`,
which compares it with the last number of the completion. Which count is asked
for is drawn at random, so answering "the first number" scores half. The two
counts differ, and no question appears twice across train and eval. Same seed,
same files.
`examples/grpo/job.yaml` reads the files this writes; `demo.py` calls `build` directly.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "demo-output" / "grpo" / "data"

SYSTEM = "Reply with only the number."
NAMES = ("Anna", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena")
THINGS = ("apples", "books", "coins", "pens", "stamps", "shells", "marbles", "cards", "plums", "keys")
LOW, HIGH = 2, 99  # counts are drawn from LOW..HIGH
# job.yaml takes 8 prompts a step for 16 steps: 128 of the 256, so no training question repeats.
N_TRAIN, N_EVAL = 256, 64


def question(record: dict) -> str:
    """The user turn of a record (what the model is asked)."""
    return record["prompt"][-1]["content"]


def make(rng: random.Random) -> tuple[str, int]:
    """One (question, answer) pair drawn from `rng`."""
    first, second = rng.sample(range(LOW, HIGH + 1), 2)
    thing1, thing2 = rng.sample(THINGS, 2)
    name = rng.choice(NAMES)
    asked, answer = rng.choice(((thing1, first), (thing2, second)))
    return f"{name} has {first} {thing1} and {second} {thing2}. How many {asked} does {name} have?", answer


def build(*, n_train: int = N_TRAIN, n_eval: int = N_EVAL, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records, every question distinct; the same seed gives the same records."""
    if n_train < 0 or n_eval < 0:
        raise ValueError(f"need n_train >= 0 and n_eval >= 0, got {n_train} and {n_eval}")
    rng = random.Random(seed)
    seen: set[str] = set()
    records = []
    while len(records) < n_train + n_eval:
        text, answer = make(rng)
        if text in seen:
            continue
        seen.add(text)
        records.append({"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                        "answer": answer})
    return records[:n_train], records[n_train:]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=N_TRAIN, help="training questions")
    parser.add_argument("--eval", type=int, default=N_EVAL, help="held-out questions")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held = build(n_train=args.train, n_eval=args.eval, seed=args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", held)
    print(f"wrote {len(train)} train and {len(held)} eval records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
