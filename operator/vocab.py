"""The operator's vocabulary: label and annotation keys, child names, reasons.

One module owns these names; builders, status mapping, the chart's monitors
and the tests all read them from here.
"""

from __future__ import annotations

import hashlib

from posttrain.api import runtime
from posttrain.api.spec import GROUP

# Labels on every child object and pod.
LABEL_JOB = f"{GROUP}/job"  # e.g. posttrain.dev/job: grpo-arith
LABEL_COMPONENT = f"{GROUP}/component"  # e.g. posttrain.dev/component: head | worker | spec
LABEL_ROLE = f"{GROUP}/role"  # e.g. posttrain.dev/role: trainer
LABEL_RUN = f"{GROUP}/run"  # e.g. posttrain.dev/run: "1" (restart index of the RayJob)
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"  # posttrain-operator
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # passed from the PostTrainingJob to its RayJobs

# kopf's own bookkeeping, under our group rather than kopf.zalando.org.
FINALIZER = f"{GROUP}/finalizer"
ANNOTATION_PREFIX = GROUP

# Where the driver serves /metrics and /progress inside the head pod (shared with the runtime).
DRIVER_METRICS_PORT = runtime.DRIVER_METRICS_PORT
DRIVER_METRICS_PORT_NAME = runtime.DRIVER_METRICS_PORT_NAME
SPEC_MOUNT = "/etc/posttrain"  # the ConfigMap with the resolved job
SPEC_FILE = "job.json"
PVC_ROOT = "/mnt/pvc"  # pvc://claim/path is mounted at /mnt/pvc/claim
DEFAULT_OUTPUT_ROOT = "/tmp/posttrain-output"  # used when spec.output.uri is unset (not persistent)

# KubeRay refuses RayJob names longer than this (its RayCluster and Service names derive from it).
MAX_RAYJOB_NAME = 47

# Condition types and reasons.
COND_READY = "Ready"
COND_PROGRESSING = "Progressing"
COND_FAILED = "Failed"
COND_SPEC_ACCEPTED = "SpecAccepted"
REASON_INVALID_SPEC = "InvalidSpec"
REASON_RESTARTS_EXHAUSTED = "RestartsExhausted"
REASON_RESTARTING = "Restarting"
REASON_SUSPENDED = "Suspended"
REASON_SUCCEEDED = "Succeeded"
REASON_RUNNING = "Running"
REASON_PROVISIONING = "Provisioning"
REASON_PENDING = "Pending"
REASON_IMMUTABLE_FIELD = "ImmutableFieldChanged"


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


def run_index(rayjob_name_: str) -> int | None:
    """The run number encoded in a RayJob name, or None when it is not one of ours."""
    head, sep, tail = rayjob_name_.rpartition("-r")
    return int(tail) if sep and tail.isdigit() else None
