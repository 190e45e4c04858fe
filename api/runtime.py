"""The contract between the operator and the job runtime, which may not import each other.

The operator builds RayJobs that the driver (`python -m posttrain.jobs`) runs; both read
these names from here.
"""

from __future__ import annotations

# The driver serves /metrics and /progress on this port in the head pod (named for the PodMonitor).
DRIVER_METRICS_PORT = 8490
DRIVER_METRICS_PORT_NAME = "ptj-metrics"

# `pvc://claim/path` is mounted at PVC_ROOT/claim in every job pod; PVC_ROOT_ENV tells the runtime where.
PVC_ROOT = "/mnt/pvc"
PVC_ROOT_ENV = "POSTTRAIN_PVC_ROOT"  # e.g. POSTTRAIN_PVC_ROOT=/mnt/pvc
# Each pod's cache of downloaded and converted inputs (object storage, GGUF); default ~/.cache/posttrain.
CACHE_ENV = "POSTTRAIN_CACHE"  # e.g. POSTTRAIN_CACHE=/tmp/posttrain-cache
# The RayJob run a driver belongs to (0 first, n after the n-th restart); summary.json records it.
RUN_ENV = "POSTTRAIN_RUN"  # e.g. POSTTRAIN_RUN=2
# "1" forwards Ray workers' logs to the driver's output (off: they stay in Ray's log folder).
RAY_LOGS_ENV = "POSTTRAIN_RAY_LOGS"  # e.g. POSTTRAIN_RAY_LOGS=1

# Set to PLACEMENT_ROLES in job pods: each actor then asks for its role's Ray custom resource.
PLACEMENT_ENV = "POSTTRAIN_PLACEMENT"  # e.g. POSTTRAIN_PLACEMENT=roles
PLACEMENT_ROLES = "roles"

# Exit codes of `posttrain run` / `python -m posttrain.jobs`; the operator restarts only on EXIT_FAILED.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def ray_resource(role: str) -> str:
    """The Ray custom resource a role's worker group offers and its actors request.

    >>> ray_resource("rollout")
    'posttrain_rollout'
    """
    return f"posttrain_{role}"

# Object storage the runtime reads and writes through fsspec.
OBJECT_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")
# Storage that every pod of a job sees: a PersistentVolumeClaim (ReadWriteMany) or object storage.
SHARED_SCHEMES = ("pvc://", *OBJECT_SCHEMES)
