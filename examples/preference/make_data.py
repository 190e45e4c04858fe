"""A preference set built offline from the GRPO demo's counting questions: the right count is chosen, a wrong one rejected.

    python examples/preference/make_data.py        # writes demo-output/preference/data/{pairs,pairs-eval,kto}.jsonl
    python examples/preference/make_data.py --train 512 --eval 64 --seed 1 --out /tmp/data

The questions are `examples/grpo/make_data.py`'s (same seed, same questions, chat prompts):

    {"prompt": [{"role": "system", "content": "Reply with only the number."},
                {"role": "user", "content": "Eli has 51 marbles and 99 apples. How many apples does Eli have?"}],
     "chosen": "99", "rejected": "51"}

Half of the rejected answers are the other count of the sentence (the mistake a model makes), half a
nearby wrong number. `kto.jsonl` holds the same training pairs unpaired: each question once with its
right answer (`label: true`) and once with the wrong one (`label: false`). The examples
`examples/dpo-lora.yaml`, `examples/reward-model.yaml` and `examples/kto.yaml` read these files.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "demo-output" / "preference" / "data"


def _grpo_make_data():
    """examples/grpo/make_data.py (examples/ is not a package): the questions come from there."""
    spec = importlib.util.spec_from_file_location("grpo_make_data", REPO / "examples" / "grpo" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


questions = _grpo_make_data()


def wrong_answer(record: dict, rng: random.Random) -> int:
    """The other count of the sentence, or a nearby wrong number (never the right answer)."""
    counts = [int(n) for n in re.findall(r"\d+", questions.question(record))]
    other = next(n for n in counts if n != record["answer"])
    if rng.random() < 0.5:
        return other
    return record["answer"] + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if record["answer"] + d != other])


def pairs(records: list[dict], seed: int) -> list[dict]:
    rng = random.Random(seed + 10_000)
    return [{"prompt": r["prompt"], "chosen": str(r["answer"]), "rejected": str(wrong_answer(r, rng))}
            for r in records]


def unpaired(records: list[dict]) -> list[dict]:
    out = []
    for p in records:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False})
    return out


def build(*, n_train: int = questions.N_TRAIN, n_eval: int = questions.N_EVAL, seed: int = 0) -> tuple[list, list]:
    """(train pairs, eval pairs): the GRPO demo's questions of the same seed."""
    train, held = questions.build(n_train=n_train, n_eval=n_eval, seed=seed)
    return pairs(train, seed), pairs(held, seed + 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the .jsonl files")
    parser.add_argument("--train", type=int, default=questions.N_TRAIN, help="training pairs")
    parser.add_argument("--eval", type=int, default=questions.N_EVAL, help="held-out pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held = build(n_train=args.train, n_eval=args.eval, seed=args.seed)
    questions.write_jsonl(args.out / "pairs.jsonl", train)
    questions.write_jsonl(args.out / "pairs-eval.jsonl", held)
    questions.write_jsonl(args.out / "kto.jsonl", unpaired(train))
    print(f"wrote {len(train)} train and {len(held)} eval pairs, and {2 * len(train)} kto records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
