"""The real kopf operator against the API emulator: jobs that name other jobs (`ptj://<job>`).

A job waits (Pending, `WaitingForDependency`) while a job it names has not succeeded, with no polling;
starts with the references resolved in its spec ConfigMap once that job succeeded; fails when it
failed, does not exist (after the grace), or when the jobs need each other in a cycle. The waiting
survives an operator restart.

    .venv/bin/python -m pytest tests/test_operator_depends.py -q
"""

from __future__ import annotations

import json
import time

import kubeemu
from test_operator import NS, job, k8s, operator, phase_is, ptj, rayjobs  # noqa: F401 - fixtures


def condition(k8s, ctype, name):
    return next((c for c in (ptj(k8s, name).get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def waiting(k8s, name, reason):
    return lambda: (c := condition(k8s, "WaitingForDependency", name)) and c["reason"] == reason and c


def dependent(name="b", source="ptj://a", **spec):
    fields = {"checkpoint": {"uri": f"pvc://ckpt/{name}"}, "output": {"uri": f"pvc://models/out/{name}"}}
    return job(name, model={"source": source}, **(fields | spec))


def succeed(k8s, name):
    run = k8s.wait_for(lambda: rayjobs(k8s, name), what=f"{name}'s RayJob")[0]["metadata"]["name"]
    k8s.set_rayjob_status(NS, run, deployment="Complete", job="SUCCEEDED")
    k8s.wait_for(phase_is(k8s, "Succeeded", name), what=f"{name} Succeeded")


def spec_in_configmap(k8s, name):
    return json.loads(k8s.get(*kubeemu.CONFIGMAP, NS, f"{name}-spec")["data"]["job.json"])["spec"]


def gets_of(k8s, name):
    return sum(1 for e in k8s.audit if e["verb"] == "get" and e["resource"] == "posttrainingjobs" and e["name"] == name)


def test_a_job_waits_for_the_job_it_names_then_runs_on_its_output(k8s):
    with operator(k8s):
        k8s.create(job("a"))  # a LoRA job writing to pvc://models/out/tune
        k8s.create(dependent("b"))
        cond = k8s.wait_for(waiting(k8s, "b", "DependencyNotFinished"), what="b waiting")
        assert cond["status"] == "True" and "spec.model.source: waiting for job a to succeed" in cond["message"]
        assert ptj(k8s, "b")["status"]["phase"] == "Pending"
        assert rayjobs(k8s, "b") == [] and k8s.find(*kubeemu.CONFIGMAP, NS, "b-spec") is None
        # No polling: a waiting job is not on the progress timer (0.3 s here, which does poll a), so no pass
        # of b (each starts by reading b) runs while a is busy and its phase does not change.
        k8s.wait_for(lambda: rayjobs(k8s, "a"))
        k8s.wait_for(phase_is(k8s, "Provisioning", "a"))
        time.sleep(0.5)
        before = gets_of(k8s, "b"), gets_of(k8s, "a")
        time.sleep(2.0)
        assert gets_of(k8s, "b") == before[0] and gets_of(k8s, "a") > before[1]

        succeed(k8s, "a")
        rj = k8s.wait_for(lambda: rayjobs(k8s, "b"), what="b's RayJob once a succeeded")[0]
        assert rj["metadata"]["name"] == "b-r0"
        # The resolved spec runs; the user's spec keeps its reference. a trained a LoRA adapter (no merge).
        assert spec_in_configmap(k8s, "b")["model"]["source"] == "pvc://models/out/tune/adapter"
        assert ptj(k8s, "b")["spec"]["model"]["source"] == "ptj://a"
        k8s.wait_for(phase_is(k8s, "Provisioning", "b"))
        assert condition(k8s, "WaitingForDependency", "b") is None
        k8s.set_rayjob_status(NS, "b-r0", deployment="Running", job="RUNNING")
        k8s.wait_for(phase_is(k8s, "Running", "b"))
        assert condition(k8s, "SpecAccepted", "b") is None  # resolved vs written is not a changed field


def test_data_and_reward_model_references_resolve_to_their_files(k8s):
    with operator(k8s):
        k8s.create(job("gen", adapter={"type": "none"}))
        k8s.create(dependent("rl", source="pvc://models/smol", data={"train": [{"source": "ptj://gen"}],
                                                                    "eval": {"source": "ptj://gen/eval.jsonl"}}))
        k8s.wait_for(waiting(k8s, "rl", "DependencyNotFinished"))
        succeed(k8s, "gen")
        k8s.wait_for(lambda: rayjobs(k8s, "rl"))
        data = spec_in_configmap(k8s, "rl")["data"]
        assert data["train"][0]["source"] == "pvc://models/out/tune/data/train.jsonl"
        assert data["eval"]["source"] == "pvc://models/out/tune/eval.jsonl"


def test_a_failed_dependency_fails_the_job(k8s):
    with operator(k8s):
        k8s.create(job("a", maxRestarts=0))
        k8s.create(dependent("b"))
        k8s.wait_for(waiting(k8s, "b", "DependencyNotFinished"))
        k8s.wait_for(lambda: rayjobs(k8s, "a"))
        k8s.set_rayjob_status(NS, "a-r0", deployment="Failed", job="FAILED", reason="AppFailed", message="boom")
        k8s.wait_for(phase_is(k8s, "Failed", "b"), what="b Failed")
        failed = condition(k8s, "Failed", "b")
        assert failed["reason"] == "DependencyFailed"
        assert failed["message"].startswith("spec.model.source: ptj://a: job a failed (RestartsExhausted")
        assert rayjobs(k8s, "b") == [] and k8s.find(*kubeemu.CONFIGMAP, NS, "b-spec") is None


def test_a_missing_dependency_waits_for_its_creation_within_the_grace(k8s):
    with operator(k8s):
        k8s.create(dependent("b"))
        cond = k8s.wait_for(waiting(k8s, "b", "DependencyNotFound"))
        assert "spec.model.source: ptj://a: no PostTrainingJob a in namespace default yet" in cond["message"]
        k8s.create(job("a"))  # a's appearance wakes b
        k8s.wait_for(waiting(k8s, "b", "DependencyNotFinished"), what="b waiting for a to finish")


def test_a_missing_dependency_fails_the_job_after_the_grace(k8s):
    with operator(k8s, dependency_grace=1.0):
        k8s.create(dependent("b", source="ptj://nothing"))
        k8s.wait_for(phase_is(k8s, "Failed", "b"), what="b Failed")
        failed = condition(k8s, "Failed", "b")
        assert failed["reason"] == "DependencyNotFound"
        assert failed["message"].startswith("spec.model.source: ptj://nothing: no PostTrainingJob nothing in "
                                            "namespace default (waited 1s after this job was created)")


def test_jobs_that_need_each_other_are_refused(k8s):
    # Created while no operator runs (e.g. applied before it was installed): both exist at the first pass.
    k8s.create(dependent("a", source="ptj://b"))
    k8s.create(dependent("b", source="ptj://a"))
    with operator(k8s):
        for name in ("a", "b"):
            k8s.wait_for(phase_is(k8s, "Failed", name), what=f"{name} Failed")
        reasons = {n: condition(k8s, "Failed", n)["reason"] for n in ("a", "b")}
        # The first to be refused names the cycle; the other may learn it as its dependency's failure first.
        assert "DependencyCycle" in reasons.values() and set(reasons.values()) <= {"DependencyCycle", "DependencyFailed"}
        messages = " ".join(condition(k8s, "Failed", n)["message"] for n in ("a", "b"))
        assert "need each other's output" in messages and ("a -> b -> a" in messages or "b -> a -> b" in messages)
        assert rayjobs(k8s, "a") == rayjobs(k8s, "b") == []


def test_a_job_created_into_a_cycle_is_refused(k8s):
    with operator(k8s):
        k8s.create(dependent("a", source="ptj://c"))
        k8s.create(dependent("c", source="ptj://b"))
        k8s.create(dependent("b", source="ptj://a"))
        k8s.wait_for(phase_is(k8s, "Failed", "b"), what="b Failed")
        failed = condition(k8s, "Failed", "b")
        assert failed["reason"] == "DependencyCycle"
        assert failed["message"] == ("spec.model.source: ptj://a: jobs b -> a -> c -> b need each other's output, "
                                     "so none of them can start; change one of them to use something else")
        for name in ("a", "c"):  # woken by b's failure, they fail too instead of waiting forever
            k8s.wait_for(phase_is(k8s, "Failed", name), what=f"{name} Failed")


def test_the_waiting_survives_an_operator_restart(k8s):
    with operator(k8s):
        k8s.create(job("a"))
        k8s.create(dependent("b"))
        k8s.wait_for(waiting(k8s, "b", "DependencyNotFinished"))
        k8s.wait_for(lambda: rayjobs(k8s, "a"))
    # While no operator runs, a's run completes and a is marked Succeeded (by the next operator's pass).
    k8s.set_rayjob_status(NS, "a-r0", deployment="Complete", job="SUCCEEDED")
    with operator(k8s):
        k8s.wait_for(lambda: rayjobs(k8s, "b"), what="b's RayJob after the restart")
        assert spec_in_configmap(k8s, "b")["model"]["source"] == "pvc://models/out/tune/adapter"


def test_a_job_that_could_never_run_on_a_cluster_fails_without_waiting(k8s):
    with operator(k8s):
        k8s.create(job("a"))
        k8s.create(dependent("b", output={"mergeAdapter": False}))
        k8s.wait_for(phase_is(k8s, "Failed", "b"), what="b Failed")
        failed = condition(k8s, "Failed", "b")
        assert failed["reason"] == "InvalidSpec" and "spec.output.uri: required on a cluster" in failed["message"]
