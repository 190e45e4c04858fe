"""The operator's vocabulary: label and annotation keys, child names, reasons.

One module owns these names; builders, status mapping, the chart's monitors
and the tests all read them from here.
"""

from __future__ import annotations

import hashlib

from posttrain.api import runtime
from posttrain.api.spec import GROUP, KIND, VERSION

# Labels on every child object and pod.
LABEL_JOB = f"{GROUP}/job"  # e.g. posttrain.dev/job: grpo-arith
LABEL_COMPONENT = f"{GROUP}/component"  # e.g. posttrain.dev/component: head | worker | spec
LABEL_ROLE = f"{GROUP}/role"  # e.g. posttrain.dev/role: trainer
LABEL_RUN = f"{GROUP}/run"  # e.g. posttrain.dev/run: "1" (restart index of the RayJob)
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"  # posttrain-operator
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # passed from the PostTrainingJob to its RayJobs

# Annotations on the children.
ANNOTATION_PREFIX = GROUP
ANNOTATION_SPEC_HASH = f"{GROUP}/spec-hash"  # on the ConfigMap and RayJobs, e.g. "3f9a0c1b2d4e5f60"
ANNOTATION_SUSPEND = f"{GROUP}/suspend"  # on a RayJob: what the operator last asked for, "true" | "false"
# On a RayJob the operator stopped (suspended) itself, why: e.g. "ProgressDeadlineExceeded", and the detail.
ANNOTATION_STOP_REASON = f"{GROUP}/stop-reason"
ANNOTATION_STOP_MESSAGE = f"{GROUP}/stop-message"

# kopf's finalizer under our group. This version adds no finalizer; older ones did (through a kopf
# timer), and `posttrain-operator remove-finalizers` and every reconcile take it off again.
FINALIZER = f"{GROUP}/finalizer"
LEGACY_FINALIZERS = (FINALIZER, "kopf.zalando.org/KopfFinalizerMarker")

# Where the driver serves /metrics and /progress inside the head pod (shared with the runtime).
DRIVER_METRICS_PORT = runtime.DRIVER_METRICS_PORT
DRIVER_METRICS_PORT_NAME = runtime.DRIVER_METRICS_PORT_NAME
RAY_DASHBOARD_PORT = 8265  # KubeRay's HTTPMode submits the entrypoint here
SPEC_MOUNT = "/etc/posttrain"  # the ConfigMap with the resolved job
SPEC_FILE = "job.json"
PVC_ROOT = runtime.PVC_ROOT  # pvc://claim/path is mounted at /mnt/pvc/claim
CONFIGMAP_MAX_BYTES = 1024 * 1024  # the API server refuses larger ConfigMaps
RUNTIME_UID = 1000  # the runtime image's user (images/runtime/Dockerfile: USER 1000:1000)

# KubeRay refuses RayJob names longer than this (its RayCluster and Service names derive from it).
MAX_RAYJOB_NAME = 47

# Condition types.
COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_FAILED = "Failed"
COND_SPEC_ACCEPTED = "SpecAccepted"  # False while the spec (or its stored copy) cannot be used as it is
COND_BLOCKED = "Blocked"  # True while something outside the job holds it up (a missing claim, an API error)
COND_UNKNOWN_FIELDS = "UnknownFields"  # True when the stored object has fields this operator does not know
COND_WAITING_FOR_DEPENDENCY = "WaitingForDependency"  # True while a job its spec names (ptj://) has not succeeded

# Reasons. Terminal failures:
REASON_INVALID_SPEC = "InvalidSpec"
REASON_RESTARTS_EXHAUSTED = "RestartsExhausted"
REASON_INVALID_INPUT = "InvalidInput"  # the driver exited with code 2: bad input, nothing written
REASON_PODS_CANNOT_START = "PodsCannotStart"  # a missing claim or Secret, Pod Security, a PriorityClass
REASON_RAYJOB_VALIDATION_FAILED = "RayJobValidationFailed"  # KubeRay's ValidationFailed
REASON_RAYJOB_REJECTED = "RayJobRejected"  # the API server refused the RayJob (422/400)
REASON_SPEC_TOO_LARGE = "SpecTooLarge"  # the resolved spec does not fit a ConfigMap
REASON_STORED_SPEC_INVALID = "StoredSpecInvalid"  # the spec ConfigMap no longer parses
REASON_SPEC_TAMPERED = "SpecConfigMapTampered"  # the spec ConfigMap's content is not what was written
REASON_VOLUME_NOT_SHARED = "VolumeNotShared"  # a claim lacks ReadWriteMany (ReadOnlyMany for inputs)
REASON_DEPENDENCY_FAILED = "DependencyFailed"  # a job named by ptj:// failed
REASON_DEPENDENCY_CYCLE = "DependencyCycle"  # jobs that name each other (ptj://) in a cycle
# A job named by ptj:// does not exist: a WaitingForDependency reason during the grace, terminal after it.
REASON_DEPENDENCY_NOT_FOUND = "DependencyNotFound"
# Phases and progress:
REASON_RESTARTING = "Restarting"
REASON_PROGRESS_DEADLINE = "ProgressDeadlineExceeded"  # no new step for spec.progressDeadlineSeconds
REASON_SUSPENDED = "Suspended"
REASON_SUCCEEDED = "Succeeded"
REASON_RUNNING = "Running"
REASON_PROVISIONING = "Provisioning"
REASON_PENDING = "Pending"
REASON_QUEUED = "Queued"
REASON_IMMUTABLE_FIELD = "ImmutableFieldChanged"
REASON_UNKNOWN_FIELDS = "UnknownFieldsIgnored"
# Waiting (no retry timer: the dependency's phase change wakes the job):
REASON_WAITING_FOR_DEPENDENCY = "DependencyNotFinished"  # a job named by ptj:// has not succeeded yet
# Blocked (transient, retried with backoff):
REASON_WAITING_FOR_VOLUME = "WaitingForVolume"  # a claim the spec names does not exist yet
REASON_STALE_CONFIGMAP = "WaitingForGarbageCollection"  # <job>-spec of a deleted namesake job
REASON_CONFIGMAP_CONFLICT = "SpecConfigMapConflict"  # <job>-spec exists and belongs to something else
REASON_KUBERAY_MISSING = "KubeRayMissing"  # the API server does not serve ray.io/v1 RayJobs (404)
REASON_FORBIDDEN = "Forbidden"  # the operator's RBAC does not allow a call (403)
REASON_API_ERROR = "ApiError"  # any other error answer, or no answer


def _fit(base: str, suffix: str, limit: int) -> str:
    """`base + suffix`, shortened with a stable hash when longer than `limit` (DNS-1123 safe)."""
    name = f"{base}{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(base.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def rayjob_name(job: str, run: int) -> str:
    """`<job>-r<run>`: run 0 is the first RayJob, run n the n-th restart.

    >>> rayjob_name("grpo-arith", 0)
    'grpo-arith-r0'
    >>> len(rayjob_name("x" * 60, 12)) <= MAX_RAYJOB_NAME
    True
    """
    return _fit(job, f"-r{run}", MAX_RAYJOB_NAME)


def configmap_name(job: str) -> str:
    return _fit(job, "-spec", 253)


def networkpolicy_name(job: str) -> str:
    return _fit(job, "-ray", 253)


def owner_reference(job: str, uid: str) -> dict[str, object]:
    """What every child carries: garbage collection deletes it with the job (no finalizer needed)."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": job, "uid": uid,
            "controller": True, "blockOwnerDeletion": True}


def run_index(rayjob_name_: str) -> int | None:
    """The run number encoded in a RayJob name, or None when it is not one of ours."""
    head, sep, tail = rayjob_name_.rpartition("-r")
    return int(tail) if sep and tail.isdigit() else None


# KubeRay v1.7's RayJob status values (`apis/ray/v1/rayjob_types.go`): status.jobDeploymentStatus ...
DEPLOYMENT_RUNNING = "Running"  # e.g. status.jobDeploymentStatus: Running
DEPLOYMENT_COMPLETE = "Complete"
DEPLOYMENT_FAILED = "Failed"
DEPLOYMENT_VALIDATION_FAILED = "ValidationFailed"
DEPLOYMENT_SUSPENDING = "Suspending"
DEPLOYMENT_SUSPENDED = "Suspended"
# ... and status.jobStatus, the Ray job's own state.
JOB_SUCCEEDED = "SUCCEEDED"  # e.g. status.jobStatus: SUCCEEDED
JOB_FAILED = "FAILED"
JOB_STOPPED = "STOPPED"
