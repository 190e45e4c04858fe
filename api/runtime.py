"""The contract between the operator and the job runtime, which may not import each other.

The operator builds RayJobs that the driver (`python -m posttrain.jobs`) runs; both read
these names from here.
"""

from __future__ import annotations

# The driver serves /metrics and /progress on this port in the head pod (named for the PodMonitor).
DRIVER_METRICS_PORT = 8490
DRIVER_METRICS_PORT_NAME = "ptj-metrics"

# `pvc://claim/path` is mounted at PVC_ROOT/claim in every job pod (POSTTRAIN_PVC_ROOT tells the runtime).
PVC_ROOT = "/mnt/pvc"

# Set to PLACEMENT_ROLES in job pods: each actor then asks for its role's Ray custom resource.
PLACEMENT_ENV = "POSTTRAIN_PLACEMENT"
PLACEMENT_ROLES = "roles"


def ray_resource(role: str) -> str:
    """The Ray custom resource a role's worker group offers and its actors request.

    >>> ray_resource("rollout")
    'posttrain_rollout'
    """
    return f"posttrain_{role}"

# Object storage the runtime reads and writes through fsspec (jobs/storage.py keeps the same list).
OBJECT_SCHEMES = ("s3://", "gs://", "gcs://", "az://", "abfs://")
# Storage that every pod of a job sees: a PersistentVolumeClaim (ReadWriteMany) or object storage.
SHARED_SCHEMES = ("pvc://", *OBJECT_SCHEMES)
