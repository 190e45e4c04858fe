"""The NetworkPolicy of a job's pods: a pure builder and its settings.

A Ray head answers on its GCS, dashboard (job submission) and client ports; without a policy any
pod in the cluster can reach them. The policy selects every pod of one job and admits only:

- the job's own pods, on every port (GCS, object transfer, NCCL, ...);
- the operator's pods, on the driver's progress port (8490);
- Prometheus, on the same port (`/metrics`), when selectors for it are configured;
- the KubeRay operator, on the dashboard port (8265), which HTTPMode submission uses;
- any extra ingress rules of the chart's `jobNetworkPolicy.extraIngress`.

Egress is left open (object storage, the model hub). The Helm chart passes the settings as JSON
(`POSTTRAIN_JOB_NETWORK_POLICY`); `NetworkPolicySettings.from_json` reads them.

    >>> np = build_networkpolicy("tune", "ml", owner_uid="u-1", settings=NetworkPolicySettings())
    >>> np["spec"]["podSelector"], [r.get("ports") for r in np["spec"]["ingress"]][:2]
    ({'matchLabels': {'posttrain.dev/job': 'tune'}}, [None, [{'protocol': 'TCP', 'port': 8490}]])
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from posttrain.operator import vocab

_NS_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace


def _namespace(name: str) -> dict[str, Any]:
    return {"matchLabels": {_NS_NAME_LABEL: name}}


@dataclass(frozen=True)
class NetworkPolicySettings:
    """Who may reach a job's pods, besides the job itself. Selectors are Kubernetes LabelSelectors."""

    operator_namespace: str = "posttrain-system"
    operator_pod_labels: dict[str, str] = field(default_factory=lambda: {
        "app.kubernetes.io/name": "posttrain", "app.kubernetes.io/component": "operator"})
    # An empty pair of selectors means "no rule" (not "everyone", which is what {} selects).
    prometheus_namespace_selector: dict[str, Any] = field(default_factory=lambda: _namespace("monitoring"))
    prometheus_pod_selector: dict[str, Any] = field(
        default_factory=lambda: {"matchLabels": {"app.kubernetes.io/name": "prometheus"}})
    kuberay_namespace_selector: dict[str, Any] = field(default_factory=lambda: _namespace("kuberay-system"))
    kuberay_pod_selector: dict[str, Any] = field(
        default_factory=lambda: {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}})
    extra_ingress: tuple[dict[str, Any], ...] = ()

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> NetworkPolicySettings | None:
        """Settings from the chart's `jobNetworkPolicy` value; None when `enabled` is false."""
        if not doc.get("enabled", True):
            return None
        default = cls()
        op, prom, ray = doc.get("operator") or {}, doc.get("prometheus") or {}, doc.get("kuberay") or {}
        return cls(
            operator_namespace=op.get("namespace") or default.operator_namespace,
            operator_pod_labels=dict(op.get("podLabels") or default.operator_pod_labels),
            prometheus_namespace_selector=dict(prom.get("namespaceSelector") or {}),
            prometheus_pod_selector=dict(prom.get("podSelector") or {}),
            kuberay_namespace_selector=dict(ray.get("namespaceSelector") or {}),
            kuberay_pod_selector=dict(ray.get("podSelector") or {}),
            extra_ingress=tuple(doc.get("extraIngress") or ()),
        )


def _peer(namespace_selector: dict[str, Any], pod_selector: dict[str, Any]) -> dict[str, Any] | None:
    peer = {k: copy.deepcopy(v) for k, v in (("namespaceSelector", namespace_selector),
                                              ("podSelector", pod_selector)) if v}
    return peer or None


def _tcp(port: int) -> list[dict[str, Any]]:
    return [{"protocol": "TCP", "port": port}]


def build_networkpolicy(job: str, namespace: str | None, *, owner_uid: str,
                        settings: NetworkPolicySettings) -> dict[str, Any]:
    """The NetworkPolicy `<job>-ray`, owned by the job, over every pod labelled with the job's name."""
    pods = {"matchLabels": {vocab.LABEL_JOB: job}}
    ingress: list[dict[str, Any]] = [{"from": [{"podSelector": copy.deepcopy(pods)}]}]
    operator = _peer(_namespace(settings.operator_namespace), {"matchLabels": dict(settings.operator_pod_labels)})
    ingress.append({"from": [operator], "ports": _tcp(vocab.DRIVER_METRICS_PORT)})
    prometheus = _peer(settings.prometheus_namespace_selector, settings.prometheus_pod_selector)
    if prometheus:
        ingress.append({"from": [prometheus], "ports": _tcp(vocab.DRIVER_METRICS_PORT)})
    kuberay = _peer(settings.kuberay_namespace_selector, settings.kuberay_pod_selector)
    if kuberay:
        ingress.append({"from": [kuberay], "ports": _tcp(vocab.RAY_DASHBOARD_PORT)})
    ingress += [copy.deepcopy(rule) for rule in settings.extra_ingress]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": vocab.networkpolicy_name(job),
            "namespace": namespace,
            "labels": {vocab.LABEL_JOB: job, vocab.LABEL_COMPONENT: "network",
                       vocab.LABEL_MANAGED_BY: "posttrain-operator"},
            "ownerReferences": [vocab.owner_reference(job, owner_uid)],
        },
        "spec": {"podSelector": pods, "policyTypes": ["Ingress"], "ingress": ingress},
    }
