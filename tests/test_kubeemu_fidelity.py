"""The API emulator's stricter semantics: CEL rules, defaults on read, CRD replacement, eventual
garbage collection, namespace termination.

Run: `.venv/bin/python -m pytest tests/test_kubeemu_fidelity.py -q` (no cluster; about 15 s).
Tests that must see a state *before* the controllers act use `Cluster(gc_delay=None)` and call
`run_controllers()` themselves, so nothing depends on timing.
"""

from __future__ import annotations

import copy
import json
import urllib.request
from typing import Any

import pytest

import kubeemu
import kubeemu_cel
from test_kubeemu import PTJS, RAYJOB, configmap, http, owned_by, read_watch


@pytest.fixture
def k8s():
    with kubeemu.Cluster() as cluster:
        yield cluster


@pytest.fixture
def paused():
    """A cluster whose garbage collector and namespace controller run only when the test says so."""
    with kubeemu.Cluster(gc_delay=None, namespaces=("default", "ml")) as cluster:
        yield cluster


def invalid(call: Any) -> dict[str, str]:
    """The 422 causes of `call()`, by field."""
    with pytest.raises(kubeemu.ApiError) as info:
        call()
    assert info.value.status == 422 and info.value.reason == "Invalid", info.value
    return {c["field"]: c["message"] for c in info.value.details["causes"]}


# --- CEL rules ---------------------------------------------------------------------------------------

def test_transition_rules_refuse_changing_immutable_spec_fields(k8s, job_dict):
    k8s.create(job_dict)
    code, status = http(k8s, "PATCH", f"{PTJS}/tiny-sft", {"spec": {"training": {"maxSteps": 5}}},
                        "application/merge-patch+json")
    assert (code, status["reason"]) == (422, "Invalid")
    assert status["details"]["causes"] == [{"reason": "FieldValueInvalid", "field": "spec.training", "message":
                                            'Invalid value: "object": spec.training cannot change after creation; '
                                            "create a new PostTrainingJob"}]
    assert status["message"] == ('PostTrainingJob.posttrain.dev "tiny-sft" is invalid: spec.training: Invalid value: '
                                 '"object": spec.training cannot change after creation; create a new PostTrainingJob')
    # has(self.adapter) == has(oldSelf.adapter), on spec: adding what was absent is a change too.
    assert invalid(lambda: k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"spec": {"adapter": {"type": "lora"}}})) == {
        "spec": 'Invalid value: "object": spec.adapter cannot be added or removed after creation'}
    # Mutable fields change; the unchanged immutable ones are not judged again (ratcheting).
    assert k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"spec": {"suspend": True}})["spec"]["suspend"] is True
    assert k8s.get(*kubeemu.PTJ, "default", "tiny-sft")["spec"]["training"]["maxSteps"] == 4


def test_kuberay_rules_run_per_list_item_and_on_create(k8s):
    bad = copy.deepcopy(RAYJOB)
    bad["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"}, "deletionRules": [
        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}},
        {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}]}
    bad["spec"]["managedBy"] = "someone"
    assert invalid(lambda: k8s.create(bad)) == {
        "spec.deletionStrategy": 'Invalid value: "object": legacy policies (onSuccess/onFailure) and deletionRules '
                                 "cannot be used together within the same deletionStrategy",
        "spec.deletionStrategy.deletionRules[1].condition": 'Invalid value: "object": JobStatus and '
                                                            "JobDeploymentStatus cannot be used together within the "
                                                            "same deletion condition.",
        "spec.managedBy": 'Invalid value: "string": the managedBy field value must be either '
                          "'ray.io/kuberay-operator' or 'kueue.x-k8s.io/multikueue'"}
    good = copy.deepcopy(RAYJOB)
    good["spec"]["managedBy"] = "ray.io/kuberay-operator"
    k8s.create(good)
    assert invalid(lambda: k8s.patch(*kubeemu.RAYJOB, "default", "rj", {"spec": {"managedBy": "kueue.x-k8s.io/multikueue"}})) \
        == {"spec.managedBy": 'Invalid value: "string": the managedBy field is immutable'}


WIDGETS = {
    "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {"group": "example.com", "scope": "Namespaced",
             "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
             "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                 "type": "object", "properties": {"spec": {
                     "type": "object",
                     "x-kubernetes-validations": [
                         {"rule": "self.min <= self.max", "messageExpression": "'min ' + string(self.min) + ' > max'"},
                         {"rule": "!has(self.legacy)", "fieldPath": ".legacy", "reason": "FieldValueForbidden",
                          "message": "legacy is gone"}],
                     "properties": {
                         "min": {"type": "integer"}, "max": {"type": "integer"}, "legacy": {"type": "string"},
                         "ratio": {"type": "number", "x-kubernetes-validations": [{"rule": "self < 1.0"}]},
                         "ports": {"type": "array", "x-kubernetes-list-type": "map",
                                   "x-kubernetes-list-map-keys": ["name"],
                                   "items": {"type": "object", "required": ["name"], "properties": {
                                       "name": {"type": "string"}, "port": {"type": "integer"}},
                                       "x-kubernetes-validations": [
                                           {"rule": "self.port > 1024", "message": "unprivileged ports only"},
                                           {"rule": "self.port == oldSelf.port", "message": "a port is fixed"}]}},
                         "env": {"type": "object", "additionalProperties": {
                             "type": "string", "x-kubernetes-validations": [{"rule": "self != ''"}]}}}}}}}}]},
}


def widget(name: str = "w", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": name},
            "spec": {"min": 1, "max": 2, **spec}}


def test_a_crds_rules_compile_once_and_follow_the_servers_semantics(k8s, monkeypatch):
    compiled: list[str] = []
    real = kubeemu_cel._program
    monkeypatch.setattr(kubeemu_cel, "_program", lambda text, where: compiled.append(text) or real(text, where))
    k8s.create(WIDGETS)  # a new CRD is checked (its rules compile) and served
    assert len(compiled) == 7  # six rules and one messageExpression
    assert invalid(lambda: k8s.create(widget(min=3, max=2, legacy="x", ratio=1, env={"A": ""},
                                             ports=[{"name": "http", "port": 80}]))) == {
        "spec": 'Invalid value: "object": min 3 > max',  # messageExpression
        "spec.legacy": "Forbidden: legacy is gone",  # fieldPath and reason
        "spec.ratio": 'Invalid value: "number": failed rule: self < 1.0',  # an integer bound as a double
        "spec.env[A]": 'Invalid value: "string": failed rule: self != \'\'',  # per map value
        "spec.ports[0]": 'Invalid value: "object": unprivileged ports only'}  # per list item
    k8s.create(widget(ports=[{"name": "http", "port": 8080}]))
    # A list-type map correlates items by key: the transition rule sees the old item of the same name.
    assert invalid(lambda: k8s.patch("example.com/v1", "widgets", "default", "w", {"spec": {"ports": [
        {"name": "metrics", "port": 9090}, {"name": "http", "port": 8081}]}})) == {
        "spec.ports[1]": 'Invalid value: "object": a port is fixed'}
    k8s.patch("example.com/v1", "widgets", "default", "w", {"spec": {"ports": [
        {"name": "metrics", "port": 9090}, {"name": "http", "port": 8080}]}})
    assert len(compiled) == 7, "rules are compiled per Kind, not per request"

    broken = copy.deepcopy(WIDGETS)
    broken["metadata"]["name"] = "gadgets.example.com"
    broken["spec"]["names"] = {"plural": "gadgets", "kind": "Gadget"}
    broken["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"] = [
        {"rule": "self.min <="}]
    causes = invalid(lambda: k8s.create(broken))
    (field,) = causes
    assert field == ("spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule")
    assert "compilation failed" in causes[field]


# --- CRD replacement and defaults on read -------------------------------------------------------------

def newer_ptj_crd() -> dict[str, Any]:
    """Our CRD plus `spec.queue` (default "batch", a CEL rule) and a Queue printer column."""
    crd = copy.deepcopy(dict(kubeemu.load_crd(kubeemu.PTJ_CRD)))
    version = crd["spec"]["versions"][0]
    version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["queue"] = {
        "type": "string", "default": "batch",
        "x-kubernetes-validations": [{"rule": "self in ['batch', 'interactive']", "message": "unknown queue"}]}
    version["additionalPrinterColumns"].append({"name": "Queue", "type": "string", "jsonPath": ".spec.queue"})
    return crd


def test_a_replaced_crd_is_served_at_once_and_defaults_what_was_stored_before(k8s, job_dict):
    created = k8s.create(job_dict)
    since = created["metadata"]["resourceVersion"]
    k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"spec": {"suspend": True}})
    k8s.apply(newer_ptj_crd())  # as `kubectl apply --server-side -f new-crd.yaml`
    assert k8s.get(*kubeemu.PTJ, "default", "tiny-sft")["spec"]["queue"] == "batch"
    assert [j["spec"]["queue"] for j in k8s.list(*kubeemu.PTJ, "default")] == ["batch"]
    assert http(k8s, "GET", PTJS)[1]["items"][0]["spec"]["queue"] == "batch"
    raw = k8s.emulator.objects[kubeemu.PTJ[0] + "/" + kubeemu.PTJ[1], "default", "tiny-sft"]
    assert "queue" not in raw["spec"]  # stored as written: the default is applied on read
    # Watches replaying older events, and fresh ones, show the objects as read now.
    replayed = read_watch(k8s, f"{PTJS}?resourceVersion={since}", 1)
    with urllib.request.urlopen(f"{k8s.url}{PTJS}?watch=true&timeoutSeconds=1") as stream:
        fresh = [json.loads(line) for line in stream.read().splitlines()]
    assert replayed[0][:2] == ("MODIFIED", "tiny-sft") and fresh[0]["object"]["spec"]["queue"] == "batch"

    kind = k8s.kind(*kubeemu.PTJ)
    assert [c["name"] for c in kind.printer_columns][-1] == "Queue"
    bad = copy.deepcopy(job_dict)
    bad["metadata"]["name"] = "bad-queue"
    bad["spec"]["queue"] = "gpu"
    assert invalid(lambda: k8s.create(bad)) == {"spec.queue": 'Invalid value: "string": unknown queue'}
    crd = k8s.get("apiextensions.k8s.io/v1", "customresourcedefinitions", None, "posttrainingjobs.posttrain.dev")
    assert {c["type"]: c["status"] for c in crd["status"]["conditions"]} == {"NamesAccepted": "True",
                                                                             "Established": "True"}

    k8s.delete("apiextensions.k8s.io/v1", "customresourcedefinitions", None, "posttrainingjobs.posttrain.dev")
    assert http(k8s, "GET", PTJS)[0] == 404  # no longer served, and its objects are gone
    assert not [key for key in k8s.emulator.objects if key[0] == kubeemu.PTJ[0] + "/" + kubeemu.PTJ[1]
                and not k8s.emulator.objects[key].deleted]


def test_watch_events_carry_the_new_default_and_a_crd_change_ends_open_watches(k8s, job_dict):
    k8s.create(job_dict)
    with urllib.request.urlopen(f"{k8s.url}{PTJS}?watch=true&timeoutSeconds=30", timeout=60) as stream:
        assert json.loads(stream.readline())["type"] == "ADDED"
        k8s.apply(newer_ptj_crd())
        assert stream.readline() == b""  # ended by the server, long before its timeout: the client re-watches
    events = read_watch(k8s, f"{PTJS}?resourceVersion=0", 2, changes=lambda: (
        k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"spec": {"suspend": True}})))
    assert [e[:2] for e in events] == [("ADDED", "tiny-sft"), ("MODIFIED", "tiny-sft")]
    with urllib.request.urlopen(
            f"{k8s.url}{PTJS}?watch=true&timeoutSeconds=1&resourceVersion={events[0][2]}") as stream:
        (modified,) = [json.loads(line) for line in stream.read().splitlines()]
    assert modified["object"]["spec"]["queue"] == "batch" and modified["object"]["spec"]["suspend"] is True


# --- garbage collection ---------------------------------------------------------------------------------

def test_garbage_collection_runs_after_the_delete_not_inside_it(paused, job_dict):
    owner = paused.create(job_dict)
    child = paused.create(owned_by(owner, configmap("child")))
    paused.create(owned_by(child, configmap("grandchild")))
    paused.delete(*kubeemu.PTJ, "default", "tiny-sft")
    assert paused.find(*kubeemu.CONFIGMAP, "default", "child") is not None  # the delete call returned first
    paused.run_controllers()
    assert paused.find(*kubeemu.CONFIGMAP, "default", "child") is None
    assert paused.find(*kubeemu.CONFIGMAP, "default", "grandchild") is not None  # one level per pass
    paused.run_controllers()
    assert paused.find(*kubeemu.CONFIGMAP, "default", "grandchild") is None


def test_foreground_and_orphan_deletion(paused, job_dict):
    owner = paused.create(job_dict)
    held = owned_by(owner, configmap("held"))
    held["metadata"]["finalizers"] = ["example.com/hold"]
    paused.create(held)
    paused.create(owned_by(owner, configmap("plain")))
    paused.delete(*kubeemu.PTJ, "default", "tiny-sft", propagation="Foreground")
    marked = paused.get(*kubeemu.PTJ, "default", "tiny-sft")
    assert marked["metadata"]["finalizers"] == ["foregroundDeletion"] and marked["metadata"]["deletionTimestamp"]
    paused.run_controllers()
    assert paused.find(*kubeemu.CONFIGMAP, "default", "plain") is None
    assert paused.get(*kubeemu.CONFIGMAP, "default", "held")["metadata"]["deletionTimestamp"]
    assert paused.find(*kubeemu.PTJ, "default", "tiny-sft") is not None  # waits for its dependents
    paused.patch(*kubeemu.CONFIGMAP, "default", "held", {"metadata": {"finalizers": None}})
    paused.run_controllers()
    assert paused.find(*kubeemu.PTJ, "default", "tiny-sft") is None

    owner = paused.create(job_dict)
    paused.create(owned_by(owner, configmap("kept")))
    paused.delete(*kubeemu.PTJ, "default", "tiny-sft", propagation="Orphan")
    assert paused.get(*kubeemu.PTJ, "default", "tiny-sft")["metadata"]["finalizers"] == ["orphan"]
    paused.run_controllers()
    assert paused.find(*kubeemu.PTJ, "default", "tiny-sft") is None
    assert "ownerReferences" not in paused.get(*kubeemu.CONFIGMAP, "default", "kept")["metadata"]


# --- namespace termination ------------------------------------------------------------------------------

def test_a_deleted_namespace_terminates_its_contents_then_disappears(paused, job_dict):
    job_dict["metadata"]["finalizers"] = ["posttrain.dev/finalizer"]
    paused.create(job_dict, "ml")
    paused.create(configmap("cm"), "ml")
    code, ns = http(paused, "DELETE", "/api/v1/namespaces/ml")
    assert code == 200 and ns["status"]["phase"] == "Terminating" and ns["metadata"]["deletionTimestamp"]
    code, refused = http(paused, "POST", "/api/v1/namespaces/ml/configmaps", configmap("late"))
    assert (code, refused["reason"]) == (403, "Forbidden")
    assert refused["message"] == ('configmaps "late" is forbidden: unable to create new content in namespace ml '
                                  "because it is being terminated")
    assert paused.find(*kubeemu.CONFIGMAP, "ml", "cm") is not None  # the namespace controller has not run yet

    paused.run_controllers()
    assert paused.find(*kubeemu.CONFIGMAP, "ml", "cm") is None
    assert paused.get(*kubeemu.PTJ, "ml", "tiny-sft")["metadata"]["deletionTimestamp"]  # held by its finalizer
    ns = paused.get("v1", "namespaces", None, "ml")
    remaining = {c["type"]: c for c in ns["status"]["conditions"]}["NamespaceFinalizersRemaining"]
    assert ns["status"]["phase"] == "Terminating" and remaining["message"] == (
        "Some content in the namespace has finalizers remaining: posttrain.dev/finalizer in 1 resource instances")

    paused.patch(*kubeemu.PTJ, "ml", "tiny-sft", {"metadata": {"finalizers": None}})
    paused.run_controllers()
    assert paused.find("v1", "namespaces", None, "ml") is None
    assert http(paused, "DELETE", "/api/v1/namespaces/default")[1]["message"] == \
        'namespaces "default" is forbidden: this namespace may not be deleted'


def test_the_operator_keeps_serving_jobs_across_a_crd_upgrade():
    """Jobs stored under the old CRD, a newer CRD applied while the operator runs: it re-watches and reads on."""
    import opcluster
    from test_operator import CLAIMS, job, operator, phase_is, rayjobs

    with kubeemu.Cluster() as k8s, operator(k8s):
        for claim in CLAIMS:  # the job's shared claims, as the operator checks before a run
            opcluster.claim(k8s, claim)
        k8s.create(job())
        k8s.wait_for(lambda: rayjobs(k8s), timeout=30, what="RayJob r0")
        k8s.wait_for(phase_is(k8s, "Provisioning"), timeout=30)
        newer = copy.deepcopy(dict(kubeemu.load_crd(kubeemu.PTJ_CRD)))
        spec = newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        spec["properties"]["activeDeadlineSeconds"]["default"] = 86400  # a default the older CRD lacked
        def watches() -> int:
            return sum(e["verb"] == "watch" and e["resource"] == "posttrainingjobs" for e in k8s.audit)

        before = watches()
        k8s.apply(newer)
        assert k8s.get(*kubeemu.PTJ, "default", "tune")["spec"]["activeDeadlineSeconds"] == 86400
        k8s.wait_for(lambda: watches() > before, timeout=30, what="kopf watching PostTrainingJobs again")
        k8s.set_rayjob_status("default", "tune-r0", deployment="Running", job="RUNNING")
        k8s.wait_for(phase_is(k8s, "Running"), timeout=30, what="the operator, after its watch was ended")
        assert len(rayjobs(k8s)) == 1
