"""Operator load: N PostTrainingJobs created at once against the API emulator.

The operator runs as its own process (`posttrain-operator run`, the real CLI)
pointed at the emulator through a kubeconfig, so its peak RSS is its own.
Reports: how many jobs reached a RayJob, create -> RayJob latency p50/p99,
reconciles per second (from the operator's own /metrics), and peak RSS.

    .venv/bin/python benchmarks/operator_load.py --jobs 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))  # the API emulator


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


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def reconcile_total(text: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(r'^posttrain_operator_reconcile_total\{[^}]*\} (\S+)$', text, re.M))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args()
    import kubeemu
    import kubeemu_server
    import opcluster

    # The emulator's own request log makes each request cost O(log size) (kmock's matching);
    # keep it tiny so the figures measure the operator, not the emulator.
    kubeemu_server.Emulator.request_log_limit = 4
    # With the pods, claims and NetworkPolicies the operator reads and creates; the claims the jobs name.
    with opcluster.cluster() as k8s:
        for claim in ("models", "data", "out"):
            opcluster.claim(k8s, claim)
        port = free_port()
        env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig_path), "POSTTRAIN_LOG_LEVEL": "warning"}
        proc = subprocess.Popen([sys.executable, "-m", "posttrain.operator", "run", "--metrics-port", str(port),
                                 "--progress-interval", "30"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 60
            while True:
                try:
                    if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                        break
                except OSError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"operator did not start: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
                time.sleep(0.2)
            rss_idle = peak_rss_mib(proc.pid)

            created: dict[str, float] = {}

            def create(i: int) -> None:
                body = job(i)
                k8s.create(body)
                created[body["metadata"]["name"]] = time.perf_counter()

            start = time.perf_counter()
            before = reconcile_total(scrape(port))
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, range(args.jobs)))
            create_seconds = time.perf_counter() - start
            seen: dict[str, float] = {}
            while len(seen) < args.jobs and time.perf_counter() - start < args.timeout:
                now = time.perf_counter()
                for rj in k8s.list(*kubeemu.RAYJOB, "default"):
                    owner = rj["metadata"]["labels"]["posttrain.dev/job"]
                    seen.setdefault(owner, now)
                time.sleep(0.25)
            all_seen = time.perf_counter() - start
            # Let the status writes that follow the creations settle before counting reconciles.
            time.sleep(3)
            text = scrape(port)
            reconciles = reconcile_total(text) - before
            window = time.perf_counter() - start
            latencies = sorted(seen[n] - created[n] for n in seen)
            q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
            phases = {m.group(1): float(m.group(2)) for m in
                      re.finditer(r'^posttrain_operator_jobs\{phase="(\w+)"\} (\S+)$', text, re.M)}
            report = {
                "jobs": args.jobs,
                "reached_rayjob": len(seen),
                "create_seconds": round(create_seconds, 2),
                "all_rayjobs_after_seconds": round(all_seen, 2),
                "create_to_rayjob_seconds": {"p50": round(q[49], 3), "p99": round(q[98], 3),
                                             "max": round(latencies[-1], 3)},
                "reconciles": int(reconciles),
                "reconciles_per_second": round(reconciles / window, 1),
                "jobs_by_phase": phases,
                "operator_peak_rss_mib": round(peak_rss_mib(proc.pid), 1),
                "operator_rss_before_jobs_mib": round(rss_idle, 1),
            }
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(report, indent=2))
    return 0 if report["reached_rayjob"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
