"""A held-out task set with verifiable answers, built offline from a seed: what `examples/eval/` evaluates.

    python examples/eval/make_tasks.py                        # demo-output/eval/data/{counting,arith,tasks,docstrings}.jsonl
    python examples/eval/make_tasks.py --n 64 --seed 1 --out /tmp/tasks

Two tasks, each record `{"prompt": [chat messages], "answer": <int>, "task": ...}`:

- `counting`: the GRPO demo's held-out questions (`examples/grpo/make_data.py`, the same seed, so the
  very questions `make demo` holds out): "Eli has 51 marbles and 99 apples. How many apples does Eli
  have?" -> 99, with the system prompt "Reply with only the number.";
- `arith`: multi-step word problems, two or three operations on small numbers, no system prompt:
  "Ana has 12 apples. She buys 3 bags of 4 apples each, then gives 5 away. How many apples does Ana
  have now?" -> 19.

`tasks.jsonl` is both, counting first. A third task, free text, scored with a text metric (chrF) rather
than a match, goes to its own file `docstrings.jsonl` (an evaluation has one metric):

- `docstring`: the docstring demo's held-out functions (`examples/docstrings/make_data.py`, the same seed,
  so `make demo-sft`'s very eval split): the function's source without its docstring -> the real one-line
  summary, `{"prompt": [system, user], "answer": "<summary>", "task": "docstring"}`.

Same seed, same files; nothing is downloaded (the docstrings come from this Python's standard library).
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUT = REPO / "demo-output" / "eval" / "data"
sys.path.insert(0, str(HERE.parent / "grpo"))  # the demo's question maker; examples/ is not a package

import make_data as counting  # noqa: E402


@functools.lru_cache(maxsize=1)
def _docstring_maker():
    """examples/docstrings/make_data.py, loaded under its own name (the GRPO maker is `make_data` too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("docstring_data", HERE.parent / "docstrings" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module

NAMES = ("Ana", "Ben", "Carla", "Dev", "Eli", "Fay", "Gus", "Hana")
THINGS = ("apples", "books", "coins", "pens", "stamps", "shells", "marbles", "cards")


def arith(rng: random.Random) -> dict:
    """One multi-step problem: a start, bags bought (a product), some given away, sometimes a share."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    start, bags, per_bag = rng.randint(3, 20), rng.randint(2, 5), rng.randint(2, 6)
    have = start + bags * per_bag
    away = rng.randint(1, have - 1)
    text = (f"{name} has {start} {thing}. {name} buys {bags} bags of {per_bag} {thing} each, "
            f"then gives {away} away.")
    have -= away
    if rng.random() < 0.5:  # a third step: a second purchase
        more = rng.randint(2, 9)
        text += f" Then {name} finds {more} more."
        have += more
    text += f" How many {thing} does {name} have now?"
    return {"prompt": [{"role": "user", "content": text}], "answer": have, "task": "arith"}


def build(*, n: int = 32, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(counting, arith): `n` records each. Counting takes the GRPO demo's held-out questions (seed 0 gives
    exactly the ones `make demo` holds out), arithmetic its own draws from `seed`."""
    _, held = counting.build(n_train=counting.N_TRAIN, n_eval=max(n, counting.N_EVAL), seed=seed)
    count_records = [{**r, "task": "counting"} for r in held[:n]]
    rng = random.Random(f"arith-{seed}")
    arith_records, seen = [], set()
    while len(arith_records) < n:
        record = arith(rng)
        key = record["prompt"][0]["content"]
        if key not in seen:
            seen.add(key)
            arith_records.append(record)
    return count_records, arith_records


@functools.lru_cache(maxsize=4)
def _held_docstrings(n_eval: int, seed: int) -> list[dict]:
    maker = _docstring_maker()
    return maker.build(n_train=maker.N_TRAIN, n_eval=n_eval, seed=seed)[1]  # reads the whole stdlib: once


def docstrings(*, n: int = 32, seed: int = 0) -> list[dict]:
    """`n` of the docstring demo's held-out functions (seed 0: the ones `make demo-sft` evaluates on) as
    `{prompt, answer}` records: the chat without its assistant turn, and that turn's text."""
    held = _held_docstrings(max(n, _docstring_maker().N_EVAL), seed)
    return [{"prompt": r["messages"][:-1], "answer": r["messages"][-1]["content"], "task": "docstring"}
            for r in held[:n]]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write(out: Path, *, n: int = 32, seed: int = 0) -> dict[str, Path]:
    count_records, arith_records = build(n=n, seed=seed)
    return {"counting": write_jsonl(out / "counting.jsonl", count_records),
            "arith": write_jsonl(out / "arith.jsonl", arith_records),
            "tasks": write_jsonl(out / "tasks.jsonl", count_records + arith_records),
            "docstrings": write_jsonl(out / "docstrings.jsonl", docstrings(n=n, seed=seed))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="records per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for name, path in write(args.out, n=args.n, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
