"""Builders: golden manifests from a fixture factory, and every manifest checked against real schemas.

RayJobs validate against KubeRay's published CRD (KUBERAY_CRDS_DIR, default
../shared/kuberay-crds/v1.7.0 next to the repo); core objects (the ConfigMap
and the pods the RayJob's templates become) validate with kubernetes-validate
in strict mode for Kubernetes 1.28 and 1.33.

Regenerate the golden files after an intended change with
`UPDATE_GOLDEN=1 make test PYTEST_ARGS=tests/test_builders.py`.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from posttrain.api.cluster import cluster_errors
from posttrain.api.crd import to_jsonschema
from posttrain.api.load import parse_job
from posttrain.operator import builders, vocab

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
KUBERAY_DIR = Path(os.environ.get("KUBERAY_CRDS_DIR", REPO.parent / "shared" / "kuberay-crds" / "v1.7.0"))
K8S_VERSIONS = ["1.28.0", "1.33.0"]
SETTINGS = builders.BuildSettings(image="ghcr.io/posttrain/runtime:0.1.0")
UID = "5f1c1c1e-0000-4000-8000-000000000001"


def make_job(name: str = "tune", namespace: str = "ml", labels: dict | None = None, **spec: Any):
    """A valid job with the given spec fields replaced (the fixture factory)."""
    doc = {
        "apiVersion": "posttrain.dev/v1alpha1",
        "kind": "PostTrainingJob",
        "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
        "spec": {
            "algorithm": "sft",
            "model": {"source": "pvc://models/smollm2-135m"},
            "data": {"train": [{"source": "pvc://data/train.jsonl"}]},
            "training": {"maxSteps": 100},
            "output": {"uri": "pvc://models/out/tune"},
            "checkpoint": {"uri": "pvc://ckpt/tune", "everySteps": 50},
        },
    }
    doc["spec"].update(copy.deepcopy(spec))
    return parse_job(doc)


GPU_ROLES = {
    "trainer": {
        "replicas": 2, "gpus": 8, "cpus": 64, "memory": "512Gi",
        "nodeSelector": {"pool": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                               "labelSelector": {"matchLabels": {"posttrain.dev/job": "tune"}}}}]}},
        "priorityClassName": "training-high",
    }
}
RL_ROLES = {
    "rollout": {"replicas": 2, "gpus": 1, "nodeSelector": {"pool": "l4"}},
    "learner": {"replicas": 4, "gpus": 1, "nodeSelector": {"pool": "h100"}},
    "reward": {"replicas": 1, "cpus": 4, "memory": "16Gi"},
}

REWARDS = [{"function": "posttrain.jobs.rewards.builtin:exact_answer"}]
GENERATE = {"task": "preference_pairs", "candidates": 4,
            "judge": {"model": "pvc://judges/qwen-7b", "mode": "pairwise", "engine": "vllm"}}
GENERATE_ROLES = {"rollout": {"replicas": 2, "gpus": 1, "nodeSelector": {"pool": "l4"}},
                  "reward": {"gpus": 1, "nodeSelector": {"pool": "a100"}}}

CASES = {
    "sft-cpu": dict(),
    "sft-gpu-nodepool": dict(roles=GPU_ROLES, training={"maxSteps": 100, "globalBatchSize": 16}),
    "sft-suspended-kueue": dict(suspend=True, labels={vocab.KUEUE_QUEUE_LABEL: "team-a"}),
    "grpo-disaggregated": dict(algorithm="grpo", roles=RL_ROLES, rewards=REWARDS),
    "ppo-defaults": dict(algorithm="ppo", rewards=REWARDS),
    "generate-pairs": dict(algorithm="generate", generate=GENERATE, roles=GENERATE_ROLES, training={},
                           checkpoint={}),
    "distill-teacher": dict(algorithm="distill", model={"source": "pvc://models/smollm2-135m", "keepLayers": {"every": 2}},
                            teacher={"source": "pvc://models/smollm2-135m"}, distill={"loss": "jsd", "topK": 8},
                            roles={"trainer": {"gpus": 1, "nodeSelector": {"pool": "l4"}},
                                   "teacher": {"replicas": 2, "gpus": 1, "nodeSelector": {"pool": "a100"}}}),
    # the student on learner actors, sampling on rollout actors, scored by teacher actors: no trainer, no reward
    "distill-on-policy": dict(algorithm="distill", model={"source": "pvc://models/smollm2-135m", "keepLayers": {"every": 2}},
                              teacher={"source": "pvc://models/smollm2-135m"}, distill={"mode": "on_policy"},
                              rl={"groupSize": 4, "maxNewTokens": 128},
                              roles={"learner": {"gpus": 1, "nodeSelector": {"pool": "h100"}},
                                     "rollout": {"gpus": 1, "engine": "vllm", "nodeSelector": {"pool": "l4"}},
                                     "teacher": {"gpus": 1, "nodeSelector": {"pool": "a100"}}}),
    "env-and-identity": dict(
        env=[{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
             {"name": "WANDB_PROJECT", "value": "tuning"}],
        envFrom=[{"secretRef": {"name": "s3-credentials"}}], serviceAccountName="trainer-wi",
        data={"train": [{"source": "pvc://data/train.jsonl"}]}),
}


def build_case(case: str, run: int = 0) -> list[dict[str, Any]]:
    kwargs = copy.deepcopy(CASES[case])
    labels = kwargs.pop("labels", None)
    job = make_job(labels=labels, **kwargs)
    return builders.build_children(job, run=run, owner_uid=UID, settings=SETTINGS)


@pytest.mark.parametrize("case", list(CASES))
def test_golden_manifests(case):
    got = build_case(case)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump_all(got, sort_keys=True, width=120))
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 once"
    assert list(yaml.safe_load_all(path.read_text())) == got, f"{case} differs from {path.name}"


def test_builders_are_deterministic_and_do_not_mutate_the_job():
    job = make_job(roles=GPU_ROLES, training={"maxSteps": 100, "globalBatchSize": 16})
    before = job.model_dump()
    first = builders.build_children(job, run=3, owner_uid=UID, settings=SETTINGS)
    second = builders.build_children(job, run=3, owner_uid=UID, settings=SETTINGS)
    assert first == second and job.model_dump() == before


def _rayjob_validator():
    path = KUBERAY_DIR / "ray.io_rayjobs.yaml"
    if not path.exists():
        pytest.skip(f"KubeRay CRDs not found at {KUBERAY_DIR}; set KUBERAY_CRDS_DIR to a folder holding "
                    "ray.io_rayjobs.yaml from KubeRay's ray-operator/config/crd/bases")
    return _load_validator(path)


@functools.lru_cache(maxsize=None)
def _load_validator(path: Path):
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(to_jsonschema(schema, strict=True))


def every_rayjob():
    for case, run in itertools.product(CASES, (0, 2)):
        yield case, run, next(o for o in build_case(case, run) if o["kind"] == "RayJob")


@pytest.mark.parametrize("case,run,rayjob", list(every_rayjob()), ids=lambda v: v if isinstance(v, (str, int)) else "")
def test_every_rayjob_validates_against_kuberays_crd(case, run, rayjob):
    validator = _rayjob_validator()
    errors = sorted(validator.iter_errors(rayjob), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])


def test_the_kuberay_schema_check_can_fail():
    validator = _rayjob_validator()
    rayjob = next(o for o in build_case("sft-cpu") if o["kind"] == "RayJob")
    rayjob["spec"]["submissionModee"] = "HTTPMode"
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    paths = {".".join(map(str, e.absolute_path)) for e in validator.iter_errors(rayjob)}
    assert "spec" in paths and "spec.rayClusterSpec.workerGroupSpecs.0.replicas" in paths


def core_objects(case: str) -> list[dict[str, Any]]:
    """The ConfigMap, and every pod template of the RayJob as the Pod it becomes."""
    children = build_case(case)
    rayjob = next(o for o in children if o["kind"] == "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [("head", cluster["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"{rayjob['metadata']['name']}-{group}", "namespace": "ml", **t["metadata"]},
             "spec": t["spec"]} for group, t in templates]
    return [o for o in children if o["kind"] != "RayJob"] + pods


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_core_objects_validate_strictly(case, version):
    import kubernetes_validate

    for obj in core_objects(case):
        kubernetes_validate.validate(obj, version, strict=True)


def test_strict_core_validation_can_fail():
    import kubernetes_validate

    pod = next(o for o in core_objects("sft-cpu") if o["kind"] == "Pod")
    pod["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, "1.33.0", strict=True)


def test_rayjob_shape_for_a_gpu_job():
    job = make_job(roles=GPU_ROLES, training={"maxSteps": 100, "globalBatchSize": 16}, image="registry.local/rt:1")
    rj = builders.build_rayjob(job, run=1, owner_uid=UID, settings=SETTINGS)
    spec = rj["spec"]
    assert rj["metadata"]["name"] == "tune-r1" and rj["metadata"]["labels"][vocab.LABEL_RUN] == "1"
    assert rj["metadata"]["ownerReferences"][0] == {
        "apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob", "name": "tune", "uid": UID,
        "controller": True, "blockOwnerDeletion": True}
    assert (spec["submissionMode"], spec["backoffLimit"], spec["shutdownAfterJobFinishes"]) == ("HTTPMode", 0, True)
    assert spec["preRunningDeadlineSeconds"] == 1800 and spec["ttlSecondsAfterFinished"] == 600
    assert spec["entrypoint"] == "python -m posttrain.jobs --spec /etc/posttrain/job.json --metrics-port 8490"
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_pod = head["template"]["spec"]
    assert head_pod["automountServiceAccountToken"] is False
    assert {"name": "ptj-metrics", "containerPort": 8490} in head_pod["containers"][0]["ports"]
    assert head["template"]["metadata"]["labels"][vocab.LABEL_COMPONENT] == "head"
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "registry.local/rt:1"
    assert container["resources"]["limits"] == {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8"}
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {"posttrain_trainer": 8}
    assert pod["nodeSelector"] == {"pool": "h100"} and pod["priorityClassName"] == "training-high"
    assert pod["tolerations"] == GPU_ROLES["trainer"]["tolerations"]
    assert pod["affinity"] == GPU_ROLES["trainer"]["affinity"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "157286Mi"}} in pod["volumes"]
    claims = sorted(v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
    assert claims == ["ckpt", "data", "models"]
    assert {"name": "pvc-ckpt", "mountPath": "/mnt/pvc/ckpt"} in container["volumeMounts"]
    # Inputs-only claims are mounted read-only; output and checkpoint claims read-write.
    assert {"name": "pvc-data", "mountPath": "/mnt/pvc/data", "readOnly": True} in container["volumeMounts"]
    assert {"name": "pvc-data", "persistentVolumeClaim": {"claimName": "data", "readOnly": True}} in pod["volumes"]


def test_rl_jobs_get_one_worker_group_per_role():
    rj = builders.build_rayjob(make_job(algorithm="grpo", roles=RL_ROLES, rewards=REWARDS), run=0, owner_uid=UID,
                               settings=SETTINGS)
    groups = {g["groupName"]: g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert list(groups) == ["rollout", "learner", "reward"]
    assert groups["learner"]["replicas"] == 4
    assert groups["rollout"]["template"]["spec"]["nodeSelector"] == {"pool": "l4"}
    assert groups["reward"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi"}
    for role, group in groups.items():
        assert group["template"]["metadata"]["labels"][vocab.LABEL_ROLE] == role
        assert f"posttrain_{role}" in json.loads(json.loads(group["rayStartParams"]["resources"]))


def test_colocated_rl_jobs_run_their_engines_on_the_learner_pods():
    roles = {"learner": RL_ROLES["learner"], "reward": RL_ROLES["reward"], "rollout": {"engine": "vllm"}}
    rj = builders.build_rayjob(make_job(algorithm="grpo", roles=roles, rewards=REWARDS, placement="colocated"),
                               run=0, owner_uid=UID, settings=SETTINGS)
    groups = [g["groupName"] for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert groups == ["learner", "reward"]


def test_generate_jobs_run_the_policy_on_rollout_and_the_judge_on_reward():
    job = make_job(algorithm="generate", generate=GENERATE, roles=GENERATE_ROLES, training={}, checkpoint={})
    rj = builders.build_rayjob(job, run=0, owner_uid=UID, settings=SETTINGS)
    groups = {g["groupName"]: g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert list(groups) == ["rollout", "reward"]  # no learner, no trainer: generate trains nothing
    assert groups["rollout"]["replicas"] == 2
    judge_pod = groups["reward"]["template"]["spec"]
    assert judge_pod["nodeSelector"] == {"pool": "a100"}
    assert judge_pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert json.loads(json.loads(groups["reward"]["rayStartParams"]["resources"])) == {"posttrain_reward": 1}
    # the judge's model claim is mounted, read-only, like every input
    assert {"name": "pvc-judges", "persistentVolumeClaim": {"claimName": "judges", "readOnly": True}} in \
        judge_pod["volumes"]


EVALUATION = {"models": [{"source": "pvc://models/smollm2-135m", "name": "base"},
                         {"source": "pvc://models/smollm2-135m", "adapter": "pvc://adapters/grpo/adapter",
                          "name": "grpo"}],
              "methods": ["direct", "self_consistency"], "samples": [1, 4, 16]}


def test_evaluate_jobs_run_the_models_on_rollout_and_rewards_only_when_used():
    job = make_job(algorithm="evaluate", evaluation=EVALUATION, training={}, checkpoint={},
                   roles={"rollout": {"replicas": 2, "gpus": 1, "nodeSelector": {"pool": "l4"}}})
    rj = builders.build_rayjob(job, run=0, owner_uid=UID, settings=SETTINGS)
    groups = {g["groupName"]: g for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert list(groups) == ["rollout"]  # direct and self_consistency need no reward actors
    pod = groups["rollout"]["template"]["spec"]
    assert groups["rollout"]["replicas"] == 2 and pod["nodeSelector"] == {"pool": "l4"}
    # the adapter's claim is an input: mounted read-only like the model's
    volumes = pod["volumes"]
    assert {"name": "pvc-adapters", "persistentVolumeClaim": {"claimName": "adapters", "readOnly": True}} in volumes
    best = make_job(algorithm="evaluate", training={}, checkpoint={}, rewards=REWARDS,
                    evaluation={**EVALUATION, "methods": ["direct", "best_of_n"]})
    rj = builders.build_rayjob(best, run=0, owner_uid=UID, settings=SETTINGS)
    assert [g["groupName"] for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]] == ["rollout", "reward"]
    assert cluster_errors(best) == []


def test_suspend_and_kueue_label_pass_through():
    job = make_job(suspend=True, labels={vocab.KUEUE_QUEUE_LABEL: "team-a", "other": "x"})
    rj = builders.build_rayjob(job, run=0, owner_uid=UID, settings=SETTINGS)
    assert rj["spec"]["suspend"] is True
    assert rj["metadata"]["labels"][vocab.KUEUE_QUEUE_LABEL] == "team-a"
    assert "other" not in rj["metadata"]["labels"]


def test_long_names_are_shortened_stably_within_kuberays_limit():
    name = "a-very-long-post-training-job-name-that-goes-on-and-on"
    job = make_job(name=name)
    names = {builders.build_rayjob(job, run=r, owner_uid=UID, settings=SETTINGS)["metadata"]["name"] for r in (1, 1)}
    (short,) = names
    assert len(short) <= vocab.MAX_RAYJOB_NAME and short.endswith("-r1")
    assert vocab.rayjob_name(name, 2) != short and vocab.rayjob_name(name + "x", 1) != short


def test_configmap_holds_the_resolved_spec():
    job = make_job()
    cm = builders.build_configmap(job, owner_uid=UID)
    doc = json.loads(cm["data"][vocab.SPEC_FILE])
    assert doc["spec"]["training"]["learningRate"] == 2e-4  # defaults filled in
    assert parse_job(doc).spec == job.spec
    assert cm["metadata"]["name"] == "tune-spec"


# --- what a multi-tenant cluster needs of every job pod ---------------------------------------------

def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """The Pod Security Standard `restricted` (kubernetes.io/docs/concepts/security/pod-security-standards),
    the checks that apply to these pods: volume types, privilege escalation, non-root, capabilities, seccomp."""
    spec, found = pod["spec"], []
    allowed_volumes = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                       "projected", "secret"}
    for vol in spec.get("volumes", []):
        if not set(vol) - {"name"} <= allowed_volumes:
            found.append(f"volume {vol['name']} type")
    pod_ctx = spec.get("securityContext") or {}
    if (pod_ctx.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
        found.append("pod seccompProfile")
    if pod_ctx.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for c in spec["containers"] + spec.get("initContainers", []):
        ctx = c.get("securityContext") or {}
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{c['name']} allowPrivilegeEscalation")
        if not (ctx.get("runAsNonRoot") or pod_ctx.get("runAsNonRoot")):
            found.append(f"{c['name']} runAsNonRoot")
        if ctx.get("privileged") or ctx.get("runAsUser") == 0:
            found.append(f"{c['name']} privileged/root")
        caps = ctx.get("capabilities") or {}
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{c['name']} capabilities")
    return found


@pytest.mark.parametrize("case", list(CASES))
def test_every_job_pod_passes_the_restricted_pod_security_standard(case):
    pods = [o for o in core_objects(case) if o["kind"] == "Pod"]
    assert pods and all(restricted_violations(p) == [] for p in pods), [restricted_violations(p) for p in pods]
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsUser"] == vocab.RUNTIME_UID == 1000
        assert pod["spec"]["automountServiceAccountToken"] is False


def test_the_restricted_check_can_fail():
    pod = next(o for o in core_objects("sft-cpu") if o["kind"] == "Pod")
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    assert restricted_violations(pod) == ["volume host type", "ray-head allowPrivilegeEscalation"]


@pytest.mark.parametrize("case", list(CASES))
def test_every_emptydir_is_bounded(case):
    for pod in (o for o in core_objects(case) if o["kind"] == "Pod"):
        dirs = {v["name"]: v["emptyDir"] for v in pod["spec"]["volumes"] if "emptyDir" in v}
        assert set(dirs) == {"dshm", "tmp"} and all(d.get("sizeLimit") for d in dirs.values()), dirs
        assert dirs["tmp"]["sizeLimit"] == SETTINGS.tmp_size_limit == "64Gi"


def test_shm_is_sized_from_the_roles_memory():
    rj = builders.build_rayjob(make_job(roles={"trainer": {"memory": "16Gi"}}), run=0, owner_uid=UID, settings=SETTINGS)
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    worker = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"]
    assert head[0]["emptyDir"]["sizeLimit"] == builders.shm_size(SETTINGS.head_memory) == "2457Mi"
    assert worker[0]["emptyDir"] == {"medium": "Memory", "sizeLimit": "4915Mi"}  # 30% of 16Gi
    none = builders.build_rayjob(make_job(), run=0, owner_uid=UID, settings=SETTINGS)
    assert none["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["volumes"][0]["emptyDir"] == \
        {"medium": "Memory", "sizeLimit": builders.SHM_DEFAULT}


def test_credentials_and_identity_reach_every_container_and_never_the_configmap_as_values():
    job = make_job(**CASES["env-and-identity"])
    rj = builders.build_rayjob(job, run=0, owner_uid=UID, settings=SETTINGS)
    cluster = rj["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for t in templates:
        pod, (c,) = t["spec"], t["spec"]["containers"]
        assert pod["serviceAccountName"] == "trainer-wi" and pod["automountServiceAccountToken"] is False
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in c["env"]
        assert c["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
        assert [e["name"] for e in c["env"]][:5] == sorted(e["name"] for e in c["env"][:5]), "operator's own first"
    data = builders.build_configmap(job, owner_uid=UID)["data"][vocab.SPEC_FILE]
    assert '"secretKeyRef"' in data and "valueFrom" in data


def test_no_output_flag_and_token_auth():
    rj = builders.build_rayjob(make_job(), run=0, owner_uid=UID, settings=SETTINGS)
    assert "--output" not in rj["spec"]["entrypoint"]
    assert rj["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert rj["spec"]["rayClusterSpec"]["rayVersion"] >= "2.52"  # KubeRay refuses token auth below Ray 2.52


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_networkpolicy_validates_and_admits_only_the_configured_peers(version):
    import kubernetes_validate

    from posttrain.operator.network import NetworkPolicySettings, build_networkpolicy

    settings = NetworkPolicySettings.from_json({
        "enabled": True, "operator": {"namespace": "ops", "podLabels": {"app": "op"}},
        "prometheus": {"namespaceSelector": {}, "podSelector": {}},  # no Prometheus rule at all
        "kuberay": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ray"}}},
        "extraIngress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 8265}]}]})
    policy = build_networkpolicy("tune", "ml", owner_uid=UID, settings=settings)
    kubernetes_validate.validate(policy, version, strict=True)
    ingress = policy["spec"]["ingress"]
    assert ingress[1] == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
                                    "podSelector": {"matchLabels": {"app": "op"}}}],
                          "ports": [{"protocol": "TCP", "port": 8490}]}
    assert ingress[2]["ports"] == [{"protocol": "TCP", "port": 8265}] and len(ingress) == 4
    assert not any(peer == {} for rule in ingress for peer in rule.get("from", [])), "{} would admit every pod"
    assert NetworkPolicySettings.from_json({"enabled": False}) is None
