"""Operator under a burst: N PostTrainingJobs created at once against the API emulator, ours beside a floor.

Two operators, one after the other, each against a fresh emulator with the same N jobs:

* ours: `posttrain-operator run` (the real CLI) as its own process, so its peak RSS is its own;
* the floor: a bare kopf operator (`floor_operator.py`, `kopf run`) that creates one RayJob per job,
  the same RayJob ours would create, owned by the job, through the same `kubernetes` client.

Each prints: create -> RayJob latency p50/p99 (from the job's create call returning to the
RayJob's commit in the emulator), jobs that reached a RayJob per second (from the first create to
the last RayJob), handler passes (ours: `posttrain_operator_reconcile_total`; the floor: its handler
calls) and passes per second, peak RSS (VmHWM) and the load average; then the ratios ours / floor.
`--rounds R` alternates the two R times (floor first) and reports each round and the medians.

    nice -n 19 .venv/bin/python benchmarks/operator_load.py --jobs 1000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))  # the API emulator
JOB_LABEL = "posttrain.dev/job"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(i: int) -> dict:
    return {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainingJob",
        "metadata": {"name": f"load-{i:05d}", "namespace": "default"},
        "spec": {"algorithm": "sft", "model": {"source": "pvc://models/m"}, "adapter": {"type": "lora"},
                 "data": {"train": [{"source": "pvc://data/t.jsonl"}]}, "training": {"maxSteps": 10},
                 "output": {"uri": f"pvc://out/load-{i:05d}"}},
    }


def rayjob_template() -> dict:
    """The RayJob our operator creates for `job(0)` (the floor creates the same, renamed and re-owned)."""
    from posttrain.api.load import parse_job
    from posttrain.operator import builders

    parsed = parse_job(job(0), require_available=False)
    return builders.build_rayjob(parsed, run=0, owner_uid="0", settings=builders.BuildSettings(
        image="ghcr.io/posttrain/runtime:0.1.0"))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def reconcile_total(text: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(r'^posttrain_operator_reconcile_total\{[^}]*\} (\S+)$', text, re.M))


def watch_rayjob_commits(k8s: Any) -> tuple[dict[str, float], list[float]]:
    """Job name -> time its first RayJob was committed, and the time of the newest commit of anything,
    both stamped on the emulator's loop as the change happens (no polling: a benchmark that lists
    every RayJob four times a second takes emulator time from the operator it measures)."""
    seen: dict[str, float] = {}
    last = [time.perf_counter()]
    store = k8s.emulator.store
    commit = store._commit

    def stamped(kind: Any, event: str, obj: Any, old: Any = None) -> None:
        commit(kind, event, obj, old)
        now = time.perf_counter()
        last[0] = now
        if event == "ADDED" and kind.plural == "rayjobs":
            seen.setdefault((obj["metadata"].get("labels") or {}).get(JOB_LABEL, ""), now)

    store._commit = stamped
    return seen, last


def run_side(side: str, *, jobs: int, timeout: float, template: Path, tmp: Path,
             py_spy: str | None = None) -> dict[str, Any]:
    import kubeemu_server
    import opcluster

    # The emulator's own request log makes each request cost O(log size) (kmock's matching);
    # keep it tiny so the figures measure the operator, not the emulator.
    kubeemu_server.Emulator.request_log_limit = 4
    load_before = os.getloadavg()
    with opcluster.cluster() as k8s:
        for claim in ("models", "data", "out"):
            opcluster.claim(k8s, claim)
        port = free_port()
        count_file = tmp / f"{side}-count"
        env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig_path), "POSTTRAIN_LOG_LEVEL": "warning",
               "FLOOR_TEMPLATE": str(template), "FLOOR_COUNT": str(count_file)}
        if side == "ours":
            argv = [sys.executable, "-m", "posttrain.operator", "run", "--metrics-port", str(port),
                    "--progress-interval", "30"]
        else:
            argv = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "--quiet",
                    str(REPO / "benchmarks" / "floor_operator.py")]
        if py_spy:  # py-spy's collapsed stacks of the operator; RSS is then py-spy's own, ignore it
            argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--rate", "50", "--format", "raw",
                    "-o", f"{py_spy}.{side}", "--", *argv]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        errors: list[str] = []
        threading.Thread(target=lambda: errors.extend(proc.stderr or ()), daemon=True).start()
        try:
            deadline = time.time() + 60
            while not _watching(k8s) or (side == "ours" and not _ready(port)):
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"{side} operator did not start: {''.join(errors)[-2000:]}")
                time.sleep(0.2)
            rss_idle = peak_rss_mib(proc.pid)
            seen, last_commit = watch_rayjob_commits(k8s)
            created: dict[str, float] = {}

            def create(i: int) -> None:
                body = job(i)
                k8s.create(body)
                created[body["metadata"]["name"]] = time.perf_counter()

            before = reconcile_total(scrape(port)) if side == "ours" else 0.0
            start = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, range(jobs)))
            create_seconds = time.perf_counter() - start
            while len(seen) < jobs and time.perf_counter() - start < timeout and proc.poll() is None:
                time.sleep(0.1)
            all_seen = max(seen.values(), default=start) - start
            # Passes go on after the RayJob (status writes, the RayJob's own events): wait until the
            # emulator has had no change for 2 s, then count them all.
            while time.perf_counter() - last_commit[0] < 2 and time.perf_counter() - start < timeout:
                time.sleep(0.2)
            settled = last_commit[0] - start
            rss_peak = peak_rss_mib(proc.pid)
            if side == "ours":
                passes = reconcile_total(scrape(port)) - before
        finally:
            if py_spy:
                proc.send_signal(signal.SIGINT)  # py-spy writes its profile and stops the operator
                time.sleep(5)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if side == "floor":
            passes = float(count_file.read_text()) if count_file.exists() else float("nan")
    latencies = sorted(seen[n] - created[n] for n in seen if n in created)
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "side": side,
        "jobs": jobs,
        "reached_rayjob": len(seen),
        "create_seconds": round(create_seconds, 2),
        "all_rayjobs_after_seconds": round(all_seen, 2),
        "settled_after_seconds": round(settled, 2),
        "create_to_rayjob_seconds": {"p50": round(q[49], 3), "p99": round(q[98], 3), "max": round(latencies[-1], 3)},
        "jobs_to_rayjob_per_second": round(len(seen) / all_seen, 1) if all_seen else None,
        "passes": int(passes),
        "passes_per_second": round(passes / settled, 1) if settled else None,
        "peak_rss_mib": round(rss_peak, 1),
        "rss_before_jobs_mib": round(rss_idle, 1),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "stderr_tail": "".join(errors)[-600:],
    }


def _watching(k8s: Any) -> bool:
    return any(e["verb"] == "watch" and e["resource"] == "posttrainingjobs" for e in k8s.audit)


def _ready(port: int) -> bool:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200
    except OSError:
        return False


def ratios(ours: dict[str, Any], floor: dict[str, Any]) -> dict[str, float | None]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    return {
        "p50": ratio(ours["create_to_rayjob_seconds"]["p50"], floor["create_to_rayjob_seconds"]["p50"]),
        "p99": ratio(ours["create_to_rayjob_seconds"]["p99"], floor["create_to_rayjob_seconds"]["p99"]),
        "jobs_to_rayjob_per_second": ratio(ours["jobs_to_rayjob_per_second"], floor["jobs_to_rayjob_per_second"]),
        "peak_rss": ratio(ours["peak_rss_mib"], floor["peak_rss_mib"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--only", choices=("ours", "floor"), help="run one side only (profiling)")
    parser.add_argument("--py-spy", metavar="PREFIX", help="run each operator under py-spy; stacks in PREFIX.<side>")
    args = parser.parse_args()
    import kubeemu

    kubeemu.default_kinds()  # parse the CRDs once, here: on a loaded machine that alone can outlast a cluster's start timeout
    rounds = []
    with tempfile.TemporaryDirectory(prefix="operator-load-") as tmp_dir:
        tmp = Path(tmp_dir)
        template = tmp / "rayjob.json"
        template.write_text(json.dumps(rayjob_template()))
        for r in range(args.rounds):
            sides = [args.only] if args.only else ["floor", "ours"]
            result = {s: run_side(s, jobs=args.jobs, timeout=args.timeout, template=template, tmp=tmp,
                                 py_spy=args.py_spy) for s in sides}
            if not args.only:
                result["ours/floor"] = ratios(result["ours"], result["floor"])
            rounds.append(result)
            print(json.dumps({"round": r + 1, **result}, indent=2), flush=True)
    if len(rounds) > 1 and not args.only:
        keys = rounds[0]["ours/floor"].keys()
        print(json.dumps({"median ours/floor": {k: statistics.median(x["ours/floor"][k] for x in rounds) for k in keys}}))
    ok = all(side["reached_rayjob"] == args.jobs for r in rounds for k, side in r.items() if k in ("ours", "floor"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
