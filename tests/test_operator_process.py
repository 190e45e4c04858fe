"""`posttrain-operator run` as a process, as the Helm chart runs it: login, probes, metrics, and
leader election with two replicas against the API emulator (through a kubeconfig)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import kubeemu
import opcluster
from posttrain.operator import vocab


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class Replica:
    def __init__(self, k8s: kubeemu.Cluster, name: str) -> None:
        self.port = free_port()
        env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig_path), "POSTTRAIN_POD_NAME": name,
               "POSTTRAIN_LEADER_ELECTION": "true", "POSTTRAIN_LEADER_ELECTION_NAMESPACE": "default",
               "POSTTRAIN_LEASE_SECONDS": "3", "POSTTRAIN_WATCH_NAMESPACES": "default",
               "POSTTRAIN_LOG_LEVEL": "warning"}
        self.proc = subprocess.Popen([sys.executable, "-m", "posttrain.operator", "run", "--metrics-port",
                                      str(self.port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def leading(self) -> bool:
        code, text = get(self.port, "/metrics")
        return code == 200 and "posttrain_operator_leader 1.0" in text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def job(name: str) -> dict:
    return {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"algorithm": "sft", "model": {"source": "pvc://m/x"}, "data": {"train": [{"source": "pvc://d/t"}]},
                     "training": {"maxSteps": 3}, "output": {"uri": f"pvc://out/{name}"}}}


@pytest.mark.timeout(120)
def test_two_replicas_one_leader_probes_and_failover():
    with opcluster.cluster() as k8s:
        for claim in ("m", "d", "out"):
            opcluster.claim(k8s, claim)
        a, b = Replica(k8s, "replica-a"), Replica(k8s, "replica-b")
        try:
            k8s.wait_for(lambda: get(a.port, "/healthz")[0] == 200 and get(b.port, "/healthz")[0] == 200,
                         timeout=40, what="both replicas up")
            leader = k8s.wait_for(lambda: [r for r in (a, b) if r.leading()], timeout=30, what="a leader")
            assert len(leader) == 1, "exactly one replica leads"
            (first,) = leader
            standby = b if first is a else a
            assert get(standby.port, "/readyz")[0] == 200, "a healthy standby is ready (rollouts, PDBs)"
            lease = k8s.get("coordination.k8s.io/v1", "leases", "default", "posttrain-operator-leader")
            assert lease["spec"]["holderIdentity"] == ("replica-a" if first is a else "replica-b")

            k8s.create(job("one"))
            k8s.wait_for(lambda: k8s.list(*kubeemu.RAYJOB, "default"), timeout=30, what="RayJob of job one")
            time.sleep(1.0)
            assert [r["metadata"]["name"] for r in k8s.list(*kubeemu.RAYJOB, "default")] == ["one-r0"]
            _, text = get(first.port, "/metrics")
            assert 'posttrain_operator_reconcile_total{result="success"}' in text

            first.stop()  # a clean stop releases the Lease
            k8s.wait_for(standby.leading, timeout=20, what="the standby takes over")
            k8s.create(job("two"))
            k8s.wait_for(lambda: k8s.find(*kubeemu.RAYJOB, "default", "two-r0"), timeout=30, what="RayJob of two")
            status = k8s.wait_for(lambda: (k8s.get(*kubeemu.PTJ, "default", "two").get("status") or {}).get("phase"),
                                  timeout=30)
            assert status == "Provisioning"
            assert k8s.get(*kubeemu.RAYJOB, "default", "two-r0")["metadata"]["labels"][vocab.LABEL_JOB] == "two"
        finally:
            a.stop()
            b.stop()
