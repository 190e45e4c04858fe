"""Pure builders: a PostTrainingJob in, the child manifests out.

No API calls, no environment reads, no clock: every input is an argument, so
the same job always gives the same children (golden tests pin them).

    >>> from posttrain.api.load import parse_job
    >>> job = parse_job({"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
    ...     "metadata": {"name": "demo", "namespace": "ml"}, "spec": {"algorithm": "sft",
    ...     "model": {"source": "pvc://models/smol"}, "data": {"train": [{"source": "pvc://data/t.jsonl"}]},
    ...     "training": {"maxSteps": 10}}})
    >>> rj = build_rayjob(job, run=0, owner_uid="u-1", settings=BuildSettings(image="posttrain/runtime:0.1.0"))
    >>> rj["metadata"]["name"], [g["groupName"] for g in rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    ('demo-r0', ['trainer'])
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from posttrain.api import runtime
from posttrain.api.cluster import pvc_claims
from posttrain.api.spec import GROUP, KIND, VERSION, PostTrainingJob, PostTrainingJobSpec, RoleSpec
from posttrain.operator import vocab
from posttrain.operator.network import NetworkPolicySettings, build_networkpolicy


@dataclass(frozen=True)
class BuildSettings:
    """Operator-wide defaults (from flags and the Helm values), passed in explicitly."""

    image: str  # job pods' image when spec.image is unset
    ray_version: str = "2.60.0"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    image_pull_policy: str = "IfNotPresent"
    extra_env: dict[str, str] = field(default_factory=dict)
    # /tmp of every job pod: Ray's logs and spill files, and the cache of hub and object-storage
    # downloads (HF_HOME, POSTTRAIN_CACHE). Exceeding it evicts the pod.
    tmp_size_limit: str = "64Gi"
    # None: no NetworkPolicy per job (the chart's jobNetworkPolicy.enabled=false).
    network_policy: NetworkPolicySettings | None = field(default_factory=NetworkPolicySettings)


# /dev/shm holds Ray's object store, which takes 30% of a node's memory by default; it is memory,
# so it counts against the container's limit. A role that sets no memory gets SHM_DEFAULT.
SHM_SHARE = 0.3
SHM_DEFAULT = "2Gi"
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {None: 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def shm_size(memory: str | None) -> str:
    """The /dev/shm size limit for a pod with `memory` (a Kubernetes quantity).

    >>> shm_size("8Gi"), shm_size("512Gi"), shm_size(None)
    ('2457Mi', '157286Mi', '2Gi')
    """
    match = _QUANTITY.match(memory or "")
    if not match:
        return SHM_DEFAULT
    size = float(match[1]) * _UNITS[match[2]] * SHM_SHARE
    return f"{max(64, int(size // 2**20))}Mi"


def roles_of(spec: PostTrainingJobSpec) -> dict[str, RoleSpec]:
    """The Ray roles a job runs, each with its settings (defaults where the spec is silent)."""
    if "trainer" not in spec.ray_roles():
        # grpo/ppo: rollout, learner, reward; distill on_policy: learner, rollout, teacher; generate: rollout (the
        # policy) and reward (the judge);
        # evaluate: rollout (the models), and reward only when best_of_n or metric rewards use spec.rewards.
        # colocated: the engines run on the learners' pods (one per learner worker), no rollout group
        skip = {"rollout"} if spec.placement == "colocated" else set()
        return {name: getattr(spec.roles, name) or RoleSpec() for name in spec.ray_roles() if name not in skip}
    # teacher: distill's teacher actors; rollout: spec.evaluation at the end
    return {"trainer": spec.roles.trainer,
            **{name: getattr(spec.roles, name) or RoleSpec() for name in spec.ray_roles() if name != "trainer"}}


def common_labels(job: str, component: str) -> dict[str, str]:
    return {vocab.LABEL_JOB: job, vocab.LABEL_COMPONENT: component, vocab.LABEL_MANAGED_BY: "posttrain-operator"}


def spec_document(job: PostTrainingJob) -> dict[str, Any]:
    """The resolved job the driver reads: defaults filled in, status and server fields dropped."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace},
        "spec": job.spec.wire(),
    }


def content_hash(spec_wire: dict[str, Any]) -> str:
    """The hash of a spec in wire form, as stored in the ConfigMap's spec-hash annotation."""
    return hashlib.sha256(json.dumps(spec_wire, sort_keys=True).encode()).hexdigest()[:16]


def spec_hash(job: PostTrainingJob) -> str:
    return content_hash(job.spec.wire())


def build_configmap(job: PostTrainingJob, *, owner_uid: str) -> dict[str, Any]:
    """`<job>-spec`: the resolved job the driver reads, immutable (a run must not change under it)."""
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": vocab.configmap_name(name),
            "namespace": job.metadata.namespace,
            "labels": common_labels(name, "spec"),
            "annotations": {vocab.ANNOTATION_SPEC_HASH: spec_hash(job)},
            "ownerReferences": [vocab.owner_reference(name, owner_uid)],
        },
        "immutable": True,
        "data": {vocab.SPEC_FILE: json.dumps(spec_document(job), indent=2, sort_keys=True) + "\n"},
    }


def configmap_bytes(configmap: dict[str, Any]) -> int:
    """What the API server counts against its 1 MiB ConfigMap limit."""
    return sum(len(k) + len(v.encode()) for k, v in (configmap.get("data") or {}).items())


def _resources(role: RoleSpec) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if role.cpus is not None:
        amounts["cpu"] = f"{role.cpus:g}"
    if role.memory is not None:
        amounts["memory"] = role.memory
    if role.gpus:
        amounts["nvidia.com/gpu"] = str(role.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _volumes(job: PostTrainingJob, *, memory: str | None, settings: BuildSettings,
             with_spec: bool) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): /dev/shm in memory and /tmp, both bounded; the PVCs the spec names
    (read-only when the job only reads them); and the spec itself on the head."""
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size(memory)}},
        {"name": "tmp", "emptyDir": {"sizeLimit": settings.tmp_size_limit}},
    ]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    for claim, usage in pvc_claims(job.spec).items():
        vol = f"pvc-{claim}"[:63].rstrip("-")
        source: dict[str, Any] = {"claimName": claim}
        mount: dict[str, Any] = {"name": vol, "mountPath": f"{vocab.PVC_ROOT}/{claim}"}
        if usage == "read":
            source["readOnly"] = mount["readOnly"] = True
        volumes.append({"name": vol, "persistentVolumeClaim": source})
        mounts.append(mount)
    if with_spec:
        volumes.append({"name": "job-spec", "configMap": {"name": vocab.configmap_name(job.metadata.name)}})
        mounts.append({"name": "job-spec", "mountPath": vocab.SPEC_MOUNT, "readOnly": True})
    return volumes, mounts


def _env(job: PostTrainingJob, settings: BuildSettings, run: int) -> list[dict[str, Any]]:
    """The operator's variables, then the job's own (spec.env; reserved names are refused by the API)."""
    env = {
        runtime.PLACEMENT_ENV: runtime.PLACEMENT_ROLES,  # the driver asks Ray for each role's custom resource
        runtime.RUN_ENV: str(run),
        runtime.PVC_ROOT_ENV: vocab.PVC_ROOT,
        runtime.CACHE_ENV: "/tmp/posttrain-cache",
        "HF_HOME": "/tmp/hf",
        **settings.extra_env,
    }
    return [{"name": k, "value": v} for k, v in sorted(env.items())] + [e.wire() for e in job.spec.env]


# The `restricted` Pod Security Standard: non-root as the runtime image's user, no privilege
# escalation, no capabilities, the runtime's default seccomp profile.
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": vocab.RUNTIME_UID, "runAsGroup": vocab.RUNTIME_UID,
                        "fsGroup": vocab.RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY_CONTEXT = {"allowPrivilegeEscalation": False, "runAsNonRoot": True,
                              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _pod_template(job: PostTrainingJob, *, run: int, component: str, role: str | None, container: dict[str, Any],
                  volumes: list[dict], placement: RoleSpec | None) -> dict[str, Any]:
    # The run label lets the operator find one run's pods (and tell them from a previous run's).
    labels = {**common_labels(job.metadata.name, component), vocab.LABEL_RUN: str(run)}
    if role:
        labels[vocab.LABEL_ROLE] = role
    pod: dict[str, Any] = {
        # Job pods run user reward code: no Kubernetes API token, even with a workload-identity
        # service account (cloud identity comes from the account's annotations, not this token).
        "automountServiceAccountToken": False,
        "securityContext": json.loads(json.dumps(POD_SECURITY_CONTEXT)),
        "containers": [container],
        "volumes": volumes,
    }
    if job.spec.service_account_name:
        pod["serviceAccountName"] = job.spec.service_account_name
    if placement is not None:
        if placement.node_selector:
            pod["nodeSelector"] = dict(placement.node_selector)
        if placement.tolerations:
            pod["tolerations"] = [t.wire() for t in placement.tolerations]
        if placement.affinity:
            pod["affinity"] = placement.affinity
        if placement.priority_class_name:
            pod["priorityClassName"] = placement.priority_class_name
    return {"metadata": {"labels": labels}, "spec": pod}


def build_rayjob(job: PostTrainingJob, *, run: int, owner_uid: str, settings: BuildSettings,
                 suspend: bool | None = None) -> dict[str, Any]:
    """The RayJob of run `run` (0 first, n after the n-th restart)."""
    spec, name = job.spec, job.metadata.name
    image = spec.image or settings.image
    env = _env(job, settings, run)
    env_from = [e.wire() for e in spec.env_from]
    suspend = spec.suspend if suspend is None else suspend

    def container(name: str, resources: dict[str, Any], mounts: list[dict], **extra: Any) -> dict[str, Any]:
        out = {"name": name, "image": image, "imagePullPolicy": settings.image_pull_policy,
               "env": json.loads(json.dumps(env)), **extra, "resources": resources, "volumeMounts": mounts,
               "securityContext": json.loads(json.dumps(CONTAINER_SECURITY_CONTEXT))}
        if env_from:
            out["envFrom"] = json.loads(json.dumps(env_from))
        return out

    head_volumes, head_mounts = _volumes(job, memory=settings.head_memory, settings=settings, with_spec=True)
    head_amounts = {"cpu": settings.head_cpu, "memory": settings.head_memory}
    head_container = container("ray-head", {"requests": dict(head_amounts), "limits": dict(head_amounts)}, head_mounts,
                               ports=[
                                   {"name": "gcs", "containerPort": 6379},
                                   {"name": "dashboard", "containerPort": vocab.RAY_DASHBOARD_PORT},
                                   {"name": "client", "containerPort": 10001},
                                   {"name": vocab.DRIVER_METRICS_PORT_NAME, "containerPort": vocab.DRIVER_METRICS_PORT},
                               ])
    head = {
        # num-cpus 0: the head runs the driver and small coordinating actors, never training work.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": _pod_template(job, run=run, component="head", role=None, container=head_container,
                                  volumes=head_volumes, placement=None),
    }

    groups = []
    for role, rs in roles_of(spec).items():
        volumes, mounts = _volumes(job, memory=rs.memory, settings=settings, with_spec=False)
        worker_container = container("ray-worker", _resources(rs), mounts)
        groups.append({
            "groupName": role,
            "replicas": rs.replicas,
            "minReplicas": rs.replicas,
            "maxReplicas": rs.replicas,
            # KubeRay passes this to `ray start --resources`: one unit per GPU (one for a CPU pod),
            # and the driver asks for one unit per actor, so each role's actors land on its own pods.
            "rayStartParams": {"resources": json.dumps(json.dumps({runtime.ray_resource(role): max(1, rs.gpus)}))},
            "template": _pod_template(job, run=run, component="worker", role=role, container=worker_container,
                                      volumes=volumes, placement=rs),
        })

    # No --output: spec.output.uri is required on a cluster (api/cluster.py) and names shared storage.
    entrypoint = (f"python -m posttrain.jobs --spec {vocab.SPEC_MOUNT}/{vocab.SPEC_FILE} "
                  f"--metrics-port {vocab.DRIVER_METRICS_PORT}")
    labels = {**common_labels(name, "rayjob"), vocab.LABEL_RUN: str(run)}
    if vocab.KUEUE_QUEUE_LABEL in job.metadata.labels:
        labels[vocab.KUEUE_QUEUE_LABEL] = job.metadata.labels[vocab.KUEUE_QUEUE_LABEL]
    rayjob_spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        # HTTPMode: KubeRay submits through the head's dashboard once it answers, so there is no
        # submitter pod to schedule and no K8sJobMode race where the submitter starts before the
        # head is ready and burns its retries.
        "submissionMode": "HTTPMode",
        "backoffLimit": 0,  # we own retries: a new RayJob (-r<n+1>) resumes from the last checkpoint
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "preRunningDeadlineSeconds": spec.pre_running_deadline_seconds,
        "suspend": suspend,
        "rayClusterSpec": {
            "rayVersion": settings.ray_version,
            # Ray token auth (Ray >= 2.52, KubeRay >= 1.5.1): KubeRay generates a Secret per cluster,
            # sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray container, and its HTTPMode submission
            # sends the token; nothing else can submit to or drive the head.
            "authOptions": {"mode": "token"},
            "headGroupSpec": head,
            "workerGroupSpecs": groups,
        },
    }
    if spec.active_deadline_seconds:
        rayjob_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": vocab.rayjob_name(name, run),
            "namespace": job.metadata.namespace,
            "labels": labels,
            "annotations": {vocab.ANNOTATION_SPEC_HASH: spec_hash(job), vocab.ANNOTATION_SUSPEND: str(suspend).lower()},
            "ownerReferences": [vocab.owner_reference(name, owner_uid)],
        },
        "spec": rayjob_spec,
    }


def build_children(job: PostTrainingJob, *, run: int, owner_uid: str, settings: BuildSettings) -> list[dict[str, Any]]:
    """Every child of one run, in creation order: the NetworkPolicy first (no pod runs unprotected),
    the ConfigMap (the RayJob mounts it), the RayJob."""
    children = [build_configmap(job, owner_uid=owner_uid),
                build_rayjob(job, run=run, owner_uid=owner_uid, settings=settings)]
    if settings.network_policy is not None:
        children.insert(0, build_networkpolicy(job.metadata.name, job.metadata.namespace, owner_uid=owner_uid,
                                               settings=settings.network_policy))
    return children
