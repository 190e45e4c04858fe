"""Our on-policy distillation (`distill.mode: on_policy` on the RL single controller: rollout, teacher and learner
Ray actors) against TRL's `DistillationTrainer` (on-policy generalized JSD, everything in one process).

Matched on both sides:

- the teacher: a tiny random 4-layer Llama (hidden 128) with its head scaled x12 so its distributions are sharp
  (as tests/test_distill_e2e.py's); the student: the teacher with every second decoder layer
  (`model.keepLayers: {every: 2}`, loaded by our `models.load_for_training` on both sides), full fine-tuning;
- the prompts, in the same order: our loop's first pass over the data (TRL tokenizes the texts into the same ids as
  ours, checked for this tokenizer); each step is `--prompts-per-step` prompts
  x `--group-size` completions. TRL's DistillationTrainer samples one completion per prompt (n=1), so its data
  set holds each prompt `--group-size` times in a row, `shuffle_dataset=False`, and its per-step batch
  (`per_device_train_batch_size`, one micro-batch, no accumulation) is prompts x group; ours trains the step's
  rows as one micro-batch too (`training.microBatchSize`);
- sampling: `--max-new-tokens`, `--temperature` (both sides also divide both models' logits by it in the loss),
  top-p 1, no top-k; the transformers `generate` engine on both sides (ours on its rollout actor);
- the loss: the generalized JSD with beta 0.5 (mixture beta p_teacher + (1 - beta) p_student, both sides' own
  definition); ours with `distill.topK` = the vocabulary size, so the teacher's top-k plus tail is the whole
  distribution and the two losses are the same function; averaged over the completion tokens;
- fully on-policy: DistillationTrainer has no `lmbda` (TRL 1.16's stable trainer always generates with the
  student), which is ours (every batch sampled by the current student);
- AdamW at `--lr`, constant schedule, no warm-up, weight decay 0, gradient clipping at 1.0, `--steps` steps,
  seed 0; `--threads` torch threads for TRL's process and for each of our learner, rollout and teacher actors.

What differs, by design: ours samples on a rollout actor and gets the student's weights pushed after every step
(`time_sync`), and the teacher scores on its own actor, returning the top-k (here: all 400) log-probabilities per
sampled token; TRL samples with the training model in its process and runs the teacher there on the same batch,
comparing hidden states through both heads chunk by chunk (`ChunkedDivergenceFunction`). The samples are not the
same tokens (different processes, different random streams), so the final divergences agree only roughly. TRL's
loss forward passes no position ids, so its left-padded rows see positions shifted by their padding; Llama's RoPE
makes attention depend on relative positions only, so this changes nothing here (ours passes mask-derived ids).

Seconds per step: ours the loop's `time_step` (generate + teacher + train + weight sync; Ray start-up and actor
loading are outside it, inside the wall time), TRL's from each optimizer step's begin to its end (its generation
and teacher pass are inside the step); both averaged over all steps (step 1 carries warm-up on both sides).
Rounds alternate which side runs first; the script prints the ratio ours/TRL per round and their median, the wall
times, the final divergences and the load average before and after, then the JSON report.

    .venv/bin/python benchmarks/distill_on_policy_vs_trl.py                       # 10 steps, 3 rounds
    .venv/bin/python benchmarks/distill_on_policy_vs_trl.py --steps 5 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmarks beside this file
from grpo_vs_trl import StepClock, first_pass_prompts, progress, tail_mean  # noqa: E402 - also sets the offline environment
from sft_vs_trl import alternating_rounds  # noqa: E402

PHASES = ("time_generate", "time_teacher", "time_train", "time_sync")


def sharp_teacher(folder: Path) -> Path:
    """A tiny 4-layer Llama whose head is scaled x12: a random model's distributions are nearly uniform."""
    import torch
    from transformers import AutoModelForCausalLM

    import tiny

    tiny.make_model(folder, layers=4, hidden=128, seed=5)
    net = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        net.lm_head.weight.mul_(12.0)
    net.save_pretrained(folder)
    return folder


def job_doc(teacher: str, data: str, *, args: argparse.Namespace, vocab: int) -> dict:
    rows = args.prompts_per_step * args.group_size
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainingJob",
        "metadata": {"name": "bench-distill-on-policy"},
        "spec": {
            "algorithm": "distill",
            "model": {"source": teacher, "keepLayers": {"every": 2}},
            "teacher": {"source": teacher},
            "adapter": {"type": "none"},
            "data": {"train": [{"source": data}]},
            "training": {"maxSteps": args.steps, "learningRate": args.lr, "seed": 0, "weightDecay": 0.0,
                         "maxSeqLength": 64 + args.max_new_tokens, "microBatchSize": rows,
                         "lrScheduler": "constant"},
            # topK = the vocabulary: the exact divergence, as TRL's over the full logits
            "distill": {"mode": "on_policy", "loss": "jsd", "beta": 0.5, "temperature": args.temperature,
                        "topK": vocab},
            "rl": {"groupSize": args.group_size, "promptsPerStep": args.prompts_per_step,
                   "maxNewTokens": args.max_new_tokens, "temperature": args.temperature, "topP": 1.0},
            "roles": {"rollout": {"engine": "transformers", "cpus": args.threads},
                      "learner": {"cpus": args.threads}, "teacher": {"cpus": args.threads}},
        },
    }


def run_ours(doc: dict, work: Path, out: Path) -> dict:
    from posttrain.api.load import parse_job
    from posttrain.jobs import driver

    start = time.perf_counter()
    summary = driver.run(parse_job(doc, require_available=True),
                         driver.RunOptions(output=str(out), base_dir=work, overwrite=True, on_event=progress))
    wall = time.perf_counter() - start
    if summary["status"] != "succeeded":
        raise SystemExit(f"posttrain's run failed: {summary.get('error')}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = [m for m in lines if "time_step" in m]
    ours = {"wall": wall, "train": sum(m["time_step"] for m in lines), "steps": len(lines),
            "loss": lines[-1]["distill_loss"],
            "details": details([m["distill_loss"] for m in lines], [m["time_step"] for m in lines],
                               [m["response_length_mean"] for m in lines])}
    # where our step goes (steps 2..N): sampling on the rollout actor, the teacher actor's scoring, the learner's
    # step, the weight push to the rollout actor
    ours["details"]["phases_2_to_n"] = {k: round(tail_mean([m[k] for m in lines]), 4) for k in PHASES}
    return ours


def run_trl(doc: dict, work: Path, out: Path, texts: list[str], threads: int) -> dict:
    """TRL's DistillationTrainer on this process: the same student, teacher, prompts and settings."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback, set_seed
    from trl import DistillationConfig, DistillationTrainer

    from posttrain.api.load import parse_job
    from posttrain.jobs import models

    start = time.perf_counter()
    spec = parse_job(doc).spec
    rl, training = spec.rl, spec.training
    source = models.materialize(spec.model, base=work)
    tok = models.load_tokenizer(source)
    torch.set_num_threads(threads)
    set_seed(training.seed)
    student = models.load_for_training(source, spec.model, spec.adapter)  # keepLayers applied
    teacher = AutoModelForCausalLM.from_pretrained(models.materialize(spec.teacher, base=work), dtype=torch.float32)
    # n=1 per prompt: each prompt group_size times in a row, so a step's batch is ours (prompts x group)
    prompts = [{"prompt": t} for t in texts[: training.max_steps * rl.prompts_per_step] for _ in range(rl.group_size)]
    cfg = DistillationConfig(
        output_dir=str(out), max_steps=training.max_steps, seed=training.seed, data_seed=training.seed,
        per_device_train_batch_size=rl.prompts_per_step * rl.group_size, gradient_accumulation_steps=1,
        shuffle_dataset=False, max_completion_length=rl.max_new_tokens, temperature=spec.distill.temperature,
        top_p=rl.top_p, top_k=0, beta=spec.distill.beta, learning_rate=training.learning_rate,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=training.weight_decay, max_grad_norm=1.0,
        disable_dropout=True, use_vllm=False, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)
    clock = StepClock()
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=cfg, processing_class=tok,
                                  train_dataset=Dataset.from_list(prompts), callbacks=[clock.callback(TrainerCallback)])
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log dict to stdout
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {"wall": time.perf_counter() - start, "train": sum(clock.seconds), "steps": len(clock.seconds),
            "loss": logs[-1]["loss"],
            "details": details([e["loss"] for e in logs], clock.seconds,
                               [e["completions/mean_length"] for e in logs])}


def details(losses: list[float], seconds: list[float], lengths: list[float]) -> dict:
    """Per-run figures beside the report's means: the divergence and completion length of every step, the step
    times, and the mean step time of steps 2..N (step 1 carries warm-up)."""
    return {"loss_per_step": [round(x, 4) for x in losses], "step_seconds": [round(x, 3) for x in seconds],
            "seconds_per_step_2_to_n": tail_mean(seconds),
            "completion_tokens_per_step": [round(x, 1) for x in lengths]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="odd rounds run TRL first, even ours first")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of TRL's process and of each of our actors (see grpo_vs_trl.py)")
    args = parser.parse_args()
    import tiny
    from posttrain.jobs import models

    work = Path(tempfile.mkdtemp(prefix="bench-distill-on-policy-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
    teacher = str(sharp_teacher(work / "teacher"))
    vocab = len(models.load_tokenizer(teacher))
    data = str(tiny.write_jsonl(work / "train.jsonl", tiny.arith_records(256)))
    doc = job_doc(teacher, data, args=args, vocab=vocab)
    texts = first_pass_prompts(doc, work)

    report = alternating_rounds(
        lambda out: run_trl(doc, work, out, texts, args.threads), lambda out: run_ours(doc, work, out),
        args.rounds, work=work,
        model="tiny-llama teacher (4 layers, hidden 128, head x12), student keepLayers every 2, full fine-tuning",
        trl="trl.DistillationTrainer (always on-policy, n=1 per prompt, each prompt group-size times)",
        loss=f"generalized JSD beta 0.5, temperature {args.temperature} (ours: topK = vocabulary, {vocab})",
        seconds_per_step="ours: the loop's time_step (Ray start-up outside); TRL: optimizer step begin to end",
        settings={"steps": args.steps, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                  "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "learning_rate": args.lr,
                  "threads": args.threads, "rollout_engine": "transformers"},
        steps=args.steps)
    for i, r in enumerate(report["rounds"]):
        print(f"round {i + 1} ({r['first']} first): s/step posttrain {r['seconds_per_step']['posttrain']:.3f}, "
              f"trl {r['seconds_per_step']['trl']:.3f}, ratio {r['ratio_posttrain_over_trl']:.2f}; wall "
              f"posttrain {r['wall_seconds']['posttrain']:.1f} s, trl {r['wall_seconds']['trl']:.1f} s",
              file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
