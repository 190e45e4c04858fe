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
from dataclasses import dataclass, field
from typing import Any

from posttrain.api import runtime
from posttrain.api.spec import GROUP, KIND, RL_ROLES, VERSION, PostTrainingJob, PostTrainingJobSpec, RoleSpec
from posttrain.operator import vocab


@dataclass(frozen=True)
class BuildSettings:
    """Operator-wide defaults (from flags and the Helm values), passed in explicitly."""

    image: str  # job pods' image when spec.image is unset
    ray_version: str = "2.60.0"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    image_pull_policy: str = "IfNotPresent"
    extra_env: dict[str, str] = field(default_factory=dict)


def roles_of(spec: PostTrainingJobSpec) -> dict[str, RoleSpec]:
    """The Ray roles a job runs, each with its settings (defaults where the spec is silent)."""
    if spec.algorithm.is_rl():
        # colocated: the engines run on the learners' pods (one per learner worker), no rollout group
        skip = {"rollout"} if spec.placement == "colocated" else set()
        return {name: getattr(spec.roles, name) or RoleSpec() for name in RL_ROLES if name not in skip}
    return {"trainer": spec.roles.trainer}


def pvc_claims(spec: PostTrainingJobSpec) -> list[str]:
    """PersistentVolumeClaims named by `pvc://claim/...` anywhere in the spec, sorted."""
    uris = [spec.model.source, spec.model.tokenizer, spec.checkpoint.uri, spec.output.uri]
    uris += [s.source for s in spec.data.train] + ([spec.data.eval.source] if spec.data.eval else [])
    return sorted({u[len("pvc://") :].split("/", 1)[0] for u in uris if u and u.startswith("pvc://")})


def owner_reference(name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": name, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


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


def spec_hash(job: PostTrainingJob) -> str:
    return hashlib.sha256(json.dumps(job.spec.wire(), sort_keys=True).encode()).hexdigest()[:16]


def build_configmap(job: PostTrainingJob, *, owner_uid: str) -> dict[str, Any]:
    name = job.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": vocab.configmap_name(name),
            "namespace": job.metadata.namespace,
            "labels": common_labels(name, "spec"),
            "annotations": {f"{GROUP}/spec-hash": spec_hash(job)},
            "ownerReferences": [owner_reference(name, owner_uid)],
        },
        "data": {vocab.SPEC_FILE: json.dumps(spec_document(job), indent=2, sort_keys=True) + "\n"},
    }


def _resources(role: RoleSpec) -> dict[str, Any]:
    amounts: dict[str, str] = {}
    if role.cpus is not None:
        amounts["cpu"] = f"{role.cpus:g}"
    if role.memory is not None:
        amounts["memory"] = role.memory
    if role.gpus:
        amounts["nvidia.com/gpu"] = str(role.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _volumes(job: PostTrainingJob, *, with_spec: bool) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts): /dev/shm in memory, the PVCs the spec names, and the spec itself on the head."""
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, {"name": "tmp", "emptyDir": {}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}]
    for claim in pvc_claims(job.spec):
        vol = f"pvc-{claim}"[:63].rstrip("-")
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": vol, "mountPath": f"{vocab.PVC_ROOT}/{claim}"})
    if with_spec:
        volumes.append({"name": "job-spec", "configMap": {"name": vocab.configmap_name(job.metadata.name)}})
        mounts.append({"name": "job-spec", "mountPath": vocab.SPEC_MOUNT, "readOnly": True})
    return volumes, mounts


def _env(settings: BuildSettings, run: int) -> list[dict[str, str]]:
    env = {
        runtime.PLACEMENT_ENV: runtime.PLACEMENT_ROLES,  # the driver asks Ray for each role's custom resource
        "POSTTRAIN_RUN": str(run),
        "POSTTRAIN_PVC_ROOT": vocab.PVC_ROOT,
        "POSTTRAIN_CACHE": "/tmp/posttrain-cache",
        "HF_HOME": "/tmp/hf",
        **settings.extra_env,
    }
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _pod_template(job: PostTrainingJob, *, component: str, role: str | None, container: dict[str, Any],
                  volumes: list[dict], placement: RoleSpec | None) -> dict[str, Any]:
    labels = common_labels(job.metadata.name, component)
    if role:
        labels[vocab.LABEL_ROLE] = role
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # job pods run user reward code: no Kubernetes API rights
        "containers": [container],
        "volumes": volumes,
    }
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
    env = _env(settings, run)
    suspend = spec.suspend if suspend is None else suspend

    def container(name: str, resources: dict[str, Any], mounts: list[dict], **extra: Any) -> dict[str, Any]:
        return {"name": name, "image": image, "imagePullPolicy": settings.image_pull_policy,
                "env": [dict(e) for e in env], **extra, "resources": resources, "volumeMounts": mounts}

    head_volumes, head_mounts = _volumes(job, with_spec=True)
    head_amounts = {"cpu": settings.head_cpu, "memory": settings.head_memory}
    head_container = container("ray-head", {"requests": dict(head_amounts), "limits": dict(head_amounts)}, head_mounts,
                               ports=[
                                   {"name": "gcs", "containerPort": 6379},
                                   {"name": "dashboard", "containerPort": 8265},
                                   {"name": "client", "containerPort": 10001},
                                   {"name": vocab.DRIVER_METRICS_PORT_NAME, "containerPort": vocab.DRIVER_METRICS_PORT},
                               ])
    head = {
        # num-cpus 0: the head runs the driver and small coordinating actors, never training work.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": _pod_template(job, component="head", role=None, container=head_container,
                                  volumes=head_volumes, placement=None),
    }

    groups = []
    for role, rs in roles_of(spec).items():
        volumes, mounts = _volumes(job, with_spec=False)
        worker_container = container("ray-worker", _resources(rs), mounts)
        groups.append({
            "groupName": role,
            "replicas": rs.replicas,
            "minReplicas": rs.replicas,
            "maxReplicas": rs.replicas,
            # KubeRay passes this to `ray start --resources`: one unit per GPU (one for a CPU pod),
            # and the driver asks for one unit per actor, so each role's actors land on its own pods.
            "rayStartParams": {"resources": json.dumps(json.dumps({runtime.ray_resource(role): max(1, rs.gpus)}))},
            "template": _pod_template(job, component="worker", role=role, container=worker_container,
                                      volumes=volumes, placement=rs),
        })

    entrypoint = (f"python -m posttrain.jobs --spec {vocab.SPEC_MOUNT}/{vocab.SPEC_FILE} "
                  f"--metrics-port {vocab.DRIVER_METRICS_PORT}")
    if spec.output.uri is None:
        entrypoint += f" --output {vocab.DEFAULT_OUTPUT_ROOT}/{name}"
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
        "rayClusterSpec": {"rayVersion": settings.ray_version, "headGroupSpec": head, "workerGroupSpecs": groups},
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
            "annotations": {f"{GROUP}/spec-hash": spec_hash(job), f"{GROUP}/suspend": str(suspend).lower()},
            "ownerReferences": [owner_reference(name, owner_uid)],
        },
        "spec": rayjob_spec,
    }


def build_children(job: PostTrainingJob, *, run: int, owner_uid: str, settings: BuildSettings) -> list[dict[str, Any]]:
    """Every child of one run, in creation order (the RayJob mounts the ConfigMap)."""
    return [build_configmap(job, owner_uid=owner_uid),
            build_rayjob(job, run=run, owner_uid=owner_uid, settings=settings)]
