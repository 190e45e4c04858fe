"""Cluster in a box: the Ray cluster of a rendered RayJob as real Ray nodes, one mount namespace per pod.

Every end-to-end test elsewhere runs the driver and its workers on one filesystem, so a file that
one pod writes to its own /tmp and another pod reads looks fine there. Here each pod of the RayJob
(head, and every replica of every worker group) is a real `ray start --block` node on this host's
network, in its own Linux mount and PID namespace, seeing only what its pod spec gives it.

Use it directly (a RayJob manifest in, a running cluster out):

    box = ClusterBox(tmp_path / "box", pvcs={"models": host_folder},        # claim name -> host folder
                     secrets={"hf": {"token": "..."}})                       # what secretKeyRef may read
    with box:
        cluster = box.start(rayjob, configmaps={"tune-spec": {"job.json": "..."}})
        job_id = cluster.submit(rayjob)                                      # POST /api/jobs/, as HTTPMode
        cluster.pod("trainer", 0).kill()                                     # lose a worker pod mid-run
        cluster.wait_job(job_id)["status"]                                   # 'FAILED'
    # leaving the box kills every pod's namespace and removes its folders (PVC folders stay)

or let `clusterbox_kuberay.KubeRay` play KubeRay against the API emulator (RayJob status
transitions, teardown, restarts by the operator), as tests/test_clusterbox_jobs.py does.

Modeled, after KubeRay v1.7 (`clusterbox_build` holds the pure parts):
- mount namespaces: a private /tmp (a fresh host folder, or the pod's own emptyDir at /tmp) with
  HOME=/tmp/home and the working directory there, a private /dev/shm, and the pod's volumes only:
  `persistentVolumeClaim` -> the host folder the test maps to that claim, bind-mounted at the
  mountPath; `configMap` / `secret` -> their data as files, read-only; `emptyDir` -> a fresh
  folder (`medium: Memory` -> tmpfs). Mount points are made inside the pod (copy-on-write), never
  on the host. The rest of the host's filesystem is the "image": the venv, the repository, /usr.
- a PID namespace per pod: `Pod.kill()` ends every process of the pod at once, as losing a node
  does; teardown leaves no raylet, gcs_server or worker behind (`Pod.processes()` checks).
- env: the container's `env` (plain values, `secretKeyRef` / `configMapKeyRef` from what the test
  passes, `fieldRef` of the pod's name, namespace and labels) over an image env (PATH with this
  venv first, this process's PYTHONPATH), plus what KubeRay injects (RAY_ADDRESS, RAY_CLUSTER_NAME,
  KUBERAY_GEN_RAY_START_CMD...).
- `ray start` from `rayStartParams` exactly as KubeRay writes it into `bash -c` (so `resources`
  must survive a shell), with num-cpus / memory / num-gpus from the container's limits; every pod
  then gets its own ports (GCS, dashboard, agent, metrics, object manager, worker range), because
  here all pods share one network namespace (and one address: Ray picks the host's for every node).
  Other ports of the head container (the driver's 8490) are used as they are and must be free.
- token auth: `rayClusterSpec.authOptions.mode: token` -> a Secret named after the cluster with
  key `auth_token` (generated unless the test passes it), RAY_AUTH_MODE=token and RAY_AUTH_TOKEN
  (secretKeyRef) on head and workers, and `x-ray-authorization: Bearer` on every dashboard call.
  Without it every node gets RAY_AUTH_MODE=disabled, so all nodes agree.
- HTTP submission: `spec.entrypoint` (with metadata, runtimeEnvYAML, entrypoint resources) POSTed
  to the head's dashboard, so the driver runs in the head's namespace as the job supervisor's child.

Not modeled: network isolation between pods (one loopback; NetworkPolicies have no effect here),
resource limits (num-cpus is what Ray is told, nothing enforces it), scheduling and node
selectors, image contents and the runtime image's user (pods run as root with this machine's
venv), `$(VAR)` expansion in env, restart of a dead pod (KubeRay would replace it; a lost pod stays
lost), readiness probes (ready = the head's dashboard lists every pod's node as ALIVE).

Needs root (or CAP_SYS_ADMIN) for `unshare`; `available()` says whether this machine can.
Keep a failed run's pod folders with CLUSTERBOX_KEEP=1 (each pod's log is `<pod dir>/container.log`,
its /tmp is `<pod dir>/volumes/...`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import clusterbox_build as build
from clusterbox_pod import Pod

PVC_ROOT = "/mnt/pvc"  # where the operator mounts claims (posttrain.operator.vocab.PVC_ROOT)
RAY_PORT_NAMES = ("gcs", "gcs-server", "dashboard", "client", "metrics")  # remapped per pod here
_PORT_LOW, _PORT_HIGH = 20000, 32000  # below Linux's ephemeral range, above Ray's default worker ports
_taken_blocks: set[int] = set()
_blocks_lock = threading.Lock()


def available() -> str | None:
    """None when this machine can make clusterbox pods, else why not."""
    if not shutil.which("unshare") or not shutil.which("nsenter"):
        return "util-linux's unshare and nsenter are not installed"
    probe = subprocess.run(["unshare", "--mount", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return None if probe.returncode == 0 else f"cannot make mount/PID namespaces: {probe.stderr.decode().strip()}"


def _port_block() -> int:
    """The first port of PORTS_PER_POD consecutive ports that nothing listens on."""
    size = build.PORTS_PER_POD
    for _ in range(200):
        base = _PORT_LOW + size * random.randrange((_PORT_HIGH - _PORT_LOW) // size)
        with _blocks_lock:
            if base in _taken_blocks:
                continue
            socks = []
            try:
                for port in range(base, base + size):
                    s = socket.socket()
                    socks.append(s)
                    s.bind(("0.0.0.0", port))
            except OSError:
                continue
            finally:
                for s in socks:
                    s.close()
            _taken_blocks.add(base)
            return base
    raise RuntimeError("no free block of ports between 20000 and 32000")


def image_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The env every container starts from (its image's ENV): this venv's PATH, offline hubs, no usage stats."""
    venv_bin = str(Path(sys.executable).parent)
    env = {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
           "HOME": "/tmp/home", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    # PYTHONPATH too: the pods run the same code as the test (the "image" is this venv and checkout).
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_USAGE_STATS_ENABLED",
                 "PYTHONPATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return {**env, **(extra or {})}


class RayCluster:
    """The pods of one RayCluster spec, started as Ray nodes; `submit` and `job_info` talk HTTP to the head."""

    def __init__(self, name: str, *, namespace: str, spec: dict[str, Any], folder: Path, box: ClusterBox,
                 configmaps: dict[str, dict[str, str]]) -> None:
        self.name, self.namespace, self.spec, self.folder = name, namespace, spec, folder
        self.box, self.configmaps = box, configmaps
        self.pods: list[Pod] = []
        self._closed = False
        self._lock = threading.Lock()  # teardown() and starting a pod never interleave
        self.token: str | None = None
        self.gcs_port = self.dashboard_port = 0
        self.auth_secret = build.auth_secret_name(spec, name)
        if self.auth_secret:
            self.token = box.secrets.setdefault(self.auth_secret, {build.AUTH_SECRET_KEY: _new_token()})[
                build.AUTH_SECRET_KEY]

    # --- pods ------------------------------------------------------------------------------------

    def _pod(self, *, group: str, index: int, template: dict[str, Any], params: dict[str, str]) -> Pod:
        head = group == build.HEAD_GROUP
        pod_name = f"{self.name}-head" if head else f"{self.name}-{group}-worker-{index}"
        folder = self.folder / pod_name
        spec = template.get("spec") or {}
        container = spec["containers"][0]
        if self.auth_secret:
            container = build.with_token_auth(container, self.auth_secret)
        where = ("headGroupSpec" if head else f"workerGroupSpecs[{group}]") + ".template.spec.containers[0]"
        base = _port_block()
        ports = build.node_ports(base, head=head)
        if head:
            self.gcs_port, self.dashboard_port = int(ports["port"]), int(ports["dashboard-port"])
        head_address = f"127.0.0.1:{self.gcs_port}"
        command = build.ray_start_command(params, head=head, resources=container.get("resources") or {},
                                          head_address=head_address)
        command = build.with_ports(command, ports)
        labels = {**((template.get("metadata") or {}).get("labels") or {}), "ray.io/cluster": self.name,
                  "ray.io/group": group, "ray.io/node-type": "head" if head else "worker"}
        fields = {"metadata.name": pod_name, "metadata.namespace": self.namespace,
                  **{f"metadata.labels['{k}']": v for k, v in labels.items()}}
        env = {**image_env(self.box.image_env), **({} if self.auth_secret else {"RAY_AUTH_MODE": "disabled"})}
        env.update(build.resolve_env(container.get("env", []), secrets=self.box.secrets, configmaps=self.configmaps,
                                     pod_fields=fields, where=where))
        for e in build.kuberay_env(cluster=self.name, namespace=self.namespace, pod=pod_name, group=group, head=head,
                                   head_host="127.0.0.1", gcs_port=self.gcs_port, ray_start=command):
            if e["name"] not in build.KEEP_IF_SET or e["name"] not in env:
                env[e["name"]] = e["value"]
        mounts, files = build.mount_plan(spec, container, pod_dir=folder, pvcs=self.box.pvcs,
                                         configmaps=self.configmaps, secrets=self.box.secrets, where=where)
        workdir = container.get("workingDir") or env["HOME"]
        plan = {"mounts": mounts, "env": env, "workdir": workdir, "mkdirs": [env["HOME"], workdir],
                "argv": build.container_command(container, command)}
        return Pod(pod_name, group=group, folder=folder, plan=plan, files=files, port_base=base)

    def start(self, *, timeout: float = 180) -> RayCluster:
        """Start the head, then (once its GCS answers, like KubeRay's wait-gcs-ready) every worker; wait for all."""
        head_spec = self.spec["headGroupSpec"]
        # Each pod joins self.pods as soon as it has ports, so that teardown() releases them.
        self.pods.append(self._pod(group=build.HEAD_GROUP, index=0, template=head_spec["template"],
                                   params=head_spec.get("rayStartParams") or {}))
        for g in self.spec.get("workerGroupSpecs") or []:
            # KubeRay's GetWorkerGroupDesiredReplicas: replicas within [minReplicas, maxReplicas]; 0 when suspended
            replicas = 0 if g.get("suspend") else max(g.get("minReplicas", 0), min(g.get("replicas", 1),
                                                                                   g.get("maxReplicas", 1 << 30)))
            for i in range(replicas):
                self.pods.append(self._pod(group=g["groupName"], index=i, template=g["template"],
                                           params=g.get("rayStartParams") or {}))
        head, workers = self.pods[0], self.pods[1:]
        for port in head_spec["template"]["spec"]["containers"][0].get("ports", []):
            if port.get("name") not in RAY_PORT_NAMES and _port_open(port["containerPort"]):
                raise RuntimeError(f"port {port['containerPort']} ({port.get('name')}) of the head container is in "
                                   "use on this host, and clusterbox pods share the host's network")
        deadline = time.monotonic() + timeout
        self._start_pod(head)
        self._wait(lambda: _port_open(self.gcs_port), deadline, "the head's GCS port")
        for pod in workers:
            self._start_pod(pod)
        self._wait(lambda: len(self.alive_nodes()) == len(self.pods), deadline,
                   f"{len(self.pods)} ALIVE Ray nodes")
        return self

    def _start_pod(self, pod: Pod) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"cluster {self.name} was torn down while starting")
            pod.start()

    def _wait(self, ready: Any, deadline: float, what: str) -> None:
        while True:
            if self._closed:
                raise RuntimeError(f"cluster {self.name} was torn down while waiting for {what}")
            dead = [p for p in self.pods if p.proc is not None and not p.running()]
            if dead:
                raise RuntimeError(f"pod {dead[0].name} exited while waiting for {what}:\n{dead[0].log()}")
            try:
                if ready():
                    return
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster {self.name}: no {what} in time; head log:\n{self.pods[0].log()}")
            time.sleep(0.5)

    def pod(self, group: str, index: int = 0) -> Pod:
        """`cluster.pod("head")` or the index-th replica of a worker group."""
        group = build.HEAD_GROUP if group == "head" else group
        return [p for p in self.pods if p.group == group][index]

    @property
    def head(self) -> Pod:
        return self.pods[0]

    def teardown(self) -> None:
        """Kill every pod (workers first), then remove the pods' folders unless CLUSTERBOX_KEEP=1."""
        with self._lock:
            self._closed = True
        try:
            for pod in reversed(self.pods):
                pod.kill()
        finally:
            for pod in self.pods:
                _release(pod.port_base)
        if os.environ.get("CLUSTERBOX_KEEP") != "1":
            shutil.rmtree(self.folder, ignore_errors=True)

    # --- the head's dashboard (HTTP, as KubeRay's dashboard client) -------------------------------

    @property
    def dashboard_url(self) -> str:
        return f"127.0.0.1:{self.dashboard_port}"  # what KubeRay puts in status.dashboardURL (host:port)

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 30,
                token: str | None = None) -> Any:
        """One dashboard call; the token goes in `x-ray-authorization` as KubeRay sends it."""
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["x-ray-authorization"] = f"Bearer {token or self.token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.dashboard_url}{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read().decode()
        return json.loads(text) if text.strip().startswith(("{", "[")) else text

    def alive_nodes(self) -> list[dict[str, Any]]:
        data = self.request("GET", "/api/v0/nodes?limit=1000&detail=true", timeout=10)
        nodes = data["data"]["result"]["result"]
        return [n for n in nodes if n.get("state") == "ALIVE"]

    def submit(self, rayjob: dict[str, Any], submission_id: str | None = None) -> str:
        """POST the RayJob's entrypoint to /api/jobs/ (KubeRay's HTTPMode); returns the submission id."""
        submission_id = submission_id or f"{rayjob['metadata']['name']}-{_suffix()}"
        return self.request("POST", "/api/jobs/", build.job_request(rayjob, submission_id))["submission_id"]

    def job_info(self, submission_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{submission_id}", timeout=10)

    def job_logs(self, submission_id: str) -> str:
        try:
            return self.request("GET", f"/api/jobs/{submission_id}/logs", timeout=10).get("logs", "")
        except (OSError, ValueError) as exc:
            return f"(no logs: {exc})"

    def wait_job(self, submission_id: str, *, timeout: float = 300) -> dict[str, Any]:
        """Poll until the Ray job is SUCCEEDED, FAILED or STOPPED; returns its info."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(submission_id)
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            if time.monotonic() > deadline:
                logs = self.job_logs(submission_id)[-3000:]
                raise TimeoutError(f"job {submission_id} still {info['status']}:\n{logs}")
            time.sleep(0.5)


class ClusterBox:
    """Owns a folder for pods, the PVC folders (claim name -> host folder) and the Secrets the pods may read."""

    def __init__(self, folder: Path, *, pvcs: dict[str, Path] | None = None,
                 secrets: dict[str, dict[str, str]] | None = None, image_env: dict[str, str] | None = None,
                 namespace: str = "default") -> None:
        self.folder = Path(folder)
        self.pvcs = {k: Path(v) for k, v in (pvcs or {}).items()}
        self.secrets = secrets if secrets is not None else {}
        self.image_env = image_env or {}
        self.namespace = namespace
        self.clusters: list[RayCluster] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ClusterBox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self, rayjob: dict[str, Any], *, configmaps: dict[str, dict[str, str]] | None = None,
              name: str | None = None, timeout: float = 180) -> RayCluster:
        """Start the cluster of a RayJob manifest (its `spec.rayClusterSpec`); ready when this returns."""
        name = name or f"{rayjob['metadata']['name']}-{_suffix()}"
        cluster = RayCluster(name, namespace=rayjob["metadata"].get("namespace") or self.namespace,
                             spec=rayjob["spec"]["rayClusterSpec"], folder=self.folder / name, box=self,
                             configmaps=configmaps or {})
        with self._lock:
            self.clusters.append(cluster)
        try:
            return cluster.start(timeout=timeout)
        except BaseException:
            cluster.teardown()
            raise

    def host_path(self, where: str) -> Path:
        """The host folder behind `pvc://claim/path` or `/mnt/pvc/claim/path` (as a pod would see it)."""
        rest = where[len("pvc://"):] if where.startswith("pvc://") else None
        if rest is None and where.startswith(PVC_ROOT + "/"):
            rest = where[len(PVC_ROOT) + 1:]
        if rest is None:
            raise ValueError(f"{where} is not on a PVC (pvc://claim/... or {PVC_ROOT}/claim/...)")
        claim, _, path = rest.partition("/")
        if claim not in self.pvcs:
            raise ValueError(f"{where}: claim {claim!r} has no host folder in this box")
        return self.pvcs[claim] / path

    def close(self) -> None:
        with self._lock:
            clusters, self.clusters = self.clusters, []
        for cluster in clusters:
            cluster.teardown()


def _release(base: int) -> None:
    with _blocks_lock:
        _taken_blocks.discard(base)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _suffix() -> str:
    return "".join(random.choices("bcdfghjklmnpqrstvwxz2456789", k=5))  # like KubeRay's rand.String(5)


def _new_token() -> str:
    import base64

    return base64.b64encode(os.urandom(32)).decode()  # KubeRay's generateRandomToken(32)
