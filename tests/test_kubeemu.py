"""The API emulator the operator tests run against: its fidelity, and a real kopf operator on it.

Run: `.venv/bin/python -m pytest tests/test_kubeemu.py -q` (no cluster; about 15 s).
Over HTTP where the wire format matters (status codes, Status bodies, list kinds, watch
streams), through `Cluster`'s direct methods elsewhere.
"""

from __future__ import annotations

import copy
import json
import re
import textwrap
import urllib.error
import urllib.request
from typing import Any

import kmock
import kubernetes
import pytest

import kubeemu

RAYJOB = {
    "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "rj"},
    "spec": {"entrypoint": "python -c 'print(1)'", "rayClusterSpec": {"headGroupSpec": {"template": {"spec": {
        "containers": [{"name": "ray-head", "image": "rayproject/ray:2.46.0", "ports": [{"containerPort": 6379}]}]}}}}},
}


@pytest.fixture
def k8s():
    with kubeemu.Cluster() as cluster:
        yield cluster


@pytest.fixture
def job(job_dict) -> dict[str, Any]:
    """conftest's minimal valid SFT PostTrainingJob ("tiny-sft"), a fresh copy per test."""
    return job_dict


def http(k8s: kubeemu.Cluster, method: str, path: str, body: Any = None,
         content_type: str = "application/json") -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(k8s.url + path, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as rsp:
            return rsp.status, json.loads(rsp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def configmap(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": labels}, "data": {"k": "v"}}


PTJS = "/apis/posttrain.dev/v1alpha1/namespaces/default/posttrainingjobs"


# --- discovery and server-managed metadata ---------------------------------------------------------

def test_discovery_lists_every_served_kind_with_scope_and_subresources(k8s):
    _, core = http(k8s, "GET", "/api/v1")
    assert core["groupVersion"] == "v1"
    assert {r["name"]: r["namespaced"] for r in core["resources"]} == {
        "namespaces": False, "configmaps": True, "events": True, "namespaces/status": False, "serviceaccounts": True,
        "pods": True, "pods/status": True, "persistentvolumeclaims": True, "persistentvolumeclaims/status": True,
        "secrets": True}
    _, groups = http(k8s, "GET", "/apis")
    assert {g["preferredVersion"]["groupVersion"] for g in groups["groups"]} == {
        "posttrain.dev/v1alpha1", "ray.io/v1", "events.k8s.io/v1", "coordination.k8s.io/v1", "apiextensions.k8s.io/v1",
        "rbac.authorization.k8s.io/v1", "networking.k8s.io/v1"}
    _, ptj = http(k8s, "GET", "/apis/posttrain.dev/v1alpha1")
    assert {(r["name"], r["kind"], r["namespaced"]) for r in ptj["resources"]} == {
        ("posttrainingjobs", "PostTrainingJob", True), ("posttrainingjobs/status", "PostTrainingJob", True)}
    main, status = ptj["resources"]
    assert {"list", "watch", "patch", "create", "delete"} <= set(main["verbs"]) and main["shortNames"] == ["ptj"]
    # A subresource as the real server lists it: no names a short name or category could resolve to.
    assert status == {"name": "posttrainingjobs/status", "singularName": "", "namespaced": True,
                      "kind": "PostTrainingJob", "verbs": ["get", "patch", "update"]}
    crds = k8s.list("apiextensions.k8s.io/v1", "customresourcedefinitions")
    assert {c["metadata"]["name"] for c in crds} == {
        "posttrainingjobs.posttrain.dev", "rayjobs.ray.io", "rayclusters.ray.io"}


def test_create_sets_uid_resource_version_generation_and_timestamp(k8s, job):
    code, created = http(k8s, "POST", PTJS, job)
    assert code == 201
    meta = created["metadata"]
    assert re.fullmatch(r"[0-9a-f-]{36}", meta["uid"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["creationTimestamp"])
    assert meta["generation"] == 1 and meta["namespace"] == "default"
    cm = k8s.create(configmap("cm"))
    assert "generation" not in cm["metadata"]  # built-in kinds without a spec keep no generation
    assert int(cm["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])  # one counter, cluster-wide
    assert cm["metadata"]["uid"] != meta["uid"]
    named = k8s.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"generateName": "cm-"}})
    assert re.fullmatch(r"cm-[a-z0-9]{5}", named["metadata"]["name"])


def test_generation_follows_spec_only_and_no_op_writes_change_nothing(k8s, job):
    created = k8s.create(job)
    rv = int(created["metadata"]["resourceVersion"])
    after_spec = k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"spec": {"maxRestarts": 8}})
    assert after_spec["metadata"]["generation"] == 2
    assert int(after_spec["metadata"]["resourceVersion"]) > rv
    after_labels = k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"metadata": {"labels": {"team": "a"}}})
    after_status = k8s.patch_status(*kubeemu.PTJ, "default", "tiny-sft", {"phase": "Running"})
    assert after_labels["metadata"]["generation"] == after_status["metadata"]["generation"] == 2
    assert after_status["metadata"]["resourceVersion"] != after_labels["metadata"]["resourceVersion"]
    same = k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"metadata": {"labels": {"team": "a"}}})
    assert same["metadata"]["resourceVersion"] == after_status["metadata"]["resourceVersion"]
    history = k8s.emulator.objects[kubeemu.PTJ[0] + "/" + kubeemu.PTJ[1], "default", "tiny-sft"].history
    assert len(history) == 4  # kmock's history: create, spec, labels, status; the no-op added nothing


def test_status_subresource_splits_spec_writes_from_status_writes(k8s, job):
    job["status"] = {"phase": "Succeeded"}
    created = k8s.create(job)
    assert "status" not in created  # create ignores status when there is a status subresource
    code, body = http(k8s, "PATCH", f"{PTJS}/tiny-sft", {"spec": {"suspend": True}, "status": {"phase": "Failed"}},
                      "application/merge-patch+json")
    assert code == 200 and body["spec"]["suspend"] is True and "status" not in body
    code, body = http(k8s, "PATCH", f"{PTJS}/tiny-sft/status", {"spec": {"suspend": False}, "status": {"phase": "Running"}},
                      "application/merge-patch+json")
    assert code == 200 and body["spec"]["suspend"] is True and body["status"]["phase"] == "Running"
    assert body["status"]["restarts"] == 0  # the CRD's default, applied by the server
    k8s.create(configmap("cm"))
    code, body = http(k8s, "PATCH", "/api/v1/namespaces/default/configmaps/cm/status", {"data": {}},
                      "application/merge-patch+json")
    assert code == 404 and body["kind"] == "Status"


# --- admission ---------------------------------------------------------------------------------------

def test_bad_posttrainingjob_is_422_invalid_naming_each_field(k8s, job):
    job["spec"]["training"]["maxSteps"] = 0
    job["spec"]["algorithm"] = "rlhf"
    del job["spec"]["model"]
    code, status = http(k8s, "POST", PTJS, job)
    assert code == 422
    assert (status["kind"], status["status"], status["reason"], status["code"]) == ("Status", "Failure", "Invalid", 422)
    assert status["details"]["name"] == "tiny-sft" and status["details"]["kind"] == "PostTrainingJob"
    causes = {c["field"]: c["reason"] for c in status["details"]["causes"]}
    assert causes == {"spec.training.maxSteps": "FieldValueInvalid", "spec.algorithm": "FieldValueNotSupported",
                      "spec.model": "FieldValueRequired"}
    assert status["message"].startswith('PostTrainingJob.posttrain.dev "tiny-sft" is invalid: [')
    assert k8s.find(*kubeemu.PTJ, "default", "tiny-sft") is None


def test_rayjobs_follow_kuberays_crd_defaults_and_422(k8s):
    created = k8s.create(RAYJOB)
    assert created["spec"]["submissionMode"] == "K8sJobMode"  # KubeRay's defaults, as a real server adds them
    container = created["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert container["ports"] == [{"containerPort": 6379, "protocol": "TCP"}]
    bad = copy.deepcopy(RAYJOB)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"
    del bad["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["name"]
    code, status = http(k8s, "POST", "/apis/ray.io/v1/namespaces/default/rayjobs", bad)
    assert code == 422 and status["reason"] == "Invalid"
    assert {c["field"] for c in status["details"]["causes"]} == {
        "spec.shutdownAfterJobFinishes", "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].name"}


def test_unknown_fields_are_pruned_and_metadata_is_validated(k8s, job):
    job["spec"]["bogus"] = 1
    job["spec"]["training"]["typo"] = 2
    created = k8s.create(job)
    assert "bogus" not in created["spec"] and "typo" not in created["spec"]["training"]
    assert created["spec"]["training"]["lrScheduler"] == "linear"  # defaulted
    status = k8s.patch_status(*kubeemu.PTJ, "default", "tiny-sft", {"phase": "Running", "kopf": {"progress": {}}})
    assert status["status"] == {"phase": "Running", "restarts": 0}  # kopf's default status storage would vanish
    with pytest.raises(kubeemu.ApiError) as bad_name:
        k8s.create(configmap("Not_DNS"))
    with pytest.raises(kubeemu.ApiError) as bad_label:
        k8s.create(configmap("cm", app="x" * 64))
    assert bad_name.value.status == bad_label.value.status == 422
    assert [c["field"] for c in bad_label.value.details["causes"]] == ["metadata.labels"]


# --- errors ------------------------------------------------------------------------------------------

def test_conflicts_not_found_and_patch_errors(k8s, job):
    assert http(k8s, "POST", PTJS, job)[0] == 201
    code, status = http(k8s, "POST", PTJS, job)
    assert (code, status["reason"], status["details"]["name"]) == (409, "AlreadyExists", "tiny-sft")
    code, status = http(k8s, "PATCH", f"{PTJS}/tiny-sft", {"metadata": {"resourceVersion": "1"}, "spec": {"suspend": True}},
                        "application/merge-patch+json")
    assert (code, status["reason"]) == (409, "Conflict")
    code, status = http(k8s, "GET", f"{PTJS}/nope")
    assert (code, status["reason"]) == (404, "NotFound")
    assert status["message"] == 'posttrainingjobs.posttrain.dev "nope" not found'
    code, status = http(k8s, "POST", "/api/v1/namespaces/missing/configmaps", configmap("cm"))
    assert (code, status["message"]) == (404, 'namespaces "missing" not found')
    test_fails = [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"},
                  {"op": "add", "path": "/metadata/finalizers", "value": ["x.dev/f"]}]
    assert http(k8s, "PATCH", f"{PTJS}/tiny-sft", test_fails, "application/json-patch+json")[0] == 422
    assert http(k8s, "PATCH", f"{PTJS}/tiny-sft", {"spec": {}}, "application/strategic-merge-patch+json")[0] == 415
    assert http(k8s, "GET", "/apis/ray.io/v1/namespaces/default/nothings")[0] == 404


# --- lists, selectors, watches -------------------------------------------------------------------------

def test_lists_carry_kind_and_filter_by_label_selector(k8s):
    k8s.create(configmap("a", app="x", tier="web"))
    k8s.create(configmap("b", app="y"))
    k8s.create(configmap("c"))
    _, listed = http(k8s, "GET", "/api/v1/namespaces/default/configmaps")
    assert (listed["kind"], listed["apiVersion"]) == ("ConfigMapList", "v1")
    assert int(listed["metadata"]["resourceVersion"]) >= 5
    assert "kind" not in listed["items"][0]  # built-in list items carry no kind; custom ones do

    def names(selector: str) -> list[str]:
        return [o["metadata"]["name"] for o in k8s.list(*kubeemu.CONFIGMAP, "default", label_selector=selector)]

    assert names("app=x") == names("app==x") == ["a"]
    assert names("app!=x") == ["b", "c"]
    assert names("app in (x, y)") == ["a", "b"]
    assert names("app notin (x)") == ["b", "c"]
    assert names("app") == ["a", "b"]
    assert names("!app") == ["c"]
    assert names("app in (x,y),!tier") == ["b"]
    assert http(k8s, "GET", "/api/v1/namespaces/default/configmaps?labelSelector=app%20in%20x")[0] == 400
    k8s.create(RAYJOB)
    _, rayjobs = http(k8s, "GET", "/apis/ray.io/v1/rayjobs")  # all namespaces
    assert rayjobs["kind"] == "RayJobList" and rayjobs["items"][0]["kind"] == "RayJob"


def read_watch(k8s: kubeemu.Cluster, path: str, count: int, *, changes=lambda: None) -> list[tuple[str, str, str]]:
    """Open a watch, make `changes` while it is open, and read `count` events from it."""
    with urllib.request.urlopen(f"{k8s.url}{path}&watch=true&timeoutSeconds=5", timeout=10) as stream:
        changes()
        events = [json.loads(stream.readline()) for _ in range(count)]
    return [(e["type"], e["object"]["metadata"]["name"], e["object"]["metadata"]["resourceVersion"]) for e in events]


def test_watch_replays_from_resource_version_and_streams_live_changes(k8s):
    _, listed = http(k8s, "GET", "/api/v1/namespaces/default/configmaps")
    since = listed["metadata"]["resourceVersion"]
    k8s.create(configmap("a"))
    k8s.patch(*kubeemu.CONFIGMAP, "default", "a", {"data": {"k": "w"}})
    k8s.delete(*kubeemu.CONFIGMAP, "default", "a")
    replay = read_watch(k8s, f"/api/v1/namespaces/default/configmaps?resourceVersion={since}", 3)
    assert [(t, n) for t, n, _ in replay] == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert [int(rv) for _, _, rv in replay] == sorted(int(rv) for _, _, rv in replay)

    k8s.create(configmap("b", app="x"))
    live = read_watch(k8s, "/api/v1/namespaces/default/configmaps?labelSelector=app%3Dx", 3,
                      changes=lambda: (k8s.create(configmap("c", app="x")), k8s.create(configmap("d", app="y")),
                                       k8s.patch(*kubeemu.CONFIGMAP, "default", "b", {"metadata": {"labels": None}})))
    # Current state first (no resourceVersion), then changes; "b" leaving the selection is a DELETED.
    assert [(t, n) for t, n, _ in live] == [("ADDED", "b"), ("ADDED", "c"), ("DELETED", "b")]
    with urllib.request.urlopen(f"{k8s.url}/api/v1/namespaces/default/configmaps?watch=true&timeoutSeconds=1") as stream:
        assert len(stream.read().splitlines()) == 3  # b, c, d as they are now; then the server ends it


# --- deletion: finalizers and garbage collection ---------------------------------------------------------

def owned_by(owner: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    obj["metadata"]["ownerReferences"] = [{"apiVersion": owner["apiVersion"], "kind": owner["kind"],
                                           "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
                                           "controller": True, "blockOwnerDeletion": True}]
    return obj


def test_deleting_an_owner_deletes_its_dependents(k8s, job):
    owner = k8s.create(job)
    k8s.create(owned_by(owner, configmap("cm")))
    k8s.create(owned_by(owner, RAYJOB))
    other = k8s.create(configmap("other-owner"))
    shared = owned_by(owner, configmap("shared"))
    shared["metadata"]["ownerReferences"] += owned_by(other, configmap("x"))["metadata"]["ownerReferences"]
    k8s.create(shared)
    k8s.delete(*kubeemu.PTJ, "default", "tiny-sft")
    k8s.wait_for(lambda: k8s.find(*kubeemu.CONFIGMAP, "default", "cm") is None, what="the garbage collector")
    k8s.wait_for(lambda: k8s.find(*kubeemu.RAYJOB, "default", "rj") is None, what="the garbage collector")
    assert k8s.find(*kubeemu.CONFIGMAP, "default", "shared") is not None  # another owner still exists

    owner = k8s.create(job)
    k8s.create(owned_by(owner, configmap("kept")))
    k8s.delete(*kubeemu.PTJ, "default", "tiny-sft", propagation="Orphan")
    k8s.wait_for(lambda: k8s.find(*kubeemu.PTJ, "default", "tiny-sft") is None, what="the orphan finalizer done")
    assert "ownerReferences" not in k8s.get(*kubeemu.CONFIGMAP, "default", "kept")["metadata"]


def test_finalizers_hold_deletion_until_removed(k8s, job):
    job["metadata"]["finalizers"] = ["posttrain.dev/finalizer"]
    k8s.create(job)
    k8s.create(owned_by(k8s.get(*kubeemu.PTJ, "default", "tiny-sft"), configmap("cm")))
    code, held = http(k8s, "DELETE", f"{PTJS}/tiny-sft")
    assert code == 200 and held["metadata"]["deletionTimestamp"]
    assert k8s.find(*kubeemu.CONFIGMAP, "default", "cm") is not None
    with pytest.raises(kubeemu.ApiError) as more:
        k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"metadata": {"finalizers": ["posttrain.dev/finalizer", "b.dev/x"]}})
    assert more.value.status == 422
    k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", [{"op": "remove", "path": "/metadata/finalizers"}],
              patch_type=kubeemu.JSON_PATCH)
    assert k8s.find(*kubeemu.PTJ, "default", "tiny-sft") is None
    k8s.wait_for(lambda: k8s.find(*kubeemu.CONFIGMAP, "default", "cm") is None, what="the garbage collector")


def test_events_are_accepted_with_generated_names(k8s, job):
    owner = k8s.create(job)
    event = {"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": "kopf-event-"}, "reason": "Built",
             "type": "Normal", "message": "m", "involvedObject": {"kind": "PostTrainingJob", "name": "tiny-sft",
                                                                "uid": owner["metadata"]["uid"]}}
    assert http(k8s, "POST", "/api/v1/namespaces/default/events", event)[0] == 201
    assert http(k8s, "POST", "/api/v1/namespaces/default/events", event)[0] == 201
    assert http(k8s, "POST", "/apis/events.k8s.io/v1/namespaces/default/events",
                dict(event, apiVersion="events.k8s.io/v1"))[0] == 201
    assert len(k8s.events("default", involved=owner, reason="Built")) == 2


# --- clients: the kubernetes library, and a real kopf operator ----------------------------------------

def test_kubernetes_client_works_through_the_kubeconfig(k8s, job):
    api = k8s.api_client()
    core, custom = kubernetes.client.CoreV1Api(api), kubernetes.client.CustomObjectsApi(api)
    core.create_namespaced_config_map("default", configmap("cm"))
    core.patch_namespaced_config_map("cm", "default", {"data": {"more": "x"}})  # strategic merge, as a merge
    cm = core.read_namespaced_config_map("cm", "default")
    cm.data["k"] = "replaced"
    assert core.replace_namespaced_config_map("cm", "default", cm).data == {"k": "replaced", "more": "x"}
    custom.create_namespaced_custom_object("posttrain.dev", "v1alpha1", "default", "posttrainingjobs", job)
    patched = custom.patch_namespaced_custom_object_status("posttrain.dev", "v1alpha1", "default", "posttrainingjobs",
                                                           "tiny-sft", {"status": {"phase": "Pending"}})
    assert patched["status"]["phase"] == "Pending"
    with pytest.raises(kubernetes.client.ApiException) as conflict:
        custom.create_namespaced_custom_object("posttrain.dev", "v1alpha1", "default", "posttrainingjobs", job)
    assert conflict.value.status == 409


def test_namespaces_leases_and_replace_with_resource_version(k8s):
    code, ns = http(k8s, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                         "metadata": {"name": "team"}})
    assert code == 201 and ns["status"]["phase"] == "Active" and "namespace" not in ns["metadata"]
    assert http(k8s, "GET", "/api/v1/namespaces/team")[1]["metadata"]["uid"] == ns["metadata"]["uid"]
    _, listed = http(k8s, "GET", "/api/v1/namespaces")
    assert [n["metadata"]["name"] for n in listed["items"]] == ["default", "team"]
    leases = kubernetes.client.CoordinationV1Api(k8s.api_client())  # as operator/leader.py uses it
    body = kubernetes.client.V1Lease(metadata=kubernetes.client.V1ObjectMeta(name="leader"),
                                     spec=kubernetes.client.V1LeaseSpec(holder_identity="a", lease_duration_seconds=15))
    leases.create_namespaced_lease("team", body)
    first, second = leases.read_namespaced_lease("leader", "team"), leases.read_namespaced_lease("leader", "team")
    first.spec.holder_identity = "a"
    first.spec.lease_duration_seconds = 30
    assert leases.replace_namespaced_lease("leader", "team", first).spec.lease_duration_seconds == 30
    second.spec.holder_identity = "b"
    with pytest.raises(kubernetes.client.ApiException) as stale:  # the resourceVersion guards the race
        leases.replace_namespaced_lease("leader", "team", second)
    assert stale.value.status == 409
    k8s.delete("v1", "namespaces", None, "team")
    k8s.wait_for(lambda: k8s.find("v1", "namespaces", None, "team") is None, what="the namespace controller")
    assert k8s.find("coordination.k8s.io/v1", "leases", "team", "leader") is None  # a namespace takes its contents


def test_kmock_reactions_inject_faults_over_http(k8s):
    k8s.emulator["post", kmock.resource("ray.io", "v1", "rayjobs")] << 500 << {"kind": "Status", "code": 500}
    code, _ = http(k8s, "POST", "/apis/ray.io/v1/namespaces/default/rayjobs", RAYJOB)
    assert code == 500 and k8s.find(*kubeemu.RAYJOB, "default", "rj") is None
    assert http(k8s, "POST", "/api/v1/namespaces/default/configmaps", configmap("cm"))[0] == 201


HANDLERS = '''
    """A throwaway operator: PostTrainingJob -> ConfigMap + RayJob (adopted), RayJob status -> job status."""
    import kopf
    import kubernetes

    PTJ = ("posttrain.dev", "v1alpha1", "posttrainingjobs")
    RAYJOB = {RAYJOB!r}

    @kopf.on.startup()
    def connect(memo, **_):
        memo.api = kubernetes.config.new_client_from_config(config_file=memo.kubeconfig)

    @kopf.on.create(*PTJ)
    def create(body, spec, name, namespace, memo, patch, **_):
        config = {{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {{"name": f"{{name}}-config"}},
                  "data": {{"algorithm": spec["algorithm"]}}}}
        rayjob = dict(RAYJOB, metadata={{"name": f"{{name}}-r0"}})
        kopf.adopt([config, rayjob])
        try:
            kubernetes.client.CoreV1Api(memo.api).create_namespaced_config_map(namespace, config)
            kubernetes.client.CustomObjectsApi(memo.api).create_namespaced_custom_object(
                "ray.io", "v1", namespace, "rayjobs", rayjob)
        except kubernetes.client.ApiException as e:
            if e.status != 409:  # already there: a retry after a partial success
                raise
        kopf.info(body, reason="RayJobCreated", message=f"{{name}}-r0")
        patch.status["phase"] = "Provisioning"

    @kopf.on.update(*PTJ, field="spec")
    def update(meta, patch, **_):
        patch.status["observedGeneration"] = meta["generation"]

    @kopf.on.field("ray.io", "v1", "rayjobs", field="status.jobDeploymentStatus")
    def rayjob_moved(new, meta, namespace, memo, **_):
        phase = {{"Running": "Running", "Complete": "Succeeded", "Failed": "Failed"}}.get(new)
        if phase:
            owner = meta["ownerReferences"][0]["name"]
            kubernetes.client.CustomObjectsApi(memo.api).patch_namespaced_custom_object_status(
                *PTJ[:2], namespace, PTJ[2], owner, {{"status": {{"phase": phase}}}})

    @kopf.on.delete(*PTJ)
    def delete(**_):
        pass
'''


@pytest.mark.parametrize(("given", "namespaces"), [("path", None), ("module", ["default"]), ("registry", None)])
def test_real_kopf_operator_round_trip(k8s, job, tmp_path, monkeypatch, given, namespaces):
    path = tmp_path / f"throwaway_{given}_handlers.py"
    path.write_text(textwrap.dedent(HANDLERS.format(RAYJOB=RAYJOB)))
    monkeypatch.syspath_prepend(str(tmp_path))
    handlers = {"path": path, "module": path.stem, "registry": kubeemu.load_registry(path)}[given]

    def phase() -> str | None:
        return k8s.get(*kubeemu.PTJ, "default", "tiny-sft").get("status", {}).get("phase")

    with kubeemu.Operator(k8s, handlers, namespaces=namespaces, memo={"kubeconfig": str(k8s.kubeconfig_path)}):
        k8s.create(job)
        k8s.wait_for(lambda: phase() == "Provisioning", what="the create handler's status")
        ptj = k8s.get(*kubeemu.PTJ, "default", "tiny-sft")
        assert ptj["metadata"]["finalizers"] == ["posttrain.dev/finalizer"]
        assert {"posttrain.dev/last-handled-configuration", "posttrain.dev/kopf-managed"} <= set(
            ptj["metadata"]["annotations"])
        for kind, child in ((kubeemu.CONFIGMAP, "tiny-sft-config"), (kubeemu.RAYJOB, "tiny-sft-r0")):
            owner = k8s.get(*kind, "default", child)["metadata"]["ownerReferences"][0]
            assert owner["uid"] == ptj["metadata"]["uid"]
        k8s.wait_for(lambda: k8s.events("default", involved=ptj, reason="RayJobCreated"), what="kopf's event")

        k8s.set_rayjob_status("default", "tiny-sft-r0", deployment="Running", job="RUNNING")
        k8s.wait_for(lambda: phase() == "Running", what="RayJob Running -> job Running")
        k8s.patch(*kubeemu.PTJ, "default", "tiny-sft", {"spec": {"maxRestarts": 8}})
        k8s.wait_for(lambda: k8s.get(*kubeemu.PTJ, "default", "tiny-sft")["status"].get("observedGeneration") == 2)
        k8s.set_rayjob_status("default", "tiny-sft-r0", deployment="Complete", job="SUCCEEDED")
        k8s.wait_for(lambda: phase() == "Succeeded", what="RayJob Complete -> job Succeeded")

        k8s.delete(*kubeemu.PTJ, "default", "tiny-sft")  # held by kopf's finalizer until its handler ran
        k8s.wait_for(lambda: k8s.find(*kubeemu.PTJ, "default", "tiny-sft") is None, what="finalizer released")
    k8s.wait_for(lambda: k8s.find(*kubeemu.RAYJOB, "default", "tiny-sft-r0") is None, what="the garbage collector")
    k8s.wait_for(lambda: k8s.find(*kubeemu.CONFIGMAP, "default", "tiny-sft-config") is None, what="the collector")
    status_writes = [r for r in k8s.requests if r.method == "PATCH" and r.subresource == "status"]
    assert status_writes, "status went through the /status subresource"


def test_operator_that_fails_to_start_raises(k8s, tmp_path):
    broken = tmp_path / "broken_handlers.py"
    broken.write_text("import kopf\n\n@kopf.on.startup()\ndef boom(**_):\n    raise kopf.PermanentError('no')\n")
    with pytest.raises(RuntimeError, match="did not get ready"):
        with kubeemu.Operator(k8s, broken):
            pass


def test_a_dependent_created_after_its_owner_is_gone_is_collected(k8s, job):
    owner = k8s.create(job)
    k8s.delete(*kubeemu.PTJ, "default", owner["metadata"]["name"])
    k8s.create(owned_by(owner, configmap("late")))
    k8s.wait_for(lambda: k8s.find(*kubeemu.CONFIGMAP, "default", "late") is None, what="the garbage collector")
