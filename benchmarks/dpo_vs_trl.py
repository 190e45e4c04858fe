"""Our DPO (Ray Train + TRL's DPOTrainer inside, with our data, checkpoint and progress glue) against plain TRL.

Both train the same LoRA model on the same preference pairs with the same batch size, learning rate,
beta and step count. Rounds alternate which runs first (so a change in the machine's load hits both);
the script prints seconds per step of each, their ratio per round and overall (the median of the
rounds' ratios), end-to-end wall times, the final losses, and the load average before and after.

    .venv/bin/python benchmarks/dpo_vs_trl.py                        # tiny random Llama, 20 steps, 3 rounds
    .venv/bin/python benchmarks/dpo_vs_trl.py --steps 40 --hidden 256   # longer steps: fixed costs matter less
    .venv/bin/python benchmarks/dpo_vs_trl.py --smollm --steps 8 --rounds 2   # SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sft_vs_trl beside this file
from sft_vs_trl import alternating_rounds, bench_model, job_doc, run_ours, run_plain_trl  # noqa: E402 - also sets the offline environment and finds tests/support


def run_trl(doc: dict, out: Path) -> dict:
    """Plain TRL: DPOTrainer on this process, the same model, adapter, pairs and settings."""
    from posttrain.jobs.preference_data import build_preference

    return run_plain_trl(doc, out, trainer="DPO", examples=lambda spec, tok: build_preference(
        spec.data, algorithm="dpo", seed=0)[0], bf16=False, gradient_checkpointing=False, beta=0.1,
        loss_type=["sigmoid"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smollm", action="store_true", help="use SmolLM2-135M-Instruct instead of a tiny model")
    parser.add_argument("--layers", type=int, default=4, help="tiny model: decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="tiny model: hidden size")
    args = parser.parse_args()
    import tiny

    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
    model = bench_model(work, smollm=args.smollm, layers=args.layers, hidden=args.hidden)
    data_path = str(tiny.write_jsonl(work / "pairs.jsonl", tiny.pair_records(512)))
    doc = job_doc(model, data_path, args.steps, 2e-3, algorithm="dpo",
                  preference={"lossType": ["sigmoid"], "beta": 0.1})

    report = alternating_rounds(lambda out: run_trl(doc, out), lambda out: run_ours(doc, out), args.rounds,
                                work=work, model="SmolLM2-135M-Instruct" if args.smollm
                                else f"tiny-llama ({args.layers} layers, hidden {args.hidden})", steps=args.steps)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
