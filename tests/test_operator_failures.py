"""The real kopf operator against the API emulator: every way a job can go wrong reaches its status.

API errors injected with kmock reactions (a missing RayJob CRD, KubeRay's schema refusing the
RayJob, RBAC), KubeRay's ValidationFailed, the driver's exit codes in Ray's own wording, pods that
can never start, a stuck run (spec.progressDeadlineSeconds), and an untrusted /progress answer.

    .venv/bin/python -m pytest tests/test_operator_failures.py -q
"""

from __future__ import annotations

import json
import time

import pytest

import kubeemu
import opcluster
from posttrain.operator import vocab
from test_operator import NS, driver, job, k8s, operator, phase_is, ptj, rayjobs  # noqa: F401 - fixtures

# Ray 2.60 dashboard/modules/job/job_supervisor.py, as KubeRay copies it into RayJob status.message.
RAY_FAILED = ("Job entrypoint command failed with exit code {code}, last available logs (truncated to 20,000 "
              "chars):\nTraceback (most recent call last):\n  File \"train.py\"\nValueError: bad row\n"
              "env dump: HF_TOKEN=hf_SECRETSECRET\n")


def condition(k8s, ctype, name="tune"):
    return next((c for c in (ptj(k8s, name).get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def all_text(k8s, created) -> str:
    """Everything a `view` user can read about the job: its status and its Events."""
    return json.dumps(ptj(k8s)["status"]) + json.dumps([e.get("message") for e in k8s.events(NS, involved=created)])


# --- API errors before any status is written ----------------------------------------------------

def test_a_missing_rayjob_crd_is_a_blocked_condition_with_backoff_then_recovers(k8s):
    switch = opcluster.fault(k8s, "post", "ray.io/v1", "rayjobs", status=404,
                             message="the server could not find the requested resource")
    with operator(k8s):
        created = k8s.create(job())
        blocked = k8s.wait_for(lambda: condition(k8s, "Blocked"), what="Blocked condition")
        assert blocked["reason"] == "KubeRayMissing" and blocked["status"] == "True"
        assert "could not find the requested resource" in blocked["message"] and "KubeRay" in blocked["message"]
        assert ptj(k8s)["status"]["phase"] == "Pending"
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="KubeRayMissing"))
        switch["on"] = False  # KubeRay gets installed: the backoff retry goes through
        k8s.wait_for(lambda: rayjobs(k8s), what="RayJob after recovery")
        k8s.wait_for(phase_is(k8s, "Provisioning"))
        assert condition(k8s, "Blocked") is None


def test_kuberays_schema_refusing_the_rayjob_is_a_permanent_failure(k8s):
    opcluster.fault(k8s, "post", "ray.io/v1", "rayjobs", status=422,
                    message='RayJob.ray.io "tune-r0" is invalid: spec.rayClusterSpec.authOptions: field not declared')
    with operator(k8s):
        created = k8s.create(job())
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "RayJobRejected" and "authOptions: field not declared" in failed["message"]
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="RayJobRejected"))


def test_a_forbidden_call_is_a_blocked_condition_naming_rbac(k8s):
    switch = opcluster.fault(k8s, "post", "v1", "configmaps", status=403,
                             message='configmaps is forbidden: User "system:serviceaccount:p:posttrain" cannot create')
    with operator(k8s):
        k8s.create(job())
        blocked = k8s.wait_for(lambda: condition(k8s, "Blocked"))
        assert blocked["reason"] == "Forbidden" and "cannot create" in blocked["message"] and "RBAC" in blocked["message"]
        assert rayjobs(k8s) == []
        switch["on"] = False
        k8s.wait_for(lambda: rayjobs(k8s), what="RayJob once RBAC allows it")


def test_a_spec_over_the_configmap_limit_fails_before_creating_anything(k8s):
    big = job(algorithm="grpo", rewards=[{"function": "m:f", "kwargs": {"table": "x" * (1024 * 1024 + 10)}}])
    with operator(k8s):
        k8s.create(big)
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "SpecTooLarge" and "at most 1048576" in failed["message"]
        assert rayjobs(k8s) == [] and k8s.find(*kubeemu.CONFIGMAP, NS, "tune-spec") is None
        assert k8s.find(*opcluster.NETPOL, NS, "tune-ray") is None


# --- KubeRay and the driver say a run failed ----------------------------------------------------

def test_kuberay_validation_failed_is_a_failure_with_kuberays_message(k8s):
    with operator(k8s):
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="ValidationFailed", reason="ValidationFailed",
                              message="The RayJob spec is invalid: authOptions.mode is 'token' but minimum Ray "
                                      "version is 2.52.0, got 2.9.0")
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "RayJobValidationFailed" and "minimum Ray version is 2.52.0" in failed["message"]
        assert len(rayjobs(k8s)) == 1, "a restart would be refused the same way"


def test_exit_code_2_is_invalid_input_with_no_restart_and_no_log_tail(k8s):
    with operator(k8s):
        created = k8s.create(job(maxRestarts=3))
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed", job="FAILED", reason="AppFailed",
                              message=RAY_FAILED.format(code=2))
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "InvalidInput" and "exit code 2" in failed["message"]
        k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="InvalidInput"))
        assert len(rayjobs(k8s)) == 1 and ptj(k8s)["status"]["restarts"] == 0
        text = all_text(k8s, created)
        assert "HF_TOKEN" not in text and "Traceback" not in text and "last available logs" not in text


def test_exit_code_1_restarts_and_keeps_the_log_tail_out_of_status_and_events(k8s):
    with operator(k8s):
        created = k8s.create(job(maxRestarts=3))
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed", job="FAILED", reason="AppFailed",
                              message=RAY_FAILED.format(code=1))
        k8s.wait_for(lambda: len(rayjobs(k8s)) == 2, what="r1")
        restart = k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="Restarting"))[0]
        assert "exit code 1" in restart["message"]
        text = all_text(k8s, created)
        assert "HF_TOKEN" not in text and "Traceback" not in text


POD_LABELS = {vocab.LABEL_JOB: "tune", vocab.LABEL_RUN: "0", vocab.LABEL_COMPONENT: "worker"}
CAUSES = {
    "missing-claim": ("pod", {"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": '0/3 nodes are available: persistentvolumeclaim "scratch" not found. preemption: 0/3 nodes'}]},
        'persistentvolumeclaim "scratch" not found'),
    "missing-secret": ("pod", {"phase": "Pending", "containerStatuses": [{
        "name": "ray-worker", "ready": False, "restartCount": 0, "image": "rt", "imageID": "",
        "state": {"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}}}]},
        'secret "hf-token" not found'),
    "pod-security": ("event", "Failed to create worker Pod for the cluster default/tune-r0-raycluster, pods "
                              '"tune-r0-worker-x" is forbidden: violates PodSecurity "restricted:latest": '
                              "allowPrivilegeEscalation != false", "violates PodSecurity"),
    "priority-class": ("event", "Failed to create head Pod default/tune-r0-head, pods \"tune-r0-head\" is forbidden: "
                                "no PriorityClass with name training-high was found", "no PriorityClass"),
}


@pytest.mark.parametrize("cause", list(CAUSES))
def test_pods_that_can_never_start_fail_the_job_without_restarts(k8s, cause):
    kind, detail, expect = CAUSES[cause]
    with operator(k8s):
        k8s.create(job(maxRestarts=3))
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Initializing", rayClusterName="tune-r0-raycluster")
        if kind == "pod":
            opcluster.pod(k8s, "tune-r0-worker-x", POD_LABELS, detail)
        else:
            reason = "FailedToCreateHeadPod" if "head" in detail else "FailedToCreateWorkerPod"
            opcluster.event(k8s, kind="RayCluster", name="tune-r0-raycluster", reason=reason, message=detail)
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "PodsCannotStart" and expect in failed["message"]
        r0 = k8s.wait_for(lambda: rayjobs(k8s)[0]["spec"]["suspend"] and rayjobs(k8s)[0], what="r0 stopped")
        assert r0["metadata"]["annotations"][vocab.ANNOTATION_STOP_REASON] == "PodsCannotStart"
        time.sleep(1.0)  # a few poll periods: still no second run
        assert len(rayjobs(k8s)) == 1 and ptj(k8s)["status"]["restarts"] == 0


def test_a_run_without_a_new_step_past_the_progress_deadline_is_replaced(k8s, driver):
    driver.body = {"step": 5, "totalSteps": 100}
    with operator(k8s, driver.port):
        created = k8s.create(job(maxRestarts=2, progressDeadlineSeconds=2))
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING", dashboardURL="127.0.0.1:8265")
        k8s.wait_for(lambda: (ptj(k8s)["status"].get("progress") or {}).get("step") == 5)
        assert ptj(k8s)["status"]["lastProgressTime"]
        r0 = k8s.wait_for(lambda: rayjobs(k8s)[0]["spec"]["suspend"] and rayjobs(k8s)[0], what="r0 stopped")
        assert r0["metadata"]["annotations"][vocab.ANNOTATION_STOP_REASON] == "ProgressDeadlineExceeded"
        assert len(rayjobs(k8s)) == 1, "the next run waits until the stuck one is gone"
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Suspended", job="STOPPED")  # KubeRay deletes its cluster
        k8s.wait_for(lambda: len(rayjobs(k8s)) == 2, what="r1")
        status = k8s.wait_for(lambda: (s := ptj(k8s)["status"]).get("restarts") == 1 and s)
        assert status["rayJob"] == "tune-r1" and status["phase"] == "Provisioning"
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="ProgressDeadlineExceeded"))


# --- the driver's /progress is untrusted and polled on the timer only ---------------------------

def test_nan_loss_never_reaches_the_status_and_progress_keeps_flowing(k8s, driver):
    with operator(k8s, driver.port):
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        driver.raw = b'{"step": 7, "totalSteps": 100, "loss": NaN, "reward": Infinity, "tokensPerSecond": 12.5}'
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING", dashboardURL="127.0.0.1:8265")
        status = k8s.wait_for(lambda: (s := ptj(k8s)["status"]).get("progress", {}).get("step") == 7 and s)
        assert status["progress"] == {"step": 7, "totalSteps": 100, "tokensPerSecond": 12.5}
        driver.raw = b'{"step": 8, "totalSteps": 100, "loss": 0.5}'
        k8s.wait_for(lambda: ptj(k8s)["status"]["progress"] == {"step": 8, "totalSteps": 100, "loss": 0.5})
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Complete", job="SUCCEEDED")
        k8s.wait_for(phase_is(k8s, "Succeeded"))


def test_wrong_types_and_oversized_answers_are_ignored(k8s, driver):
    with operator(k8s, driver.port):
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        driver.body = {"step": 3, "loss": "low", "totalSteps": -1, "lastCheckpoint": "x" * 5000}
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING", dashboardURL="127.0.0.1:8265")
        status = k8s.wait_for(lambda: (s := ptj(k8s)["status"]).get("progress", {}).get("step") == 3 and s)
        assert status["progress"] == {"step": 3} and "lastCheckpoint" not in status
        driver.raw = json.dumps({"step": 9, "pad": "y" * (70 * 1024)}).encode()
        hits = driver.hits
        k8s.wait_for(lambda: driver.hits >= hits + 3, what="three more polls")
        assert ptj(k8s)["status"]["progress"]["step"] == 3, "an answer over 64 KiB is dropped"


def test_progress_is_polled_on_the_timer_not_on_every_status_change(k8s, driver):
    with operator(k8s, driver.port, progress_interval=1.0) as controller:
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING", dashboardURL="127.0.0.1:8265")
        k8s.wait_for(phase_is(k8s, "Running"))
        started, hits = time.monotonic(), driver.hits
        reconciles = controller.metrics.reconciles.labels(result="success")._value.get()
        for i in range(30):  # every RayJob change triggers a pass; none of them may poll
            k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING", dashboardURL="127.0.0.1:8265",
                                  jobId=f"raysubmit_{i}")
            driver.body = {"step": i + 1, "totalSteps": 100}
        k8s.wait_for(lambda: controller.metrics.reconciles.labels(result="success")._value.get() >= reconciles + 30,
                     what="30 passes")
        elapsed = time.monotonic() - started
        assert driver.hits - hits <= elapsed / 1.0 + 2, (driver.hits - hits, elapsed)
