"""The pure reconcile plan: observed RayJobs (+ progress) -> actions and status."""

from __future__ import annotations

import copy

import pytest

from posttrain.operator import reconcile, vocab
from test_builders import make_job

NOW = "2026-11-27T12:00:00Z"


def body_of(job, status=None, generation=1):
    return {"metadata": {"name": job.metadata.name, "namespace": "ml", "uid": "u1", "generation": generation},
            "spec": job.spec.wire(), "status": status or {}}


def rayjob(run, deployment="", job_status="", suspend=False, applied=None, **extra):
    applied = str(suspend).lower() if applied is None else applied
    return {"metadata": {"name": f"tune-r{run}", "labels": {vocab.LABEL_RUN: str(run)},
                         "annotations": {f"{vocab.ANNOTATION_PREFIX}/suspend": applied}},
            "spec": {"suspend": suspend},
            "status": {"jobDeploymentStatus": deployment, "jobStatus": job_status, **extra}}


def plan(job, rayjobs, status=None, progress=None, started_with=None, requested=None):
    obs = reconcile.Observed(rayjobs=rayjobs, spec_in_configmap=started_with, progress=progress, now=NOW,
                             requested_spec=requested)
    return reconcile.plan(job, body_of(job, status), obs)


def cond(status, ctype):
    return next(c for c in status["conditions"] if c["type"] == ctype)


def test_a_new_job_creates_run_zero_and_is_provisioning():
    p = plan(make_job(), [])
    assert p.create_run == 0
    assert p.status["phase"] == "Provisioning" and p.status["rayJob"] == "tune-r0" and p.status["restarts"] == 0
    assert p.status["observedGeneration"] == 1
    assert ("Normal", "Provisioning", "New -> Provisioning: created tune-r0") in p.events


@pytest.mark.parametrize("deployment,job_status,phase", [
    ("", "", "Provisioning"),
    ("Initializing", "", "Provisioning"),
    ("Running", "RUNNING", "Running"),
    ("Complete", "SUCCEEDED", "Succeeded"),
])
def test_rayjob_states_map_to_phases(deployment, job_status, phase):
    p = plan(make_job(), [rayjob(0, deployment, job_status)])
    assert p.status["phase"] == phase and p.create_run is None
    assert cond(p.status, "Ready")["status"] == ("True" if phase == "Succeeded" else "False")


def test_running_copies_progress_and_sets_start_time():
    progress = {"step": 12, "totalSteps": 100, "loss": 0.5, "tokensPerSecond": 900.0, "phase": "training",
                "lastCheckpoint": "/mnt/pvc/ckpt/tune/checkpoint-10"}
    p = plan(make_job(), [rayjob(0, "Running", "RUNNING")], progress=progress)
    assert p.status["progress"] == {"step": 12, "totalSteps": 100, "loss": 0.5, "tokensPerSecond": 900.0}
    assert p.status["lastCheckpoint"].endswith("checkpoint-10")
    assert p.status["startTime"] == NOW


def test_progress_is_kept_when_the_driver_does_not_answer():
    prev = {"phase": "Running", "progress": {"step": 7}, "startTime": "2026-11-27T11:00:00Z"}
    p = plan(make_job(), [rayjob(0, "Running", "RUNNING")], status=prev, progress=None)
    assert p.status["progress"] == {"step": 7} and p.status["startTime"] == "2026-11-27T11:00:00Z"


@pytest.mark.parametrize("deployment,job_status", [("Failed", ""), ("Complete", "FAILED"), ("Running", "FAILED")])
def test_a_failed_run_is_replaced_by_the_next_one(deployment, job_status):
    rj = rayjob(0, deployment, job_status, reason="AppFailed", message="OOMKilled")
    p = plan(make_job(maxRestarts=2), [rj])
    assert p.create_run == 1
    assert p.status["phase"] == "Provisioning" and p.status["restarts"] == 1 and p.status["rayJob"] == "tune-r1"
    assert cond(p.status, "Progressing")["reason"] == "Restarting"
    assert any(e[1] == "Restarting" and "tune-r0 failed (AppFailed: OOMKilled)" in e[2] for e in p.events)


def test_restarts_exhausted_fails_the_job_for_good():
    job = make_job(maxRestarts=1)
    p = plan(job, [rayjob(0, "Failed"), rayjob(1, "Failed", reason="DeadlineExceeded")])
    assert p.create_run is None
    assert p.status["phase"] == "Failed" and p.status["completionTime"] == NOW
    failed = cond(p.status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "RestartsExhausted"
    assert "tune-r1 failed (DeadlineExceeded)" in failed["message"]
    # Terminal: the next pass keeps it, even after the RayJobs are gone (TTL).
    again = plan(job, [], status=p.status)
    assert again.create_run is None and again.status["phase"] == "Failed" and not again.events


def test_succeeded_stays_succeeded_after_the_rayjob_is_deleted():
    job = make_job()
    done = plan(job, [rayjob(0, "Complete", "SUCCEEDED")], status={"phase": "Running"})
    assert done.status["phase"] == "Succeeded"
    later = plan(job, [], status=done.status)
    assert later.create_run is None and later.status["phase"] == "Succeeded"
    assert later.status["completionTime"] == done.status["completionTime"]


def test_suspend_and_resume():
    running = [rayjob(0, "Running", "RUNNING")]
    p = plan(make_job(suspend=True), running, status={"phase": "Running"})
    assert p.set_suspend == ("tune-r0", True) and p.status["phase"] == "Suspended"
    held = [rayjob(0, "Suspended", suspend=True)]
    assert plan(make_job(suspend=True), held, status=p.status).set_suspend is None
    resumed = plan(make_job(suspend=False), held, status=p.status)
    assert resumed.set_suspend == ("tune-r0", False) and resumed.status["phase"] == "Provisioning"


def test_a_rayjob_held_by_a_queue_is_pending_and_is_not_unsuspended():
    queued = [rayjob(0, "Suspended", suspend=True, applied="false")]
    p = plan(make_job(), queued)
    assert p.set_suspend is None
    assert p.status["phase"] == "Pending" and cond(p.status, "Progressing")["reason"] == "Queued"


def test_condition_transition_times_are_kept_while_unchanged():
    first = plan(make_job(), [rayjob(0, "Running", "RUNNING")])
    later = reconcile.plan(make_job(), body_of(make_job(), first.status),
                           reconcile.Observed([rayjob(0, "Running", "RUNNING")], None, None, "2026-11-27T13:00:00Z"))
    assert later.status == first.status
    assert not reconcile.status_changed(first.status, later.status)


def test_immutable_field_changes_are_reported_and_not_applied():
    job = make_job()
    started = job.spec.wire()
    edited = copy.deepcopy(started)
    edited["training"]["learningRate"] = 1.0
    edited["maxRestarts"] = 7
    assert reconcile.immutable_changes(edited, started) == ["training.learningRate"]
    older = {k: v for k, v in started.items() if k != "placement"}  # stored by an operator without that field
    assert reconcile.immutable_changes(started, older) == []
    effective = reconcile.effective_spec(edited, started)
    assert effective["training"] == started["training"] and effective["maxRestarts"] == 7
    p = plan(job, [rayjob(0, "Running", "RUNNING")], started_with=started, requested=edited)
    accepted = cond(p.status, "SpecAccepted")
    assert accepted["status"] == "False" and accepted["reason"] == "ImmutableFieldChanged"
    assert "training" in accepted["message"]
    assert any(e[0] == "Warning" and e[1] == "ImmutableFieldChanged" for e in p.events)


def test_invalid_spec_fails_with_the_field_named():
    job = make_job()
    p = reconcile.invalid(body_of(job), "spec.adapter.r: Input should be greater than 0 (got 0)", NOW)
    assert p.create_run is None and p.status["phase"] == "Failed"
    failed = cond(p.status, "Failed")
    assert failed["reason"] == "InvalidSpec" and "spec.adapter.r" in failed["message"]
    assert p.events == [("Warning", "InvalidSpec", "spec.adapter.r: Input should be greater than 0 (got 0)")]
