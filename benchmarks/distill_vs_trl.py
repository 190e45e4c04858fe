"""Our logit distillation (Ray Train + TRL's SFTTrainer with our loss against the cached teacher top-k) against
TRL's GKDTrainer with lmbda=0 (offline: the data set's completions, the teacher run every step).

TRL 1.16's `DistillationTrainer` is on-policy only (the student generates every completion), so the matched
offline trainer is `GKDTrainer` with `lmbda=0`, `seq_kd=False`. Both train the same student (the teacher, a tiny
4-layer Llama, with every second decoder layer: `model.keepLayers: {every: 2}`, full fine-tuning) on the same
chat examples with the same batch size (8 = micro 4 x 2), learning rate, generalized JSD (beta 0.5),
temperature 1 and step count. Ours keeps topK = the whole vocabulary, so both minimise the same loss.

Seconds per step are the Trainer's `train_runtime` / steps: for ours the teacher's scoring (once, before
training, cached in the output) is outside it and inside the wall time, which is printed too. Rounds
alternate which runs first (so a change in the machine's load hits both); the script prints the ratio per
round and overall (the median of the rounds'), the final losses, and the load average before and after.

    .venv/bin/python benchmarks/distill_vs_trl.py                       # 20 steps, 3 rounds
    .venv/bin/python benchmarks/distill_vs_trl.py --steps 5 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sft_vs_trl beside this file
from sft_vs_trl import alternating_rounds, bench_model, job_doc, run_ours  # noqa: E402 - also sets the offline environment and finds tests/support


def chat_records(n: int) -> list[dict]:
    import tiny

    return [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in tiny.arith_records(n)]


def run_gkd(doc: dict, out: Path, data_path: str) -> dict:
    """TRL's GKDTrainer (lmbda 0) on this process: the same student, teacher, data and settings."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from posttrain.api.load import parse_job
    from posttrain.jobs import models

    start = time.perf_counter()
    spec = parse_job(doc).spec
    source = models.materialize(spec.model)
    tok = models.load_tokenizer(source)
    torch.set_num_threads(os.cpu_count() or 1)
    set_seed(spec.training.seed)
    student = models.load_for_training(source, spec.model, spec.adapter)  # keepLayers applied
    teacher = AutoModelForCausalLM.from_pretrained(models.materialize(spec.teacher), dtype=torch.float32)
    d = spec.distill
    args = GKDConfig(
        output_dir=str(out), max_steps=spec.training.max_steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=spec.training.learning_rate, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=False,
        max_length=spec.training.max_seq_length, seed=0, data_seed=0, lmbda=0.0, seq_kd=False, beta=d.beta,
        temperature=d.temperature)
    train = datasets.load_dataset("json", data_files=data_path, split="train")
    runner = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tok)
    result = runner.train()
    losses = [e["loss"] for e in runner.state.log_history if "loss" in e]
    return {"wall": time.perf_counter() - start, "train": result.metrics["train_runtime"], "loss": losses[-1],
            "steps": runner.state.global_step}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import tiny
    from posttrain.jobs import models

    work = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
    model = bench_model(work, smollm=False)
    vocab = len(models.load_tokenizer(model))
    data_path = str(tiny.write_jsonl(work / "chat.jsonl", chat_records(512)))
    doc = job_doc(model, data_path, args.steps, 1e-3, algorithm="distill", teacher={"source": model},
                  distill={"loss": "jsd", "beta": 0.5, "temperature": 1.0, "alpha": 0.0, "topK": vocab})
    doc["spec"]["model"]["keepLayers"] = {"every": 2}
    doc["spec"]["adapter"] = {"type": "none"}
    doc["spec"]["data"]["train"][0]["format"] = "messages"

    report = alternating_rounds(
        lambda out: run_gkd(doc, out, data_path), lambda out: run_ours(doc, out), args.rounds, work=work,
        model="tiny-llama teacher (4 layers, hidden 128), student keepLayers every 2",
        trl="trl.experimental.gkd.GKDTrainer, lmbda 0, seq_kd False",
        loss="generalized JSD beta 0.5, temperature 1 (ours: topK = vocabulary)", steps=args.steps)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
