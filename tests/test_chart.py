"""The Helm chart charts/posttrain, rendered by a real `helm` and checked by real tools.

- `helm lint --strict`, and `helm template` of several values files (default, namespaced, HA,
  monitoring with and without the monitoring.coreos.com/v1 API) for Kubernetes 1.28 and 1.33;
- every core kind through kubernetes-validate (strict); the Prometheus Operator kinds, which
  kubernetes-validate does not know, against the structure written out below;
- one test per template for what it must say (security context, probes, RBAC rules, ...);
- the PrometheusRule through `promtool check rules` and `promtool test rules` (synthetic series
  that make each alert fire, and stay quiet when they should); every dashboard query through
  `promtool check rules` as a recording rule;
- values.yaml: a `# --` description on every key, and the same keys as values.schema.json.

Tools: `bash scripts/install-test-tools.sh` puts helm in .venv/bin and installs promtool.
    .venv/bin/python -m pytest tests/test_chart.py -q
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from support import REPO
from posttrain.jobs.run.progress import Metrics as DriverMetrics, RunState
from posttrain.operator import vocab
from posttrain.operator.leader import LEASE_NAME
from posttrain.operator.metrics import OperatorMetrics

CHART = REPO / "charts" / "posttrain"
CI = CHART / "ci"
NAMESPACE = "posttrain-system"
RELEASE = "posttrain"
KUBE_VERSIONS = ("1.28.0", "1.33.0")
MONITORING_GROUP = "monitoring.coreos.com/v1"


def _exported(registry: Any) -> set[str]:
    """The series names a prometheus-client registry exposes, labelled children or not."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}


# What the operator and the driver really export; the alerts and the dashboard may use nothing else.
OPERATOR_METRICS = _exported(OperatorMetrics().registry)
DRIVER_METRICS = _exported(DriverMetrics(RunState(job="j", algorithm="grpo")).registry)
NAMESPACED_RULES = [  # exactly the calls of operator/kube.py and kopf's watches
    {"apiGroups": ["posttrain.dev"], "resources": ["posttrainingjobs"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["posttrain.dev"], "resources": ["posttrainingjobs/status"], "verbs": ["patch"]},
    {"apiGroups": ["posttrain.dev"], "resources": ["posttrainingjobs/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create"]},
    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "list"]},
]
CRD_READ = {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}
NAMESPACE_READ = {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]}

# name -> (values files under ci/, serve monitoring.coreos.com/v1)
SCENARIOS = {
    "default": ((), False),
    "namespaced": (("namespaced-values.yaml",), False),
    "ha": (("ha-values.yaml",), False),
    "monitoring-on": (("monitoring-values.yaml",), True),
    "monitoring-no-api": (("monitoring-values.yaml",), False),
    "namespaced-monitoring": (("namespaced-values.yaml", "monitoring-values.yaml"), True),
}


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: run `bash scripts/install-test-tools.sh`")
    return found


def _run(*cmd: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if ok and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@functools.lru_cache(maxsize=None)
def _template(values: tuple[str, ...] = (), api: bool = False, sets: tuple[str, ...] = (),
              kube: str = KUBE_VERSIONS[-1], crds: bool = False, chart: Path = CHART) -> tuple[dict, ...]:
    cmd = [_tool("helm"), "template", RELEASE, str(chart), "-n", NAMESPACE, "--kube-version", kube]
    cmd += [a for v in values for a in ("-f", str(CI / v))] + [a for s in sets for a in ("--set", s)]
    cmd += ["--api-versions", MONITORING_GROUP] if api else []
    cmd += ["--include-crds"] if crds else []
    return tuple(d for d in yaml.safe_load_all(_run(*cmd).stdout) if d)


def render(scenario: str = "default", *, sets: tuple[str, ...] = (), api: bool | None = None, **kw: Any) -> list[dict]:
    """The scenario's documents; `api` overrides whether monitoring.coreos.com/v1 is served."""
    values, scenario_api = SCENARIOS[scenario]
    return copy.deepcopy(list(_template(values, scenario_api if api is None else api, sets, **kw)))  # tests may edit


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    [doc] = find(docs, kind, name)
    return doc


def container(docs: list[dict]) -> dict:
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def promtool_check(tmp_path: Path, groups: list[dict]) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    _run(_tool("promtool"), "check", "rules", str(path))


# ---------------------------------------------------------------------------------------------
# Lint, render, validate


@pytest.mark.parametrize("values", [(), *((v,) for v in sorted(p.name for p in CI.glob("*.yaml")))])
def test_helm_lint_strict(values):
    _run(_tool("helm"), "lint", "--strict", str(CHART), *[a for v in values for a in ("-f", str(CI / v))])


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_core_kinds_validate_strictly(scenario, kube):
    docs = render(scenario, kube=kube, crds=True)
    assert one(docs, "CustomResourceDefinition")["metadata"]["name"] == "posttrainingjobs.posttrain.dev"
    errors = []
    for doc in docs:
        label = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"].startswith("Cluster") and "namespace" in doc["metadata"]:
            errors.append(f"{label}: metadata.namespace set on a cluster-scoped kind")
        errors += [f"{label}: label {k}={v!r} is not a valid label value"
                   for k, v in doc["metadata"].get("labels", {}).items()
                   if not re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", v) or len(v) > 63]
        if doc["apiVersion"] == MONITORING_GROUP:
            continue
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{label}: {e.message} at {'.'.join(map(str, e.absolute_path))}")
    assert not errors, "\n".join(errors)


# The Prometheus Operator's kinds, written out for what this chart uses (field names from its
# monitoring.coreos.com/v1 API); unknown fields are errors, as they would be on the server.
_STR, _BOOL, _STRS = {"type": "string"}, {"type": "boolean"}, {"type": "array", "items": {"type": "string"}}
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_LABELS = {"type": "object", "additionalProperties": _STR}
_RELABELINGS = {"type": "array", "items": {"type": "object", "additionalProperties": False, "properties": {
    k: _STR for k in ("action", "regex", "replacement", "separator", "targetLabel")} | {
    "sourceLabels": _STRS, "modulus": {"type": "integer"}}}}
_SELECTOR = {"type": "object", "additionalProperties": False, "minProperties": 1, "properties": {
    "matchLabels": _LABELS, "matchExpressions": {"type": "array"}}}
_NS_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {"any": _BOOL, "matchNames": _STRS}}


def _endpoint(port_key: str) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["port"], "properties": {
        "port": _STR, "path": _STR, "interval": _DURATION, "scrapeTimeout": _DURATION, "honorLabels": _BOOL,
        "relabelings": _RELABELINGS, "metricRelabelings": _RELABELINGS}}


def _kind_schema(spec: dict) -> dict:
    metadata = {"type": "object", "required": ["name", "namespace"], "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}, "labels": _LABELS}}
    return {"type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": MONITORING_GROUP}, "kind": _STR, "metadata": metadata, "spec": spec}}


MONITORING_SCHEMAS = {
    "ServiceMonitor": _kind_schema({"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
                                    "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR,
                                                   "endpoints": {"type": "array", "minItems": 1, "items": _endpoint("port")}}}),
    "PodMonitor": _kind_schema({"type": "object", "additionalProperties": False, "required": ["selector", "podMetricsEndpoints"],
                                "properties": {"selector": _SELECTOR, "namespaceSelector": _NS_SELECTOR, "podTargetLabels": _STRS,
                                               "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": _endpoint("port")}}}),
    "PrometheusRule": _kind_schema({"type": "object", "additionalProperties": False, "required": ["groups"], "properties": {
        "groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["name", "rules"],
            "properties": {"name": _STR, "interval": _DURATION, "rules": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["expr"],
                "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                "properties": {"alert": _STR, "record": _STR, "expr": _STR, "for": _DURATION,
                               "keep_firing_for": _DURATION, "labels": _LABELS, "annotations": _LABELS}}}}}}}}),
}


@pytest.mark.parametrize("scenario", ["monitoring-on", "namespaced-monitoring"])
def test_monitoring_kinds_have_the_prometheus_operator_structure(scenario):
    docs = [d for d in render(scenario) if d["apiVersion"] == MONITORING_GROUP]
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for doc in docs:
        jsonschema.validate(doc, MONITORING_SCHEMAS[doc["kind"]])
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_nothing_monitoring_renders_without_the_api_or_when_disabled():
    assert not [d for d in render("monitoring-no-api") if d["apiVersion"] == MONITORING_GROUP]
    off = render("default", api=True)
    assert not [d for d in off if d["apiVersion"] == MONITORING_GROUP] and not find(off, "ConfigMap")
    # The dashboard is a plain ConfigMap: it needs no Prometheus Operator.
    assert one(render("monitoring-no-api"), "ConfigMap", f"{RELEASE}-dashboard")


def test_kube_version_below_1_28_is_refused():
    assert "1.28.0" in yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    proc = _run(_tool("helm"), "template", RELEASE, str(CHART), "--kube-version", "1.27.9", ok=False)
    assert proc.returncode != 0 and "kubeVersion" in proc.stderr


def test_crd_ships_unchanged_from_crds_folder():
    [crd_file] = (CHART / "crds").glob("*.yaml")
    assert one(render(crds=True), "CustomResourceDefinition") == yaml.safe_load(crd_file.read_text())
    assert not find(render(), "CustomResourceDefinition")  # helm installs crds/ itself, templates never


# ---------------------------------------------------------------------------------------------
# One test per template


def test_deployment_runs_hardened_with_probes_and_the_operator_contract():
    docs = render()
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert c["command"] == ["posttrain-operator"] and c["args"] == ["run"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] > 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {v["name"]: "emptyDir" in v for v in pod["volumes"]} == {"tmp": True}
    assert set(c["resources"]["requests"]) == {"cpu", "memory"}
    assert c["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env == {
        "POSTTRAIN_WATCH_NAMESPACES": "", "POSTTRAIN_RUNTIME_IMAGE": "ghcr.io/posttrain/runtime:0.1.0",
        "POSTTRAIN_METRICS_PORT": "8080", "POSTTRAIN_PROGRESS_INTERVAL": "10", "POSTTRAIN_LOG_LEVEL": "info",
        "POSTTRAIN_LEADER_ELECTION": "true", "POSTTRAIN_JOB_TMP_SIZE_LIMIT": "64Gi",
        "POSTTRAIN_JOB_NETWORK_POLICY": env["POSTTRAIN_JOB_NETWORK_POLICY"],
        "POSTTRAIN_LEADER_ELECTION_NAMESPACE": {"fieldRef": {"fieldPath": "metadata.namespace"}},
        "POSTTRAIN_POD_NAME": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    assert c["image"] == "ghcr.io/posttrain/operator:0.1.0"
    # No surge pod: it would wait for the Lease that the pod it replaces holds.
    assert one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_job_network_policy_admits_this_operators_pods_and_can_be_turned_off():
    from posttrain.operator.network import NetworkPolicySettings, build_networkpolicy

    docs = render()
    env = {e["name"]: e.get("value") for e in container(docs)["env"]}
    settings = NetworkPolicySettings.from_json(json.loads(env["POSTTRAIN_JOB_NETWORK_POLICY"]))
    policy = build_networkpolicy("tune", "ml", owner_uid="u", settings=settings)
    operator_rule = policy["spec"]["ingress"][1]
    [peer] = operator_rule["from"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items(), "selects the operator's pods"
    assert operator_rule["ports"] == [{"protocol": "TCP", "port": vocab.DRIVER_METRICS_PORT}]
    kuberay = policy["spec"]["ingress"][3]
    assert kuberay["from"][0]["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    off = {e["name"]: e.get("value") for e in container(render(sets=("jobs.networkPolicy.enabled=false",)))["env"]}
    assert NetworkPolicySettings.from_json(json.loads(off["POSTTRAIN_JOB_NETWORK_POLICY"])) is None
    sized = {e["name"]: e.get("value") for e in container(render(sets=("jobs.tmpSizeLimit=200Gi",)))["env"]}
    assert sized["POSTTRAIN_JOB_TMP_SIZE_LIMIT"] == "200Gi"


def test_deployment_namespaced_and_ha_settings():
    c = container(render("namespaced"))
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["POSTTRAIN_WATCH_NAMESPACES"] == "team-a,team-b" and env["HTTPS_PROXY"]
    assert env["POSTTRAIN_RUNTIME_IMAGE"] == "registry.internal/posttrain/runtime:0.1.0-cu128"
    assert c["image"].startswith("registry.internal/posttrain/operator@sha256:")
    ha = one(render("ha"), "Deployment")
    pod = ha["spec"]["template"]["spec"]
    assert ha["spec"]["replicas"] == 3 and pod["priorityClassName"] == "system-cluster-critical"
    [spread] = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == ha["spec"]["selector"]["matchLabels"]
    assert "topologySpreadConstraints" not in one(render(), "Deployment")["spec"]["template"]["spec"]


def test_values_the_schema_cannot_catch_fail_the_render_with_a_hint():
    helm = _tool("helm")
    bad = {"replicaCount=2,leaderElection.enabled=false": "set leaderElection.enabled=true",
           "operator.watchNamespaces={a,a}": "lists a namespace twice",
           "monitoring.prometheusRule.enabled=true,monitoring.prometheusRule.jobStalled.noProgressFor=soon": "noProgressFor",
           "operator.logLevel=loud": "logLevel", "replicas=2": "Additional property replicas"}
    for sets, hint in bad.items():
        proc = _run(helm, "template", RELEASE, str(CHART), "--api-versions", MONITORING_GROUP, "--set", sets, ok=False)
        assert proc.returncode != 0 and hint in proc.stderr, (sets, proc.stderr)


def test_serviceaccount():
    sa = one(render("namespaced"), "ServiceAccount")
    assert sa["metadata"]["name"] == "posttrain-controller" and sa["metadata"]["annotations"]
    docs = render(sets=("serviceAccount.create=false",))
    assert not find(docs, "ServiceAccount")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "default"


def _subjects_are_the_operator(binding: dict, sa: str = RELEASE) -> bool:
    return binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]


def test_clusterrole_watch_all_has_exactly_the_operators_rules():
    docs = render()
    role = one(docs, "ClusterRole", RELEASE)
    assert role["rules"] == [CRD_READ, NAMESPACE_READ, *NAMESPACED_RULES]
    binding = one(docs, "ClusterRoleBinding", RELEASE)
    assert binding["roleRef"]["name"] == RELEASE and _subjects_are_the_operator(binding)
    assert not find(docs, "Role", RELEASE) and not find(docs, "RoleBinding", RELEASE)


def test_role_per_watched_namespace_and_only_crd_read_cluster_wide():
    docs = render("namespaced")
    assert one(docs, "ClusterRole", RELEASE)["rules"] == [CRD_READ]
    roles = find(docs, "Role", RELEASE)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert all(r["rules"] == NAMESPACED_RULES for r in roles)
    bindings = find(docs, "RoleBinding", RELEASE)
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    assert all(_subjects_are_the_operator(b, "posttrain-controller") for b in bindings)
    assert not any("*" in str(r["rules"]) for r in find(docs, "Role") + find(docs, "ClusterRole"))


def test_leader_election_role_is_limited_to_the_lease():
    docs = render()
    role = one(docs, "Role", f"{RELEASE}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": [LEASE_NAME], "verbs": ["get", "update"]}]
    assert _subjects_are_the_operator(one(docs, "RoleBinding", f"{RELEASE}-leader-election"))
    assert not find(render(sets=("leaderElection.enabled=false",)), "Role")
    assert not [d for d in render(sets=("rbac.create=false",)) if d["apiVersion"].startswith("rbac.")]


def test_aggregate_roles_extend_admin_edit_and_view():
    docs = render()
    edit, view = one(docs, "ClusterRole", f"{RELEASE}-edit"), one(docs, "ClusterRole", f"{RELEASE}-view")
    assert {"rbac.authorization.k8s.io/aggregate-to-edit", "rbac.authorization.k8s.io/aggregate-to-admin"} <= set(edit["metadata"]["labels"])
    assert "rbac.authorization.k8s.io/aggregate-to-view" in view["metadata"]["labels"]
    assert {v for r in view["rules"] for v in r["verbs"]} == {"get", "list", "watch"}
    assert not find(render("namespaced"), "ClusterRole", f"{RELEASE}-view")


def test_service_selects_the_operator_pods_metrics_port():
    docs = render()
    svc = one(docs, "Service", f"{RELEASE}-metrics")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"] == [{"name": "http-metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]


def test_poddisruptionbudget_only_with_several_replicas():
    assert not find(render(), "PodDisruptionBudget")
    pdb = one(render("ha"), "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2 and pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["spec"]["selector"]["matchLabels"] == one(render("ha"), "Deployment")["spec"]["selector"]["matchLabels"]


def test_servicemonitor_scrapes_the_metrics_service():
    docs = render("monitoring-on")
    sm, svc = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [ep] = sm["spec"]["endpoints"]
    assert ep["port"] == svc["spec"]["ports"][0]["name"] and ep["path"] == "/metrics" and ep["honorLabels"]
    assert ep["metricRelabelings"][0]["action"] == "drop"


def test_podmonitor_selects_job_head_pods_in_the_watched_namespaces():
    pm = one(render("monitoring-on"), "PodMonitor")
    assert pm["metadata"]["namespace"] == "monitoring"
    assert pm["spec"]["selector"] == {"matchLabels": {vocab.LABEL_COMPONENT: "head"}}
    assert pm["spec"]["namespaceSelector"] == {"any": True} and pm["spec"]["podTargetLabels"] == [vocab.LABEL_JOB]
    [ep] = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] == vocab.DRIVER_METRICS_PORT_NAME and ep["path"] == "/metrics" and ep["honorLabels"]
    scoped = one(render("namespaced-monitoring"), "PodMonitor")
    assert scoped["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


# ---------------------------------------------------------------------------------------------
# PrometheusRule: promtool check rules, promtool test rules


def _rule_groups(scenario: str = "default", sets: tuple[str, ...] = ("monitoring.prometheusRule.enabled=true",)) -> list[dict]:
    return one(render(scenario, sets=sets, api=True), "PrometheusRule")["spec"]["groups"]


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(posttrain_[a-z_]+)", expr))


def test_prometheusrule_passes_promtool_check_rules(tmp_path):
    groups = _rule_groups("monitoring-on", ())
    alerts = {r.get("alert") for g in groups for r in g["rules"]}
    assert alerts == {"PostTrainingJobFailed", "PostTrainingJobStalled", "PostTrainingJobRestartsExhausted",
                      "PostTrainingJobPreferenceMarginNegative",
                      "PostTrainingOperatorDown", "PostTrainingOperatorNoLeader", "PostTrainingOperatorReconcileErrors",
                      "PostTrainingJobSlow"}
    assert all(r["labels"]["team"] == "ml-platform" for g in groups for r in g["rules"] if r["alert"] != "PostTrainingJobSlow")
    assert "> 2700" in next(r["expr"] for g in groups for r in g["rules"] if r["alert"] == "PostTrainingJobStalled")
    for rule in (r for g in groups for r in g["rules"]):
        unknown = _metric_names(rule["expr"]) - OPERATOR_METRICS - DRIVER_METRICS
        assert not unknown, f"{rule['alert']}: metrics no component exports: {unknown}"
    promtool_check(tmp_path, groups)


def test_alerts_switch_off_one_by_one_without_leaving_an_empty_group(tmp_path):
    off = tuple(f"monitoring.prometheusRule.{k}.enabled=false"
                for k in ("jobFailed", "jobStalled", "restartsExhausted", "preferenceMarginNegative", "operatorDown",
                          "reconcileErrors"))
    assert not find(render(sets=("monitoring.prometheusRule.enabled=true", *off), api=True), "PrometheusRule")
    groups = _rule_groups("default", ("monitoring.prometheusRule.enabled=true", *off[:4]))
    assert [g["name"] for g in groups] == ["posttrain.operator"]
    promtool_check(tmp_path, groups)


def _series(metric: str, values: str, **labels: str) -> dict:
    labels = {"job": f"{RELEASE}-metrics", **labels}
    return {"series": metric + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}", "values": values}


def test_alerts_fire_on_synthetic_series(tmp_path):
    groups = _rule_groups()
    for rule in (r for g in groups for r in g["rules"]):
        if rule["alert"] != "PostTrainingJobStalled":  # its annotations are checked below, the rest by promtool check
            rule.pop("annotations")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    job = {"namespace": "team-a"}
    tests = [
        {"interval": "1m", "input_series": [  # grpo stops progressing at t=0; sft moves every minute; dpo fails at 5m
            _series("posttrain_operator_job_phase", "1x60", name="grpo", phase="Running", **job),
            _series("posttrain_operator_job_last_progress_time_seconds", "0x60", name="grpo", **job),
            _series("posttrain_operator_job_phase", "1x60", name="sft", phase="Running", **job),
            _series("posttrain_operator_job_last_progress_time_seconds", "0+60x60", name="sft", **job),
            _series("posttrain_operator_job_phase", "0x4 1x55", name="dpo", phase="Failed", **job)],
         "alert_rule_test": [
            {"eval_time": "34m", "alertname": "PostTrainingJobStalled", "exp_alerts": []},
            {"eval_time": "40m", "alertname": "PostTrainingJobStalled", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "name": "grpo", **job}, "exp_annotations": {
                    "summary": "PostTrainingJob team-a/grpo makes no progress.",
                    "description": "The job is Running but its step has not increased for 30m (last step 40m 0s ago)."
                                   " Look at the driver's log on the Ray head pod: kubectl -n team-a logs"
                                   " -l posttrain.dev/job=grpo,posttrain.dev/component=head"}}]},
            {"eval_time": "4m", "alertname": "PostTrainingJobFailed", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "PostTrainingJobFailed", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "name": "dpo", **job}}]}]},
        {"interval": "1m", "input_series": [  # a dpo job's margin is negative from 10m; an sft job has none
            {"series": 'posttrain_rewards_margin{job="pref",algorithm="dpo",namespace="team-a"}',
             "values": "0.1x9 -0.2x60"},
            {"series": 'posttrain_loss{job="sft",algorithm="sft",namespace="team-a"}', "values": "1x60"}],
         "alert_rule_test": [
            {"eval_time": "30m", "alertname": "PostTrainingJobPreferenceMarginNegative", "exp_alerts": []},
            {"eval_time": "45m", "alertname": "PostTrainingJobPreferenceMarginNegative", "exp_alerts": [
                {"exp_labels": {"severity": "warning", "job": "pref", **job}}]}]},
        {"interval": "1m", "input_series": [  # the only replica goes down at 11m and its leader gauge with it
            _series("up", "1x10 0x30", instance="a"),
            _series("posttrain_operator_leader", "1x10 0x30", instance="a")],
         "alert_rule_test": [
            {"eval_time": "10m", "alertname": "PostTrainingOperatorDown", "exp_alerts": []},
            {"eval_time": "20m", "alertname": "PostTrainingOperatorDown", "exp_alerts": [
                {"exp_labels": {"severity": "critical"}}]},
            {"eval_time": "20m", "alertname": "PostTrainingOperatorNoLeader", "exp_alerts": [
                {"exp_labels": {"severity": "critical"}}]}]},
        {"interval": "1m", "input_series": [  # a third of reconciles fail; one job runs out of restarts at 11m
            _series("posttrain_operator_reconcile_total", "0+10x60", result="success"),
            _series("posttrain_operator_reconcile_total", "0+5x60", result="error"),
            _series("posttrain_operator_reconcile_total", "0x60", result="retry"),
            _series("posttrain_operator_restarts_exhausted_total", "0x10 1x50")],
         "alert_rule_test": [
            {"eval_time": "10m", "alertname": "PostTrainingOperatorReconcileErrors", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "PostTrainingOperatorReconcileErrors", "exp_alerts": [
                {"exp_labels": {"severity": "warning"}}]},
            {"eval_time": "12m", "alertname": "PostTrainingJobRestartsExhausted", "exp_alerts": [
                {"exp_labels": {"severity": "warning"}}]},
            {"eval_time": "40m", "alertname": "PostTrainingJobRestartsExhausted", "exp_alerts": []}]},
        {"interval": "1m", "input_series": [  # a healthy operator: nothing fires
            _series("up", "1x60", instance="a"), _series("posttrain_operator_leader", "1x60", instance="a"),
            _series("posttrain_operator_reconcile_total", "0+10x60", result="success"),
            _series("posttrain_operator_reconcile_total", "0x60", result="error"),
            _series("posttrain_operator_restarts_exhausted_total", "0x60")],
         "alert_rule_test": [{"eval_time": "50m", "alertname": a, "exp_alerts": []} for a in (
            "PostTrainingOperatorDown", "PostTrainingOperatorNoLeader", "PostTrainingOperatorReconcileErrors",
            "PostTrainingJobRestartsExhausted")]},
    ]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(
        {"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    _run(_tool("promtool"), "test", "rules", str(tmp_path / "tests.yaml"))


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


def _dashboard() -> tuple[dict, dict]:
    cm = one(render("monitoring-on"), "ConfigMap", f"{RELEASE}-dashboard")
    [(name, text)] = cm["data"].items()
    assert name.endswith(".json")
    return cm, json.loads(text)


def test_grafana_dashboard_configmap_carries_the_sidecar_label():
    cm, dash = _dashboard()
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring" and cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}
    relabelled = one(render(sets=("monitoring.grafanaDashboard.enabled=true",
                                  "monitoring.grafanaDashboard.sidecarLabel=dashboards",
                                  "monitoring.grafanaDashboard.sidecarLabelValue=posttrain")), "ConfigMap")
    assert relabelled["metadata"]["labels"]["dashboards"] == "posttrain"
    assert dash["uid"] and {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace", "ptj"}


def _queries(dash: dict) -> dict[str, str]:
    queries = {f"{p['title']} [{t['refId']}]": t["expr"]
               for p in dash["panels"] if p["type"] != "row" for t in p["targets"]}
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            queries[f"${var['name']}"] = re.fullmatch(r"label_values\((.+), *\w+\)", var["query"]["query"]).group(1)
    return queries


def test_grafana_dashboard_queries_parse_with_promtool(tmp_path):
    _, dash = _dashboard()
    grafana_vars = {"$namespace": ".*", "$ptj": ".*", "$__rate_interval": "5m"}
    rules = []
    for i, (title, expr) in enumerate(_queries(dash).items()):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown dashboard variable in {expr}"
        unknown = _metric_names(expr) - OPERATOR_METRICS - DRIVER_METRICS
        assert not unknown, f"{title}: metrics no component exports: {unknown}"
        rules.append({"record": f"posttrain:dashboard_query_{i}", "expr": expr})
    promtool_check(tmp_path, [{"name": "dashboard", "rules": rules}])


def test_grafana_dashboard_covers_what_operators_look_for():
    _, dash = _dashboard()
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)
    used = set().union(*(_metric_names(e) for e in _queries(dash).values()))
    for metric in ("posttrain_operator_job_phase", "posttrain_operator_jobs", "posttrain_operator_job_step",
                   "posttrain_reward_mean", "posttrain_kl", "posttrain_loss", "posttrain_tokens_per_second",
                   "posttrain_operator_job_restarts", "posttrain_operator_restarts_total",
                   "posttrain_operator_reconcile_duration_seconds_bucket", "posttrain_rewards_accuracy",
                   "posttrain_eval_rewards_accuracy", "posttrain_rewards_margin"):
        assert metric in used, metric
    for x, w in ((p["gridPos"]["x"], p["gridPos"]["w"]) for p in panels):
        assert 0 <= x and x + w <= 24


# ---------------------------------------------------------------------------------------------
# NOTES.txt, values.yaml, values.schema.json, README


@pytest.fixture(scope="module")
def notes_chart(tmp_path_factory) -> Path:
    """A copy of the chart in which NOTES.txt also renders into a ConfigMap (`helm template` skips NOTES)."""
    chart = tmp_path_factory.mktemp("notes") / "posttrain"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes_under_test.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "{{- end -}}\n")
    (chart / "templates" / "notes-under-test.yaml").write_text(
        'apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: {{ include "test.notes" . | quote }}\n')
    return chart


def _notes(chart: Path, scenario: str) -> str:
    return one(render(scenario, chart=chart), "ConfigMap", "notes")["data"]["notes"]


def test_notes_say_to_apply_crds_before_upgrading_and_warn_without_the_api(notes_chart):
    notes = _notes(notes_chart, "default")
    assert "apply the new CRD first" in notes and "kubectl apply --server-side" in notes
    assert "every namespace" in notes and "WARNING" not in notes
    assert "team-a, team-b" in _notes(notes_chart, "namespaced")
    assert "WARNING" in _notes(notes_chart, "monitoring-no-api")
    on = _notes(notes_chart, "monitoring-on")
    assert "WARNING" not in on and "PrometheusRule" in on and "grafana_dashboard=1" in on


def _values_keys() -> list[tuple[tuple[str, ...], bool]]:
    """(path, has a `# --` comment) for every mapping key in values.yaml, read line by line."""
    keys, stack, comments = [], [], []
    for line in (CHART / "values.yaml").read_text().splitlines():
        stripped = line.strip()
        if not stripped:
            comments = []
        elif stripped.startswith("#"):
            comments.append(stripped)
        elif m := re.match(r"^( *)([A-Za-z0-9_.\-/]+):( |$)", line):
            indent = len(m.group(1))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m.group(2)))
            keys.append((tuple(k for _, k in stack), any(c.startswith("# --") for c in comments)))
            comments = []
        else:
            comments = []
    return keys


def _schema_node(schema: dict, path: tuple[str, ...]) -> dict | None:
    """The schema of `path`, or None when it sits inside a free-form object (a Kubernetes passthrough)."""
    node = schema
    for key in path:
        if "properties" not in node:
            return None
        node = node["properties"].get(key, {"unknown": True})
    return node


def test_every_value_is_described_and_in_the_schema():
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(yaml.safe_load((CHART / "values.yaml").read_text()), schema)
    seen = set()
    for path, described in _values_keys():
        node = _schema_node(schema, path)
        if node is None:
            continue  # inside a passthrough object (resources, securityContext, ...): described as a whole
        seen.add(path)
        assert "unknown" not in node, f"{'.'.join(path)} is in values.yaml but not in values.schema.json"
        assert described, f"{'.'.join(path)} has no `# --` description in values.yaml"
        assert node.get("description"), f"{'.'.join(path)} has no description in values.schema.json"

    def schema_paths(node: dict, prefix: tuple[str, ...]):
        for key, sub in node.get("properties", {}).items():
            yield prefix + (key,)
            if sub.get("type") == "object":
                yield from schema_paths(sub, prefix + (key,))
    missing = [".".join(p) for p in schema_paths(schema, ()) if p not in seen and p != ("global",)]
    assert not missing, f"in values.schema.json but not in values.yaml: {missing}"


def test_readme_documents_every_value_and_the_crd_upgrade_step():
    readme = (CHART / "README.md").read_text()
    assert "helm show crds" in readme and "kubectl apply --server-side" in readme
    schema = json.loads((CHART / "values.schema.json").read_text())
    undocumented = [".".join(p) for p, _ in _values_keys()
                    if _schema_node(schema, p) is not None and f"`{'.'.join(p)}`" not in readme]
    assert not undocumented, f"values missing from charts/posttrain/README.md: {undocumented}"
