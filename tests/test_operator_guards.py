"""The real kopf operator against the API emulator: what it checks before it runs anything, and
what it trusts afterwards.

Shared storage and claims (ReadWriteMany), the NetworkPolicy and Ray token auth of every job, the
spec ConfigMap (never a namesake's, never a tampered one), an upgrade that adds defaulted fields,
and finalizers (none added; old ones removed, also by `posttrain-operator remove-finalizers`).

    .venv/bin/python -m pytest tests/test_operator_guards.py -q
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

import kubeemu
import opcluster
from posttrain.api.load import parse_job
from posttrain.operator import builders, vocab
from test_operator import NS, job, k8s, operator, phase_is, ptj, rayjobs, without_cel_rules  # noqa: F401 - fixtures

SETTINGS = builders.BuildSettings(image="ghcr.io/posttrain/runtime:test")


def condition(k8s, ctype, name="tune"):
    return next((c for c in (ptj(k8s, name).get("status") or {}).get("conditions") or [] if c["type"] == ctype), None)


def nothing_created(k8s) -> bool:
    return (rayjobs(k8s) == [] and k8s.find(*kubeemu.CONFIGMAP, NS, "tune-spec") is None
            and k8s.find(*opcluster.NETPOL, NS, "tune-ray") is None)


# --- storage -----------------------------------------------------------------------------------

def test_a_job_without_shared_output_is_refused_before_anything_is_created(k8s):
    with operator(k8s):
        k8s.create(job(output={"mergeAdapter": False}, data={"train": [{"source": "train.jsonl"}]}))
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "InvalidSpec"
        assert "spec.output.uri: required on a cluster" in failed["message"] and "pvc://" in failed["message"]
        assert "spec.data.train[0].source: relative path" in failed["message"]
        assert nothing_created(k8s)


def test_a_readwriteonce_claim_fails_the_job_naming_the_claim(k8s):
    opcluster.claim(k8s, "scratch", "ReadWriteOnce")
    with operator(k8s):
        k8s.create(job(checkpoint={"uri": "pvc://scratch/tune"}))
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "VolumeNotShared"
        assert "PersistentVolumeClaim scratch" in failed["message"] and "different nodes" in failed["message"]
        assert nothing_created(k8s)


def test_an_inputs_only_claim_may_be_readonlymany(k8s):
    opcluster.claim(k8s, "corpus", "ReadOnlyMany")
    with operator(k8s):
        k8s.create(job(data={"train": [{"source": "pvc://corpus/train.jsonl"}]}))
        rj = k8s.wait_for(lambda: rayjobs(k8s))[0]
        worker = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        assert {"name": "pvc-corpus", "persistentVolumeClaim": {"claimName": "corpus", "readOnly": True}} \
            in worker["volumes"]


def test_a_missing_claim_is_a_condition_while_the_job_waits(k8s):
    with operator(k8s):
        created = k8s.create(job(checkpoint={"uri": "pvc://later/tune"}))
        blocked = k8s.wait_for(lambda: condition(k8s, "Blocked"))
        assert blocked["reason"] == "WaitingForVolume" and "later" in blocked["message"]
        assert ptj(k8s)["status"]["phase"] == "Pending"
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="WaitingForVolume"))
        assert nothing_created(k8s)
        opcluster.claim(k8s, "later")
        k8s.wait_for(lambda: rayjobs(k8s), what="the run once the claim exists")
        k8s.wait_for(lambda: condition(k8s, "Blocked") is None, what="Blocked cleared")


# --- what every job gets -------------------------------------------------------------------------

def test_every_job_gets_a_networkpolicy_token_auth_and_an_immutable_spec(k8s):
    with operator(k8s):
        created = k8s.create(job())
        rj = k8s.wait_for(lambda: rayjobs(k8s))[0]
        assert rj["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
        policy = k8s.get(*opcluster.NETPOL, NS, "tune-ray")
        assert policy["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
        assert policy["spec"]["podSelector"] == {"matchLabels": {vocab.LABEL_JOB: "tune"}}
        ports = [r.get("ports") for r in policy["spec"]["ingress"]]
        assert ports == [None, [{"protocol": "TCP", "port": 8490}], [{"protocol": "TCP", "port": 8490}],
                         [{"protocol": "TCP", "port": 8265}]]
        assert k8s.get(*kubeemu.CONFIGMAP, NS, "tune-spec")["immutable"] is True
        k8s.delete(*kubeemu.PTJ, NS, "tune")
        k8s.wait_for(lambda: k8s.find(*opcluster.NETPOL, NS, "tune-ray") is None, what="policy collected")


def test_the_networkpolicy_can_be_turned_off(k8s):
    with operator(k8s, build=builders.BuildSettings(image="img:1", network_policy=None)):
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        assert k8s.find(*opcluster.NETPOL, NS, "tune-ray") is None


# --- the spec ConfigMap --------------------------------------------------------------------------

def spec_configmap(owner_refs, spec=None, annotation=None):
    parsed = parse_job(job())
    body = builders.build_configmap(parsed, owner_uid="x")
    body["metadata"]["ownerReferences"] = owner_refs
    if spec is not None:
        body["data"][vocab.SPEC_FILE] = json.dumps({**builders.spec_document(parsed), "spec": spec})
        body["metadata"]["annotations"][vocab.ANNOTATION_SPEC_HASH] = annotation or builders.content_hash(spec)
    return body


def test_a_recreated_job_waits_for_its_namesakes_configmap_to_be_collected(k8s):
    # A namesake's leftover that garbage collection has not removed yet (one live owner keeps it here).
    holder = k8s.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gc-pending", "namespace": NS}})
    old = {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob", "name": "tune", "uid": "deleted-uid"}
    stale_spec = copy.deepcopy(parse_job(job()).spec.wire())
    stale_spec["training"]["maxSteps"] = 7
    k8s.create(spec_configmap([old, {"apiVersion": "v1", "kind": "ConfigMap", "name": "gc-pending",
                                     "uid": holder["metadata"]["uid"]}], spec=stale_spec))
    with operator(k8s):
        k8s.create(job())
        blocked = k8s.wait_for(lambda: condition(k8s, "Blocked"))
        assert blocked["reason"] == "WaitingForGarbageCollection" and "tune-spec" in blocked["message"]
        assert rayjobs(k8s) == []
        k8s.delete(*kubeemu.CONFIGMAP, NS, "gc-pending")  # the collector catches up
        k8s.wait_for(lambda: rayjobs(k8s), what="the run with its own ConfigMap")
        stored = json.loads(k8s.get(*kubeemu.CONFIGMAP, NS, "tune-spec")["data"][vocab.SPEC_FILE])
        assert stored["spec"]["training"]["maxSteps"] == 100, "never the namesake's spec"


def test_a_configmap_that_belongs_to_something_else_is_not_adopted(k8s):
    k8s.create(spec_configmap([]))
    with operator(k8s):
        k8s.create(job())
        blocked = k8s.wait_for(lambda: condition(k8s, "Blocked"))
        assert blocked["reason"] == "SpecConfigMapConflict" and rayjobs(k8s) == []


@pytest.mark.parametrize("forge_annotation", [False, True])
def test_a_tampered_spec_configmap_is_never_run(k8s, forge_annotation):
    with operator(k8s):
        created = k8s.create(job(maxRestarts=3))
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.wait_for(lambda: ptj(k8s).get("status", {}).get("specHash"))
        cm = k8s.get(*kubeemu.CONFIGMAP, NS, "tune-spec")
        evil = json.loads(cm["data"][vocab.SPEC_FILE])["spec"]
        evil["rewards"] = [{"function": "/mnt/pvc/data/evil.py:run"}]
        # Immutable: a tamperer deletes and recreates it, copying the ownerReference (the uid is public).
        k8s.delete(*kubeemu.CONFIGMAP, NS, "tune-spec")
        k8s.create(spec_configmap(cm["metadata"]["ownerReferences"], spec=evil,
                                  annotation=None if forge_annotation else cm["metadata"]["annotations"][
                                      vocab.ANNOTATION_SPEC_HASH]))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed", job="FAILED", reason="AppFailed")
        k8s.wait_for(phase_is(k8s, "Failed"))
        failed = condition(k8s, "Failed")
        assert failed["reason"] == "SpecConfigMapTampered" and "tune-spec" in failed["message"]
        assert [r["metadata"]["name"] for r in rayjobs(k8s)] == ["tune-r0"], "the next run never starts"
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="SpecConfigMapTampered"))


# --- upgrades --------------------------------------------------------------------------------------

def future_crd() -> dict:
    """The PostTrainingJob CRD of a later version: new defaulted fields at the top and nested."""
    crd = copy.deepcopy(dict(kubeemu.load_crd(kubeemu.PTJ_CRD)))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec["properties"]["futureFeature"] = {"type": "object", "default": {"enabled": False},
                                           "properties": {"enabled": {"type": "boolean"}}}
    spec["properties"]["training"]["properties"]["newKnob"] = {"type": "integer", "default": 3}
    return crd


def test_an_upgrade_that_adds_defaulted_fields_keeps_running_and_finished_jobs(k8s):
    with operator(k8s):
        for name in ("run", "done"):
            k8s.create(job(name=name))
            k8s.wait_for(lambda n=name: rayjobs(k8s, n))
        k8s.set_rayjob_status(NS, "run-r0", deployment="Running", job="RUNNING")
        k8s.set_rayjob_status(NS, "done-r0", deployment="Complete", job="SUCCEEDED")
        k8s.wait_for(phase_is(k8s, "Running", "run"))
        k8s.wait_for(phase_is(k8s, "Succeeded", "done"))
        # The new CRD goes in first (the README's order); the server now shows its defaults on every read of
        # the objects stored under the old one (nothing rewrites them), and ends the watches on the kind.
        k8s.apply(future_crd())
        for name in ("run", "done"):
            assert ptj(k8s, name)["spec"]["training"]["newKnob"] == 3
            assert ptj(k8s, name)["spec"]["futureFeature"] == {"enabled": False}
    # Then `helm upgrade` replaces the operator: it reads every job anew. (A finished job gets no event from
    # the CRD change itself: the watch resumes from its resourceVersion, and nothing polls a finished job.)
    with operator(k8s):
        noted = k8s.wait_for(lambda: condition(k8s, "UnknownFields", "run"))
        assert "spec.training.newKnob" in noted["message"] and "spec.futureFeature" in noted["message"]
        k8s.wait_for(lambda: condition(k8s, "UnknownFields", "done"))
        k8s.set_rayjob_status(NS, "run-r0", deployment="Running", job="RUNNING", jobId="another-pass")
        k8s.wait_for(lambda: len(k8s.events(NS, involved=ptj(k8s, "run"), reason="UnknownFieldsIgnored")) == 1)
        for name, phase in (("run", "Running"), ("done", "Succeeded")):
            status = ptj(k8s, name)["status"]
            assert status["phase"] == phase, (name, status)
            assert not any(c["reason"] in ("InvalidSpec", "ImmutableFieldChanged") for c in status["conditions"])
        assert len(k8s.events(NS, involved=ptj(k8s, "run"), reason="UnknownFieldsIgnored")) == 1, "reported once"


def test_a_configmap_written_by_an_older_version_is_adopted_without_a_false_immutable_change(k8s):
    created = k8s.create(job())
    uid = created["metadata"]["uid"]
    older = parse_job(job()).spec.wire()
    del older["training"]["loggingSteps"], older["env"], older["envFrom"]  # fields that version did not have
    owner = [vocab.owner_reference("tune", uid)]
    k8s.create(spec_configmap(owner, spec=older))
    k8s.create(builders.build_rayjob(parse_job(job()), run=0, owner_uid=uid, settings=SETTINGS))
    k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING")
    with operator(k8s):
        status = k8s.wait_for(lambda: (s := ptj(k8s).get("status") or {}).get("phase") == "Running" and s)
        assert condition(k8s, "SpecAccepted") is None
        assert status["specHash"] == builders.content_hash(older)


def test_an_invalid_edit_never_fails_a_started_job(k8s):
    with operator(k8s):
        k8s.create(job(maxRestarts=2))
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING")
        k8s.wait_for(phase_is(k8s, "Running"))
        # The CRD's CEL rules refuse this edit; a CRD older than them lets it through to the operator.
        k8s.apply(without_cel_rules(kubeemu.load_crd(kubeemu.PTJ_CRD)))
        k8s.patch(*kubeemu.PTJ, NS, "tune", {"spec": {"adapter": {"type": "prefix", "targetModules": ["q_proj"]}}})
        accepted = k8s.wait_for(lambda: condition(k8s, "SpecAccepted"))
        assert accepted["reason"] == "InvalidSpec" and "spec.adapter.targetModules" in accepted["message"]
        assert ptj(k8s)["status"]["phase"] == "Running"
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed", job="FAILED", reason="AppFailed")
        r1 = k8s.wait_for(lambda: [r for r in rayjobs(k8s) if r["metadata"]["name"] == "tune-r1"], what="r1")[0]
        assert r1["metadata"]["annotations"][vocab.ANNOTATION_SPEC_HASH] == \
            rayjobs(k8s)[0]["metadata"]["annotations"][vocab.ANNOTATION_SPEC_HASH], "restarted with the stored spec"


# --- finalizers --------------------------------------------------------------------------------------

def test_the_operator_adds_no_finalizer(k8s):
    with operator(k8s) as controller:
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s))
        k8s.wait_for(phase_is(k8s, "Provisioning"))
        passes = controller.metrics.reconciles.labels(result="success")._value.get()
        # Several poll periods later (kopf adds a timer's finalizer on its own schedule): still none.
        k8s.wait_for(lambda: controller.metrics.reconciles.labels(result="success")._value.get() >= passes + 5)
        assert not ptj(k8s)["metadata"].get("finalizers")
        k8s.delete(*kubeemu.PTJ, NS, "tune")
        k8s.wait_for(lambda: k8s.find(*kubeemu.PTJ, NS, "tune") is None, what="deleted at once")


def test_finalizers_older_versions_left_are_removed_by_the_operator(k8s):
    legacy = job()
    legacy["metadata"]["finalizers"] = [vocab.FINALIZER, "example.com/keep"]
    k8s.create(legacy)
    with operator(k8s):
        k8s.wait_for(lambda: ptj(k8s)["metadata"].get("finalizers") == ["example.com/keep"])


def test_remove_finalizers_command_unblocks_deletion_without_an_operator(k8s):
    for name in ("a", "b"):
        stuck = job(name=name)
        stuck["metadata"]["finalizers"] = [vocab.FINALIZER]
        k8s.create(stuck)
    k8s.delete(*kubeemu.PTJ, NS, "a")  # hangs: nothing removes the finalizer
    assert ptj(k8s, "a")["metadata"]["deletionTimestamp"]
    env = {**os.environ, "KUBECONFIG": str(k8s.kubeconfig_path)}
    dry = subprocess.run([sys.executable, "-m", "posttrain.operator", "remove-finalizers", "--dry-run"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "2 PostTrainingJob(s) to clean" in dry.stdout, dry.stderr
    assert ptj(k8s, "a")["metadata"]["finalizers"] == [vocab.FINALIZER]
    done = subprocess.run([sys.executable, "-m", "posttrain.operator", "remove-finalizers", "-n", NS],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "2 PostTrainingJob(s) cleaned" in done.stdout, done.stderr
    assert k8s.find(*kubeemu.PTJ, NS, "a") is None, "the pending deletion completes"
    assert not ptj(k8s, "b")["metadata"].get("finalizers")


def test_a_stored_spec_that_no_longer_parses_is_reported_and_never_restarted(k8s):
    created = k8s.create(job(maxRestarts=3))
    uid = created["metadata"]["uid"]
    broken = parse_job(job()).spec.wire()
    broken["training"]["maxSteps"] = 0  # a value this version refuses
    k8s.create(spec_configmap([vocab.owner_reference("tune", uid)], spec=broken))
    k8s.create(builders.build_rayjob(parse_job(job()), run=0, owner_uid=uid, settings=SETTINGS))
    k8s.set_rayjob_status(NS, "tune-r0", deployment="Running", job="RUNNING")
    with operator(k8s):
        accepted = k8s.wait_for(lambda: condition(k8s, "SpecAccepted"))
        assert accepted["reason"] == "StoredSpecInvalid" and "spec.training.maxSteps" in accepted["message"]
        assert ptj(k8s)["status"]["phase"] == "Running", "the run it started keeps going"
        assert k8s.wait_for(lambda: k8s.events(NS, involved=created, reason="StoredSpecInvalid"))
        k8s.set_rayjob_status(NS, "tune-r0", deployment="Failed", job="FAILED", reason="AppFailed")
        k8s.wait_for(phase_is(k8s, "Failed"))
        assert condition(k8s, "Failed")["reason"] == "StoredSpecInvalid"
        assert len(rayjobs(k8s)) == 1
