"""What KubeRay v1.7 makes of a RayCluster spec's pod templates, as pure functions (clusterbox's builder).

Each function follows one piece of `ray-operator/controllers/ray/common/pod.go` (KubeRay v1.7.0):
`ray_start_command` = `setMissingRayStartParams` + `generateRayStartCommand` + `convertParamMap` (the
flags go through a bash command line, so `rayStartParams.resources`, which our builder JSON-encodes
twice, reaches `ray start` as a plain JSON object after the shell strips one level of quoting);
`kuberay_env` = `setContainerEnvVars`; `with_token_auth` = `configureTokenAuth` /
`SetContainerTokenAuthEnvVars`. Where one host stands in for many pods, `node_ports` adds what a real
pod does not need: its own ports, and 127.0.0.1 as its address.

No I/O here: `clusterbox` starts processes from what these return.
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from typing import Any

HEAD_GROUP = "headgroup"  # KubeRay's ray.io/group label value of the head pod
AUTH_SECRET_KEY = "auth_token"  # utils.RAY_AUTH_TOKEN_SECRET_KEY
DEFAULT_METRICS_PORT = "8080"  # utils.DefaultMetricsPort
DEFAULT_AGENT_LISTEN_PORT = "52365"  # utils.DefaultDashboardAgentListenPort
# `ray start` flags that KubeRay passes as --flag=false instead of dropping (convertParamMap).
_BOOL_VALUED = ("log-color", "include-dashboard", "include-log-monitor")
PORTS_PER_POD = 128  # a block of host ports per pod: 16 for Ray's fixed ports, the rest for its workers
_FIXED = 16


class Unsupported(ValueError):
    """The manifest uses something clusterbox does not model (the message names the field)."""


def check_name(name: str) -> str:
    """KubeRay's `utils.CheckName`: the Secret name it derives from a RayCluster name."""
    if len(name) > 50:
        name = name[len(name) - 50:]
    if name[0].isdigit() or not (name[0].isalnum()):
        name = "r" + name[1:]
    return name


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity as a number: '500m' -> 0.5, '8Gi' -> 8589934592."""
    text = str(value).strip()
    m = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([a-zA-Z]*)", text)
    if not m:
        raise Unsupported(f"not a Kubernetes quantity: {value!r}")
    number, suffix = float(m.group(1)), m.group(2)
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    decimal = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
    if suffix in binary:
        return number * binary[suffix]
    if suffix in decimal:
        return number * decimal[suffix]
    raise Unsupported(f"unknown quantity suffix in {value!r}")


def _param_flags(params: dict[str, str]) -> str:
    """`convertParamMap`: sorted ` --key=value ` flags; "true" becomes a bare switch, "false" is dropped."""
    out = []
    for key in sorted(params):
        value = str(params[key])
        if value.lower() in ("true", "false") and key not in _BOOL_VALUED:
            if value.lower() == "true":
                out.append(f" --{key} ")
        else:
            out.append(f" --{key}={value} ")
    return "".join(out)


def ray_start_command(params: dict[str, str], *, head: bool, resources: dict[str, Any],
                      head_address: str | None) -> str:
    """The `ray start` command KubeRay generates for one pod (before `node_ports` is merged in)."""
    params = {k: str(v) for k, v in params.items()}
    if not head:
        params.setdefault("address", head_address or "")
    else:
        params.setdefault("dashboard-host", "0.0.0.0")
    params.setdefault("metrics-export-port", DEFAULT_METRICS_PORT)
    params["block"] = "true"
    params.setdefault("dashboard-agent-listen-port", DEFAULT_AGENT_LISTEN_PORT)
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    if "num-cpus" not in params:
        cpu = limits.get("cpu") or requests.get("cpu")
        if cpu is not None and quantity(cpu) > 0:
            params["num-cpus"] = str(math.ceil(quantity(cpu)))  # resource.Quantity.Value() rounds up
    if "memory" not in params and limits.get("memory") is not None:
        params["memory"] = str(math.ceil(quantity(limits["memory"])))
    if "num-gpus" not in params and limits.get("nvidia.com/gpu") is not None:
        params["num-gpus"] = str(math.ceil(quantity(limits["nvidia.com/gpu"])))
    return ("ray start --head" if head else "ray start") + _param_flags(params)


def node_ports(base: int, *, head: bool) -> dict[str, str]:
    """Ports for one pod from its block [base, base + PORTS_PER_POD): pods here share one network.

    Every node keeps Ray's own choice of address: the host's, the same for all pods.
    """
    names = ["node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port"]
    if head:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    ports = {name: str(base + i) for i, name in enumerate(names)}
    ports.update({"min-worker-port": str(base + _FIXED), "max-worker-port": str(base + PORTS_PER_POD - 1)})
    return ports


def with_ports(command: str, ports: dict[str, str]) -> str:
    """Replace or add the flags of `ports` in a generated `ray start` command."""
    for key, value in ports.items():
        flag = f" --{key}={value} "
        command, n = re.subn(rf" --{re.escape(key)}=\S+ ", flag, command)
        if not n:
            command += flag
    return command


def container_command(container: dict[str, Any], ray_start: str) -> list[str]:
    """`BuildPod`: `/bin/bash -c -- "ulimit ...; ray start ..."`, after the container's own command if any."""
    own = " ".join([*container.get("command", []), *container.get("args", [])]).strip()
    generated = f"ulimit -n ${{RAY_START_ULIMIT_OPEN_FILES:-65536}}; {ray_start}"
    if "ray start" in own:
        return [*container.get("command", ["/bin/bash", "-c", "--"]), *container.get("args", [])]
    return ["/bin/bash", "-c", "--", f"{own} && {generated}" if own else generated]


KEEP_IF_SET = ("RAY_PORT", "RAY_ADDRESS")  # KubeRay adds these only when the container does not set them


def kuberay_env(*, cluster: str, namespace: str, pod: str, group: str, head: bool, head_host: str,
                gcs_port: int, ray_start: str) -> list[dict[str, Any]]:
    """`setContainerEnvVars`: what KubeRay appends to the Ray container's env (values resolved)."""
    env = []
    if not head:
        env += [{"name": "FQ_RAY_IP", "value": head_host}, {"name": "RAY_IP", "value": head_host}]
    env += [
        {"name": "RAY_CLUSTER_NAME", "value": cluster},
        {"name": "RAY_CLUSTER_NAMESPACE", "value": namespace},
        {"name": "RAY_CLOUD_INSTANCE_ID", "value": pod},
        {"name": "RAY_NODE_TYPE_NAME", "value": group},
        {"name": "KUBERAY_GEN_RAY_START_CMD", "value": ray_start},
        {"name": "RAY_PORT", "value": str(gcs_port)},
        {"name": "RAY_ADDRESS", "value": f"{'127.0.0.1' if head else head_host}:{gcs_port}"},
        {"name": "RAY_USAGE_STATS_KUBERAY_IN_USE", "value": "1"},
        {"name": "RAY_DASHBOARD_ENABLE_K8S_DISK_USAGE", "value": "1"},
    ]
    return env


def auth_secret_name(cluster_spec: dict[str, Any], cluster: str) -> str | None:
    """The Secret holding the Ray token when `authOptions.mode` is token (`utils.IsAuthEnabled`), else None."""
    auth = cluster_spec.get("authOptions")
    if not auth or auth.get("mode") != "token":
        return None
    if auth.get("enableK8sTokenAuth"):
        raise Unsupported("rayClusterSpec.authOptions.enableK8sTokenAuth: Kubernetes-delegated auth is not modeled")
    return auth.get("secretName") or check_name(cluster)


def with_token_auth(container: dict[str, Any], secret: str) -> dict[str, Any]:
    """`SetContainerTokenAuthEnvVars`: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN from the Secret, unless set."""
    container = copy.deepcopy(container)
    env = container.setdefault("env", [])
    names = {e["name"] for e in env}
    if "RAY_AUTH_MODE" not in names:
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
    if "RAY_AUTH_TOKEN" not in names:
        env.append({"name": "RAY_AUTH_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": secret, "key": AUTH_SECRET_KEY}}})
    return container


def resolve_env(env: list[dict[str, Any]], *, secrets: dict[str, dict[str, str]],
                configmaps: dict[str, dict[str, str]], pod_fields: dict[str, str], where: str) -> dict[str, str]:
    """A container's `env` as the kubelet hands it over: later entries win; secrets and fields looked up."""
    out: dict[str, str] = {}
    for i, e in enumerate(env):
        path = f"{where}.env[{i}]"
        if "valueFrom" not in e:
            out[e["name"]] = str(e.get("value", ""))
            continue
        src = e["valueFrom"]
        if "secretKeyRef" in src or "configMapKeyRef" in src:
            kind, store = ("secretKeyRef", secrets) if "secretKeyRef" in src else ("configMapKeyRef", configmaps)
            ref = src[kind]
            value = (store.get(ref["name"]) or {}).get(ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                raise Unsupported(f"{path}.valueFrom.{kind}: no key {ref['key']!r} in {ref['name']!r} "
                                  f"(the pod would not start: CreateContainerConfigError)")
            out[e["name"]] = value
        elif "fieldRef" in src:
            field = src["fieldRef"]["fieldPath"]
            if field not in pod_fields:
                raise Unsupported(f"{path}.valueFrom.fieldRef: {field} is not modeled")
            out[e["name"]] = pod_fields[field]
        else:
            raise Unsupported(f"{path}.valueFrom: only secretKeyRef, configMapKeyRef and fieldRef are modeled")
    return out


def mount_plan(pod_spec: dict[str, Any], container: dict[str, Any], *, pod_dir: Path, pvcs: dict[str, Path],
               configmaps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]],
               where: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """(mounts in mount order, files to write first) for one container.

    Every pod gets a private /tmp and /dev/shm even where its spec mounts none: a container's
    image has its own. Mount order is by path depth, parents first, as the kubelet's runtime does.
    """
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    mounts: list[dict[str, Any]] = []
    files: dict[str, dict[str, str]] = {}
    for i, vm in enumerate(container.get("volumeMounts", [])):
        path = f"{where}.volumeMounts[{i}]"
        vol = volumes.get(vm["name"])
        if vol is None:
            raise Unsupported(f"{path}: no volume named {vm['name']!r} in the pod")
        if vm.get("subPath"):
            raise Unsupported(f"{path}.subPath is not modeled")
        folder = pod_dir / "volumes" / vm["name"]
        entry: dict[str, Any] = {"target": vm["mountPath"], "readOnly": bool(vm.get("readOnly"))}
        if "emptyDir" in vol:
            if (vol["emptyDir"] or {}).get("medium") == "Memory":
                entry["kind"] = "tmpfs"
            else:
                entry.update(kind="bind", source=str(folder))
                files.setdefault(str(folder), {})
        elif "persistentVolumeClaim" in vol:
            claim = vol["persistentVolumeClaim"]["claimName"]
            if claim not in pvcs:
                raise Unsupported(f"{path}: PersistentVolumeClaim {claim!r} has no host folder; pass "
                                  f"pvcs={{{claim!r}: Path(...)}} (on a cluster the pod would stay Pending)")
            entry.update(kind="bind", source=str(pvcs[claim]),
                         readOnly=entry["readOnly"] or bool(vol["persistentVolumeClaim"].get("readOnly")))
        elif "configMap" in vol or "secret" in vol:
            kind, name_key, store = (("configMap", "name", configmaps) if "configMap" in vol
                                     else ("secret", "secretName", secrets))
            ref = vol[kind]
            data = store.get(ref[name_key])
            if data is None:
                raise Unsupported(f"{path}: {kind} {ref[name_key]!r} does not exist (the pod would stay in "
                                  "ContainerCreating)")
            if ref.get("items"):
                data = {item["path"]: data[item["key"]] for item in ref["items"]}
            entry.update(kind="bind", source=str(folder), readOnly=True)  # the kubelet mounts them read-only
            files[str(folder)] = dict(data)
        else:
            raise Unsupported(f"{path}: volume {vm['name']!r} is of a kind clusterbox does not model "
                              f"({', '.join(k for k in vol if k != 'name')})")
        mounts.append(entry)
    targets = {m["target"] for m in mounts}
    if "/tmp" not in targets:
        folder = pod_dir / "volumes" / "container-tmp"
        mounts.append({"kind": "bind", "source": str(folder), "target": "/tmp", "readOnly": False})
        files.setdefault(str(folder), {})
    if "/dev/shm" not in targets:
        mounts.append({"kind": "tmpfs", "target": "/dev/shm", "readOnly": False})
    mounts.sort(key=lambda m: (m["target"].rstrip("/").count("/"), m["target"]))
    return mounts, files


def job_request(rayjob: dict[str, Any], submission_id: str) -> dict[str, Any]:
    """`ConvertRayJobToReq`: the body KubeRay POSTs to the dashboard's /api/jobs/ in HTTPMode."""
    spec = rayjob["spec"]
    body: dict[str, Any] = {"entrypoint": spec["entrypoint"], "submission_id": submission_id}
    if spec.get("metadata"):
        body["metadata"] = spec["metadata"]
    if spec.get("runtimeEnvYAML"):
        import yaml

        body["runtime_env"] = yaml.safe_load(spec["runtimeEnvYAML"])
    if spec.get("entrypointNumCpus"):
        body["entrypoint_num_cpus"] = spec["entrypointNumCpus"]
    if spec.get("entrypointNumGpus"):
        body["entrypoint_num_gpus"] = spec["entrypointNumGpus"]
    if spec.get("entrypointResources"):
        body["entrypoint_resources"] = json.loads(spec["entrypointResources"])
    return body
