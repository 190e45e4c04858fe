"""The real kopf operator against the in-process API emulator: a job's whole life.

KubeRay is played by the tests (they move RayJob statuses); the driver's
/progress endpoint is a small HTTP server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
import pytest

import kubeemu
import opcluster
from posttrain.operator import builders, handlers, kube, metrics, vocab

NS = "default"


class FakeDriver:
    """Serves GET /progress like a job's driver, with a body the test controls (`raw` wins over `body`)."""

    def __init__(self) -> None:
        self.body = {"step": 0, "totalSteps": 100, "loss": None, "phase": "initializing"}
        self.raw: bytes | None = None
        self.hits = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits += 1
                data = outer.raw if outer.raw is not None else json.dumps(outer.body).encode()
                self.send_response(200 if self.path == "/progress" else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def driver():
    fake = FakeDriver()
    yield fake
    fake.close()


@pytest.fixture
def k8s():
    with opcluster.cluster() as cluster:
        # CI's 2 cores may be busy with other tests' Ray workers: be patient, assertions stay exact.
        cluster.wait_for = functools.partial(cluster.wait_for, timeout=45)
        for name in CLAIMS:  # the claims job() names, shared by every pod (ReadWriteMany)
            opcluster.claim(cluster, name)
        yield cluster


CLAIMS = ("models", "data", "ckpt")


def make_registry(k8s, driver_port: int, **config):
    registry = kopf.OperatorRegistry()
    settings = {"build": builders.BuildSettings(image="ghcr.io/posttrain/runtime:test"), "progress_interval": 0.3,
                "progress_timeout": 1.0, "retry_base": 0.2, "retry_max": 1.0, **config}
    config = handlers.OperatorConfig(driver_port=driver_port, **settings)
    controller = handlers.Controller(config, kube_api=kube.Kube(k8s.api_client()), metrics=metrics.OperatorMetrics())
    handlers.register(registry, controller)
    return registry, controller


@contextlib.contextmanager
def operator(k8s, driver_port: int = 1, **config):
    registry, controller = make_registry(k8s, driver_port, **config)
    with kubeemu.Operator(k8s, registry):
        yield controller


def job(name="tune", **spec):
    doc = {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainingJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "algorithm": "sft",
            "model": {"source": "pvc://models/smol"},
            "adapter": {"type": "lora"},
            "data": {"train": [{"source": "pvc://data/train.jsonl"}]},
            "training": {"maxSteps": 100},
            "checkpoint": {"uri": "pvc://ckpt/tune", "everySteps": 10},
            "output": {"uri": "pvc://models/out/tune"},
            "maxRestarts": 1,
        },
    }
    doc["spec"].update(copy.deepcopy(spec))
    return doc


def ptj(k8s, name="tune"):
    return k8s.get(*kubeemu.PTJ, NS, name)


def phase_is(k8s, phase, name="tune"):
    return lambda: (ptj(k8s, name).get("status") or {}).get("phase") == phase


def rayjobs(k8s, name="tune"):
    return sorted(k8s.list(*kubeemu.RAYJOB, NS, label_selector=f"{vocab.LABEL_JOB}={name}"),
                  key=lambda r: r["metadata"]["name"])


def test_whole_life_create_run_progress_fail_restart_succeed_delete(k8s, driver):
    with operator(k8s, driver.port) as controller:
        created = k8s.create(job())
        rj = k8s.wait_for(lambda: rayjobs(k8s), what="RayJob r0")[0]
        assert rj["metadata"]["name"] == "tune-r0"
        assert rj["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        cm = k8s.get(*kubeemu.CONFIGMAP, NS, "tune-spec")
        assert json.loads(cm["data"]["job.json"])["spec"]["training"]["maxSteps"] == 100
        k8s.wait_for(phase_is(k8s, "Provisioning"))

        # KubeRay brings the cluster up; the driver reports progress; our status follows.
        driver.body = {"step": 42, "totalSteps": 100, "loss": 1.25, "tokensPerSecond": 512.0, "phase": "training",
                       "lastCheckpoint": "/mnt/pvc/ckpt/tune/checkpoint-40"}
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING",
                              dashboardURL="127.0.0.1:8265")
        k8s.wait_for(phase_is(k8s, "Running"))
        status = k8s.wait_for(lambda: (s := ptj(k8s)["status"]).get("progress", {}).get("step") == 42 and s)
        assert status["progress"] == {"step": 42, "totalSteps": 100, "loss": 1.25, "tokensPerSecond": 512.0}
        assert status["lastCheckpoint"].endswith("checkpoint-40") and status["startTime"]
        assert status["observedGeneration"] == ptj(k8s)["metadata"]["generation"]

        # The run fails: the next RayJob resumes from the last checkpoint (same spec, same checkpoint URI).
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed", job="FAILED", reason="AppFailed",
                              message="worker OOMKilled")
        r1 = k8s.wait_for(lambda: [r for r in rayjobs(k8s) if r["metadata"]["name"] == "tune-r1"], what="r1")[0]
        assert r1["spec"]["entrypoint"] == rj["spec"]["entrypoint"]
        assert r1["metadata"]["labels"][vocab.LABEL_RUN] == "1"
        status = k8s.wait_for(lambda: (s := ptj(k8s)["status"]).get("restarts") == 1 and s)
        assert status["rayJob"] == "tune-r1" and status["phase"] == "Provisioning"
        # kopf posts Events in the background: wait for it rather than race it.
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="Restarting")), "a restart emits an Event"

        k8s.set_rayjob_status(NS, "tune-r1", deployment="Running", job="RUNNING", dashboardURL="127.0.0.1:8265")
        k8s.wait_for(phase_is(k8s, "Running"))
        k8s.set_rayjob_status(NS, "tune-r1", deployment="Complete", job="SUCCEEDED")
        k8s.wait_for(phase_is(k8s, "Succeeded"))
        final = ptj(k8s)["status"]
        ready = next(c for c in final["conditions"] if c["type"] == "Ready")
        assert ready["status"] == "True" and final["completionTime"]
        expected = {"Provisioning", "Running", "Restarting", "Succeeded"}
        k8s.wait_for(lambda: expected <= {e["reason"] for e in k8s.events(NS, involved=created)},
                     what=f"Events {sorted(expected)}")
        assert len(rayjobs(k8s)) == 2

        exposition = controller.metrics.exposition().decode()
        assert 'posttrain_operator_jobs{phase="Succeeded"} 1.0' in exposition
        assert "posttrain_operator_restarts_total 1.0" in exposition
        assert 'posttrain_operator_reconcile_total{result="success"}' in exposition

        # Deleting the job deletes its children through ownerReferences.
        k8s.delete(*kubeemu.PTJ, NS, "tune")
        k8s.wait_for(lambda: k8s.find(*kubeemu.PTJ, NS, "tune") is None, what="job gone")
        k8s.wait_for(lambda: not rayjobs(k8s) and k8s.find(*kubeemu.CONFIGMAP, NS, "tune-spec") is None,
                     what="children collected")


def test_restarts_exhausted(k8s):
    with operator(k8s):
        k8s.create(job(maxRestarts=1))
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed", reason="DeadlineExceeded")
        k8s.wait_for(lambda: len(rayjobs(k8s)) == 2)
        k8s.set_rayjob_status(NS, "tune-r1", deployment="Failed", reason="DeadlineExceeded")
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = next(c for c in ptj(k8s)["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "RestartsExhausted" and "tune-r1 failed (DeadlineExceeded)" in failed["message"]
        assert len(rayjobs(k8s)) == 2, "no third run"


def test_invalid_spec_fails_and_creates_nothing(k8s):
    with operator(k8s):
        bad = job(adapter={"type": "prefix", "targetModules": ["q_proj"]})  # the CRD admits it; the API model does not
        created = k8s.create(bad)
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = next(c for c in ptj(k8s)["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec" and "spec.adapter.targetModules" in failed["message"]
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="InvalidSpec"))
        assert rayjobs(k8s) == [] and k8s.find(*kubeemu.CONFIGMAP, NS, "tune-spec") is None


def test_an_algorithm_this_version_cannot_run_is_an_invalid_spec(k8s, unshipped):
    with operator(k8s):
        k8s.create(job(algorithm="distill", teacher={"source": "pvc://models/smol"}))
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = next(c for c in ptj(k8s)["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "InvalidSpec" and "not available in this version" in failed["message"]
        assert rayjobs(k8s) == []


def test_schema_violations_are_rejected_by_the_api_server(k8s):
    with pytest.raises(kubeemu.ApiError) as info:
        k8s.create(job(adapter={"type": "lora", "r": 0}))
    assert info.value.status == 422 and "spec.adapter.r" in str(info.value)


def test_suspend_and_resume(k8s):
    with operator(k8s):
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING")
        k8s.wait_for(phase_is(k8s, "Running"))
        k8s.patch(*kubeemu.PTJ, NS, "tune", {"spec": {"suspend": True}})
        k8s.wait_for(lambda: rayjobs(k8s)[0]["spec"]["suspend"] is True, what="RayJob suspended")
        k8s.wait_for(phase_is(k8s, "Suspended"))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Suspended")
        k8s.patch(*kubeemu.PTJ, NS, "tune", {"spec": {"suspend": False}})
        k8s.wait_for(lambda: rayjobs(k8s)[0]["spec"]["suspend"] is False, what="RayJob resumed")
        k8s.wait_for(phase_is(k8s, "Provisioning"))
        assert len(rayjobs(k8s)) == 1, "suspending is not a failure: no new run"


def without_cel_rules(value):
    """A copy of a CRD (part) without its `x-kubernetes-validations`, as a CRD older than those rules."""
    if isinstance(value, dict):
        return {k: without_cel_rules(v) for k, v in value.items() if k != "x-kubernetes-validations"}
    return [without_cel_rules(v) for v in value] if isinstance(value, list) else value


def test_an_immutable_change_is_refused_and_the_job_keeps_its_spec(k8s):
    with operator(k8s):
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        with pytest.raises(kubeemu.ApiError) as refused:  # the CRD's CEL rule, as the API server applies it
            k8s.patch(*kubeemu.PTJ, NS, "tune", {"spec": {"training": {"maxSteps": 5}}})
        assert refused.value.status == 422 and "spec.training cannot change after creation" in str(refused.value)
        # A cluster whose CRD predates the rules takes the change: the operator keeps the started spec.
        k8s.apply(without_cel_rules(kubeemu.load_crd(kubeemu.PTJ_CRD)))
        k8s.patch(*kubeemu.PTJ, NS, "tune", {"spec": {"training": {"maxSteps": 5}}})
        cond = k8s.wait_for(lambda: next((c for c in ptj(k8s)["status"]["conditions"]
                                          if c["type"] == "SpecAccepted"), None))
        assert cond["status"] == "False" and "training" in cond["message"]
        cm = k8s.get(*kubeemu.CONFIGMAP, NS, "tune-spec")
        assert json.loads(cm["data"]["job.json"])["spec"]["training"]["maxSteps"] == 100


def test_operator_restarted_midway_makes_no_duplicates(k8s):
    with operator(k8s):
        k8s.create(job(maxRestarts=3))
        k8s.wait_for(lambda: rayjobs(k8s))
    # While no operator runs, the run fails, and (as if a crashed operator got that far) r1 already exists.
    k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed")
    owner = ptj(k8s)
    from posttrain.api.load import parse_job

    parsed = parse_job({k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    k8s.create(builders.build_rayjob(parsed, run=1, owner_uid=owner["metadata"]["uid"],
                                     settings=builders.BuildSettings(image="ghcr.io/posttrain/runtime:test")))
    assert (ptj(k8s).get("status") or {}).get("restarts", 0) == 0
    with operator(k8s):
        status = k8s.wait_for(lambda: (s := ptj(k8s).get("status") or {}).get("restarts") == 1 and s)
        assert status["rayJob"] == "tune-r1"
    with operator(k8s):  # and once more: a fresh operator changes nothing
        k8s.wait_for(lambda: ptj(k8s)["status"]["restarts"] == 1)
    assert [r["metadata"]["name"] for r in rayjobs(k8s)] == ["tune-r0", "tune-r1"]
    assert len(k8s.list(*kubeemu.CONFIGMAP, NS, label_selector=f"{vocab.LABEL_JOB}=tune")) == 1


def test_a_namesake_rayjob_not_owned_by_the_job_is_ignored(k8s):
    stranger = {"apiVersion": "ray.io/v1", "kind": "RayJob",
                "metadata": {"name": "other", "namespace": NS, "labels": {vocab.LABEL_JOB: "tune"}},
                "spec": {"entrypoint": "echo hi"}}
    k8s.create(stranger)
    with operator(k8s):
        k8s.create(job())
        k8s.wait_for(lambda: any(r["metadata"]["name"] == "tune-r0" for r in rayjobs(k8s)))
        k8s.wait_for(phase_is(k8s, "Provisioning"))
        assert ptj(k8s)["status"]["rayJob"] == "tune-r0"


def test_the_watch_events_of_its_own_writes_need_no_pass(k8s):
    """A pass's status write and RayJob creation come back as watch events showing what it already acted on:
    `own_change` tells the handlers to skip those (two of every three passes under a burst), and nothing else."""
    _, controller = make_registry(k8s, 1)
    k8s.create(job())
    asyncio.run(controller.reconcile(NS, "tune"))
    written, (made,) = ptj(k8s), rayjobs(k8s)
    assert written["status"]["rayJob"] == "tune-r0"
    rv = written["metadata"]["resourceVersion"]
    assert not controller.own_change("job", NS, "tune", "tune", str(int(rv) - 1)), "an older version is news"
    assert controller.own_change("job", NS, "tune", "tune", rv)
    assert controller.own_change("rayjob", NS, "tune", "tune-r0", made["metadata"]["resourceVersion"])
    assert not controller.own_change("job", NS, "tune", "tune", rv), "each write is skipped once"

    # Someone changes the job between the pass's read and its status write: the write's event is news.
    k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING")
    patch_status = controller.kube.patch_status

    async def relabel_first(namespace, name, status):
        k8s.patch(*kubeemu.PTJ, NS, "tune", {"metadata": {"labels": {"team": "b"}}})
        return await patch_status(namespace, name, status)

    controller.kube.patch_status = relabel_first
    asyncio.run(controller.reconcile(NS, "tune"))
    after = ptj(k8s)
    assert after["status"]["phase"] == "Running" and after["metadata"]["labels"]["team"] == "b"
    assert not controller.own_change("job", NS, "tune", "tune", after["metadata"]["resourceVersion"])
