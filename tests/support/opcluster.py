"""Helpers over the API emulator (kubeemu) for operator tests: claims, KubeRay's pods, Events, faults.

    with opcluster.cluster() as k8s:
        opcluster.claim(k8s, "models")                       # a ReadWriteMany claim
        opcluster.claim(k8s, "scratch", "ReadWriteOnce")
"""

from __future__ import annotations

from typing import Any

import kubeemu

NS = "default"
PVC = ("v1", "persistentvolumeclaims")
POD = ("v1", "pods")
NETPOL = ("networking.k8s.io/v1", "networkpolicies")


def cluster(*, namespaces: tuple[str, ...] = (NS,), **kwargs: Any) -> kubeemu.Cluster:
    return kubeemu.Cluster(namespaces=namespaces, **kwargs)


def claim(k8s: kubeemu.Cluster, name: str, *modes: str, namespace: str = NS) -> dict[str, Any]:
    """A bound PersistentVolumeClaim with `modes` (default ReadWriteMany)."""
    modes_ = list(modes or ("ReadWriteMany",))
    k8s.create({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name, "namespace": namespace},
                "spec": {"accessModes": modes_, "resources": {"requests": {"storage": "1Gi"}}}})
    return k8s.patch_status(*PVC, namespace, name, {"phase": "Bound", "accessModes": modes_})


def pod(k8s: kubeemu.Cluster, name: str, labels: dict[str, str], status: dict[str, Any],
        namespace: str = NS) -> dict[str, Any]:
    """A pod as KubeRay would create it from a RayJob's template, with the status the kubelet reports."""
    k8s.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
                "spec": {"containers": [{"name": "ray-worker", "image": "rt"}]}})
    return k8s.patch_status(*POD, namespace, name, status)


def event(k8s: kubeemu.Cluster, *, kind: str, name: str, reason: str, message: str,
          namespace: str = NS) -> dict[str, Any]:
    """A core v1 Event about `kind/name`, as a controller's recorder posts it."""
    return k8s.create({"apiVersion": "v1", "kind": "Event",
                       "metadata": {"generateName": f"{name}.", "namespace": namespace},
                       "involvedObject": {"kind": kind, "name": name, "namespace": namespace},
                       "reason": reason, "message": message, "type": "Warning"})


def fault(k8s: kubeemu.Cluster, method: str, api_version: str, plural: str, *, status: int, message: str,
          reason: str = "") -> dict[str, bool]:
    """Answer every `method` on `plural` over HTTP with an error Status while `switch["on"]` is true;
    when it is false, requests go through to the emulated server as usual."""
    import kmock
    from kubeemu_admission import api_error

    group, _, version = api_version.rpartition("/")
    switch = {"on": True}

    def react(request: Any) -> None:
        if switch["on"]:
            raise api_error(status, reason or {403: "Forbidden", 404: "NotFound", 422: "Invalid"}.get(status, "Error"),
                            message)
        return None  # no content: kmock goes on to the emulator's own handling

    k8s.emulator[method, kmock.resource(group, version, plural)] << react
    return switch
