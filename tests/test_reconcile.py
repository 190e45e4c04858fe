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
                         "annotations": {vocab.ANNOTATION_SUSPEND: applied}},
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


def test_running_copies_preference_progress_into_the_status_fields_printer_columns_read():
    from posttrain.api.status import PostTrainingJobStatus

    progress = {"step": 5, "loss": 0.4, "preference": {"rewardsAccuracy": 0.75, "rewardsMargin": 1.5,
                                                       "evalRewardsAccuracy": 0.9, "rewardsChosen": 0.2}}
    p = plan(make_job(), [rayjob(0, "Running", "RUNNING")], progress=progress)
    assert p.status["progress"] == {"step": 5, "loss": 0.4, "rewardsAccuracy": 0.75, "rewardsMargin": 1.5,
                                    "evalRewardsAccuracy": 0.9}
    assert PostTrainingJobStatus.model_validate(p.status).progress.eval_rewards_accuracy == 0.9


def test_the_evaluation_before_and_after_reaches_the_status_and_stays_once_the_job_succeeded():
    from posttrain.api.status import PostTrainingJobStatus

    evaluation = {"base": {"direct": 0.3125, "self_consistency": 0.5}, "trained": {"direct": 0.9219}}
    progress = {"step": 16, "totalSteps": 16, "phase": "succeeded", "evaluation": evaluation}
    running = plan(make_job(), [rayjob(0, "Running", "RUNNING")], progress=progress)
    assert running.status["progress"] == {"step": 16, "totalSteps": 16, "evaluation": evaluation}
    assert PostTrainingJobStatus.model_validate(running.status).progress.evaluation["trained"]["direct"] == 0.9219
    # the driver has exited: the next pass keeps what the last poll read
    done = plan(make_job(), [rayjob(0, "Complete", "SUCCEEDED")], status=running.status, progress=None)
    assert done.status["phase"] == "Succeeded" and done.status["progress"]["evaluation"] == evaluation


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


# --- upgrades: compare what both versions know, never fail a finished job --------------------------

def test_nested_and_top_level_new_defaults_are_not_immutable_changes():
    started = make_job().spec.wire()
    newer = copy.deepcopy(started)
    newer["training"]["newKnob"] = 3  # a default a newer version fills in
    newer["futureFeature"] = {"enabled": False}
    older = copy.deepcopy(started)
    del older["training"]["loggingSteps"]
    assert reconcile.immutable_changes(newer, started) == []
    assert reconcile.immutable_changes(started, older) == []
    newer["data"]["train"][0]["weight"] = 2.0
    assert reconcile.immutable_changes(newer, started) == ["data.train[0].weight"]


def test_a_terminal_failure_never_overwrites_a_finished_job():
    done = plan(make_job(), [rayjob(0, "Complete", "SUCCEEDED")], status={"phase": "Running"}).status
    kept = reconcile.terminal(body_of(make_job(), done), "InvalidSpec", "spec.x: unknown field", NOW)
    assert kept.status == done and kept.events == []


def test_unknown_fields_are_a_condition_reported_once():
    obs = reconcile.Observed([rayjob(0, "Running", "RUNNING")], None, None, NOW,
                             unknown_fields=["spec.training.newKnob"])
    first = reconcile.plan(make_job(), body_of(make_job(), {"phase": "Running"}), obs)
    noted = cond(first.status, "UnknownFields")
    assert noted["reason"] == "UnknownFieldsIgnored" and "spec.training.newKnob" in noted["message"]
    assert any(e[1] == "UnknownFieldsIgnored" for e in first.events)
    again = reconcile.plan(make_job(), body_of(make_job(), first.status), obs)
    assert not any(e[1] == "UnknownFieldsIgnored" for e in again.events)
    assert first.status["phase"] == "Running"


# --- what a failed run means -----------------------------------------------------------------------

RAY_TAIL = ("Job entrypoint command failed with exit code {}, last available logs (truncated to 20,000 chars):\n"
            "Traceback ...\nHF_TOKEN=hf_SECRET\n")


def test_exit_code_2_is_invalid_input_and_is_not_restarted():
    p = plan(make_job(maxRestarts=3), [rayjob(0, "Failed", "FAILED", reason="AppFailed", message=RAY_TAIL.format(2))])
    assert p.create_run is None and p.status["phase"] == "Failed"
    failed = cond(p.status, "Failed")
    assert failed["reason"] == "InvalidInput" and "exit code 2" in failed["message"]
    assert "HF_TOKEN" not in str(p.status) + str(p.events) and "Traceback" not in str(p.status) + str(p.events)


def test_exit_code_1_restarts_with_the_first_line_only():
    p = plan(make_job(maxRestarts=3), [rayjob(0, "Failed", "FAILED", reason="AppFailed", message=RAY_TAIL.format(1))])
    assert p.create_run == 1
    text = str(p.status) + str(p.events)
    assert "failed with exit code 1" in text and "HF_TOKEN" not in text and "last available logs" not in text


def test_kuberay_validation_failed_fails_the_job():
    rj = rayjob(0, "ValidationFailed", reason="ValidationFailed", message="The RayJob spec is invalid: x\nmore")
    p = plan(make_job(maxRestarts=3), [rj])
    assert p.create_run is None and p.status["phase"] == "Failed"
    assert cond(p.status, "Failed")["reason"] == "RayJobValidationFailed"
    assert "The RayJob spec is invalid: x" in cond(p.status, "Failed")["message"]


def test_pods_that_cannot_start_fail_the_job_and_stop_its_run():
    obs = reconcile.Observed([rayjob(0, "Initializing")], None, None, NOW,
                             pods_cannot_start='pod tune-r0-head: secret "hf" not found')
    p = reconcile.plan(make_job(maxRestarts=3), body_of(make_job()), obs)
    assert p.create_run is None and p.status["phase"] == "Failed"
    assert cond(p.status, "Failed")["reason"] == "PodsCannotStart"
    assert p.stop_run == ("tune-r0", "PodsCannotStart", 'pod tune-r0-head: secret "hf" not found')


# --- spec.progressDeadlineSeconds: the clock lives in the status ------------------------------------

def at(minutes: int) -> str:
    return f"2026-11-27T12:{minutes:02d}:00Z"


def progress_plan(job, rayjobs, status, step, now):
    obs = reconcile.Observed(rayjobs, None, {"step": step}, now)
    return reconcile.plan(job, body_of(job, status), obs)


def test_progress_deadline_counts_from_the_last_step_change_and_survives_restarts():
    job = make_job(maxRestarts=2, progressDeadlineSeconds=600)
    running = [rayjob(0, "Running", "RUNNING")]
    first = progress_plan(job, running, {"phase": "Provisioning"}, 10, at(0))
    assert first.status["lastProgressTime"] == at(0)
    moved = progress_plan(job, running, first.status, 11, at(8))
    assert moved.status["lastProgressTime"] == at(8) and moved.stop_run is None
    # An operator restart in between changes nothing: the clock is in the status, not in memory.
    still = progress_plan(job, running, moved.status, 11, at(17))
    assert still.stop_run is None and still.status["phase"] == "Running"
    stuck = progress_plan(job, running, still.status, 11, at(19))
    assert stuck.stop_run == ("tune-r0", "ProgressDeadlineExceeded", stuck.stop_run[2])
    assert "600s" in stuck.stop_run[2] and stuck.create_run is None
    assert cond(stuck.status, "Progressing")["reason"] == "ProgressDeadlineExceeded"


def test_a_run_stopped_for_its_deadline_is_replaced_once_it_is_gone_and_counts_as_a_restart():
    job = make_job(maxRestarts=1, progressDeadlineSeconds=600)
    annotations = {vocab.ANNOTATION_STOP_REASON: "ProgressDeadlineExceeded",
                   vocab.ANNOTATION_STOP_MESSAGE: "no new step for 600s"}
    stopping = rayjob(0, "Suspending", suspend=True, applied="true")
    stopping["metadata"]["annotations"].update(annotations)
    waiting = plan(job, [stopping], status={"phase": "Running", "rayJob": "tune-r0"})
    assert waiting.create_run is None and waiting.status["phase"] == "Provisioning"
    stopped = copy.deepcopy(stopping)
    stopped["status"]["jobDeploymentStatus"] = "Suspended"
    p = plan(job, [stopped], status=waiting.status)
    assert p.create_run == 1 and p.status["restarts"] == 1
    assert any(e[1] == "ProgressDeadlineExceeded" and "restart 1/1" in e[2] for e in p.events)
    # The new run gets a fresh clock when it starts running (not the stuck run's).
    r1 = rayjob(1, "Running", "RUNNING")
    fresh = progress_plan(job, [stopped, r1], {**p.status, "lastProgressTime": at(0)}, 11, at(30))
    assert fresh.status["lastProgressTime"] == at(30) and fresh.stop_run is None


# --- claims ----------------------------------------------------------------------------------------

def pvc(*modes):
    return {"spec": {"accessModes": list(modes)}, "status": {"phase": "Bound", "accessModes": list(modes)}}


def volume_plan(volumes):
    obs = reconcile.Observed([], None, None, NOW, volumes=volumes)
    return reconcile.plan(make_job(), body_of(make_job()), obs)


def test_claims_gate_the_first_run():
    rwx = pvc("ReadWriteMany")
    ok = volume_plan({"models": rwx, "data": pvc("ReadOnlyMany"), "ckpt": rwx})
    assert ok.create_run == 0
    missing = volume_plan({"models": rwx, "data": rwx, "ckpt": None})
    assert missing.create_run is None and missing.status["phase"] == "Pending"
    assert cond(missing.status, "Blocked")["reason"] == "WaitingForVolume" and "ckpt" in cond(missing.status, "Blocked")["message"]
    rwo = volume_plan({"models": rwx, "data": rwx, "ckpt": pvc("ReadWriteOnce")})
    assert rwo.create_run is None and rwo.status["phase"] == "Failed"
    assert cond(rwo.status, "Failed")["reason"] == "VolumeNotShared" and "ckpt" in cond(rwo.status, "Failed")["message"]
    rox_output = volume_plan({"models": pvc("ReadOnlyMany"), "data": rwx, "ckpt": rwx})
    assert rox_output.status["phase"] == "Failed", "output claims need ReadWriteMany"


# --- observe: untrusted text and answers ------------------------------------------------------------

def test_sanitize_progress_keeps_only_finite_typed_fields():
    from posttrain.operator.observe import sanitize_progress

    assert sanitize_progress({"step": 4, "totalSteps": 10, "loss": float("inf"), "reward": True,
                              "tokensPerSecond": 3, "lastCheckpoint": "s3://b/c", "phase": "x"}) == \
        {"step": 4, "totalSteps": 10, "tokensPerSecond": 3, "lastCheckpoint": "s3://b/c"}
    assert sanitize_progress({"step": -1}) is None and sanitize_progress([1]) is None
    assert sanitize_progress({"step": True}) is None
    assert "lastCheckpoint" not in sanitize_progress({"step": 1, "lastCheckpoint": "x" * 2000})
    assert "lastCheckpoint" not in sanitize_progress({"step": 1, "lastCheckpoint": "a\nb"})


def test_summary_cuts_ray_log_tails_and_long_text():
    from posttrain.operator.observe import MAX_TEXT, summary

    assert summary(RAY_TAIL.format(1)) == "Job entrypoint command failed with exit code 1"
    assert summary("Job entrypoint command failed with exit code 3. No logs available.") == \
        "Job entrypoint command failed with exit code 3. No logs available."
    assert len(summary("x" * 5000)) == MAX_TEXT


@pytest.mark.parametrize("pods,events,word", [
    ([{"metadata": {"name": "p"}, "status": {"conditions": [{"type": "PodScheduled", "status": "False",
        "message": 'persistentvolumeclaim "x" not found'}]}}], [], 'persistentvolumeclaim "x"'),
    ([{"metadata": {"name": "p"}, "status": {"initContainerStatuses": [{"name": "wait-gcs-ready", "state": {
        "waiting": {"reason": "CreateContainerConfigError", "message": "couldn't find key token in Secret ns/hf"}}}]}}],
     [], "couldn't find key"),
    ([], [{"reason": "FailedToCreateWorkerPod", "message": 'x is forbidden: violates PodSecurity "restricted"'}],
     "PodSecurity"),
    ([], [{"reason": "FailedToCreateHeadPod", "note": "forbidden: no PriorityClass with name hi was found"}],
     "PriorityClass"),
])
def test_pods_cannot_start_recognises_each_cause(pods, events, word):
    from posttrain.operator.observe import pods_cannot_start

    assert word in pods_cannot_start(pods, events)


def test_pods_that_are_merely_pending_or_pulling_are_not_fatal():
    from posttrain.operator.observe import pods_cannot_start

    pending = {"metadata": {"name": "p"}, "status": {"conditions": [{"type": "PodScheduled", "status": "False",
               "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}], "containerStatuses": [
               {"name": "c", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "back-off"}}}]}}
    quota = {"reason": "FailedToCreateWorkerPod", "message": "exceeded quota: gpu-quota"}
    assert pods_cannot_start([pending], [quota]) is None
