"""A Kubernetes API server for operator tests: kmock, plus the fidelity kmock lacks, on 127.0.0.1.

The real kopf operator (or the `kubernetes` client) talks HTTP to it as to a cluster; tests read
and change the same state directly, e.g. to play KubeRay moving a RayJob along::

    import kopf, kubeemu
    from posttrain.operator import builders, handlers, kube, metrics

    def test_job_runs(job_dict):
        with kubeemu.Cluster() as k8s:
            registry = kopf.OperatorRegistry()
            handlers.register(registry, handlers.Controller(
                handlers.OperatorConfig(build=builders.BuildSettings(image="img:1")),
                kube_api=kube.Kube(k8s.api_client()), metrics=metrics.OperatorMetrics()))
            with kubeemu.Operator(k8s, registry):         # or a module: "pkg.handlers", "path/to/handlers.py"
                k8s.create(job_dict)                        # as `kubectl apply` would
                rayjob = k8s.wait_for(lambda: k8s.list(*kubeemu.RAYJOB, "default"))[0]
                k8s.set_rayjob_status("default", rayjob["metadata"]["name"], deployment="Running", job="RUNNING")
                k8s.wait_for(lambda: k8s.get(*kubeemu.PTJ, "default", "tiny-sft")["status"]["phase"] == "Running")

Run its own tests: `.venv/bin/python -m pytest tests/test_kubeemu.py tests/test_kubeemu_fidelity.py
tests/test_kubeemu_rbac.py tests/test_kubectl.py -q` (no cluster, no Ray; about a minute).

The real kubectl works against it: `kubectl --kubeconfig <k8s.kubeconfig_path> apply -f job.yaml`
(validation on), `apply --server-side`, `--dry-run=server`, `get ptj` (the CRD's printer columns),
`get -w`, `get -o yaml`, `describe` (with Events), `explain ptj.spec.training`, `patch`, `delete`,
`create namespace`.

What is emulated, module by module:

* `kubeemu_server` (HTTP, on kmock): routing, watch streams, discovery as the real server lists
  it (subresources with no short names), `/version` (1.32), `/openapi/v3` (`kubeemu_openapi`),
  `Table` responses for `kubectl get` (`kubeemu_table`), protobuf bodies of kubectl's typed
  clients (`kubeemu_wire`), `fieldValidation` (Strict: 400 per unknown field; Warn: `Warning`
  headers), an audit log (`Cluster.audit`);
* `kubeemu_authz`: bearer tokens (`Cluster(tokens={"t": "system:serviceaccount:ns:sa"})`; the
  Cluster's kubeconfig holds an admin in `system:masters`), RBAC over the Role / ClusterRole /
  RoleBinding / ClusterRoleBinding objects stored here when `Cluster(rbac=True)`, with the real
  403 messages, and the OwnerReferencesPermissionEnforcement admission plugin (setting
  `blockOwnerDeletion` needs `update` on the owner's `finalizers`). Direct `Cluster` calls are the
  test acting as cluster admin: never authorised;
* `kubeemu_store`: uid, resourceVersion, generation, generateName, the status subresource,
  finalizers, 409s, 404s, server-side apply (`kubeemu_apply`: create, merge, managedFields),
  reads defaulted by the CRD served *now* (a newer CRD's defaults show on older objects, on
  get/list/watch, as on a real server reading etcd); a CRD written here (`Cluster.apply`,
  `kubectl apply`) replaces the served kind (`kubeemu_crds`: schema, defaults, CEL rules, printer
  columns) and ends its open watches; Terminating namespaces refuse new objects (403);
* `kubeemu_admission` and `kubeemu_cel`: pruning, defaulting, structural-schema validation and
  every `x-kubernetes-validations` rule (cel-python; transition rules, ratcheting, per item and
  map value, message / messageExpression / fieldPath / reason), all 422 `Invalid` with the
  server's causes; metadata and ConfigMap checks;
* `kubeemu_controllers`: the garbage collector (background, foreground, orphan) and the
  namespace controller, run on the emulator's loop `Cluster(gc_delay=0.05)` seconds after a change
  that needs them, never inside the request (`gc_delay=None`: only on `Cluster.run_controllers()`).

Served kinds: `posttrain.dev/v1alpha1 posttrainingjobs` (charts/posttrain/crds), `ray.io/v1 rayjobs`
and `rayclusters` (KubeRay v1.7.0's CRDs from `<repo>/../shared/kuberay-crds/`), core v1 namespaces,
configmaps, events, serviceaccounts; `events.k8s.io/v1` events; `coordination.k8s.io/v1` leases;
`rbac.authorization.k8s.io/v1` roles, rolebindings, clusterroles, clusterrolebindings;
`apiextensions.k8s.io/v1` customresourcedefinitions (holding the CRDs above; more can be created).
Objects go in existing namespaces only (404 otherwise): `Cluster(namespaces=...)` makes them.

Not emulated (plainly): server-side apply conflicts between managers (`force` changes nothing) and
field ownership of ordinary updates; merging list items by key (strategic merge and
`x-kubernetes-list-type: map` lists are replaced whole); admission webhooks and every admission
plugin but NamespaceLifecycle and OwnerReferencesPermissionEnforcement; field-level authorisation,
ClusterRole aggregation, impersonation, RBAC escalation checks, client certificates (non-resource
URLs such as discovery and /openapi are open to every caller); `/openapi/v2` (kubectl 1.32 uses v3;
its client-side apply then sends a JSON merge patch, as for any custom resource); Kubernetes' CEL
libraries (`isURL`, `quantity`, ...), CEL cost limits and `optionalOldSelf`; `format` checks;
conversion between CRD versions (one version per CRD is served); deletecollection, pagination
(`limit` is ignored), 410 Gone (the watch log is never compacted), bookmarks after the initial
one; pods, Services and the rest of the built-in kinds.

kopf settings an operator needs against this server (and a real one) are in `operator_settings`;
`Operator` applies them before the module's own `@kopf.on.startup` handlers run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.test_utils
import kmock
import kopf
import yaml

from kubeemu_admission import JSON_PATCH, MERGE_PATCH, Kind
from kubeemu_authz import ADMIN_TOKEN, user
from kubeemu_operator import Operator, load_registry, operator_settings
from kubeemu_server import Emulator

__all__ = ["Cluster", "Operator", "Kind", "ApiError", "ADMIN_TOKEN", "default_kinds", "load_registry", "operator_settings",
           "PTJ", "RAYJOB", "RAYCLUSTER", "CONFIGMAP", "EVENT", "MERGE_PATCH", "JSON_PATCH"]

REPO = Path(__file__).resolve().parents[2]
PTJ_CRD = REPO / "charts" / "posttrain" / "crds" / "posttrain.dev_posttrainingjobs.yaml"
KUBERAY_CRDS = REPO.parent / "shared" / "kuberay-crds" / "v1.7.0"

ApiError = kmock.KubernetesError  # .status is the HTTP code; .reason, .message, .details as in a Status
PTJ = ("posttrain.dev/v1alpha1", "posttrainingjobs")  # k8s.get(*kubeemu.PTJ, "default", "tiny-sft")
RAYJOB = ("ray.io/v1", "rayjobs")
RAYCLUSTER = ("ray.io/v1", "rayclusters")
CONFIGMAP = ("v1", "configmaps")
EVENT = ("v1", "events")

# KubeRay v1.7.0 `apis/ray/v1/rayjob_types.go`: status.jobDeploymentStatus and status.jobStatus.
RAYJOB_DEPLOYMENT_STATUSES = ("", "Initializing", "Running", "Complete", "Failed", "ValidationFailed",
                              "Suspending", "Suspended", "Retrying", "Waiting")
RAYJOB_JOB_STATUSES = ("", "PENDING", "RUNNING", "STOPPED", "SUCCEEDED", "FAILED")

BUILTIN_KINDS = (
    Kind("", "v1", "namespaces", "Namespace", namespaced=False, status_subresource=True, short_names=("ns",)),
    Kind("", "v1", "configmaps", "ConfigMap", short_names=("cm",)),
    Kind("", "v1", "events", "Event", short_names=("ev",)),
    Kind("events.k8s.io", "v1", "events", "Event", short_names=("ev",)),
    Kind("coordination.k8s.io", "v1", "leases", "Lease"),
    Kind("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
         namespaced=False, status_subresource=True, short_names=("crd", "crds")),
    Kind("", "v1", "serviceaccounts", "ServiceAccount", short_names=("sa",)),
    Kind("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    Kind("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    Kind("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    Kind("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", namespaced=False),
    # What the operator reads besides its own kinds (claims' access modes, job pods' states), and what it creates.
    Kind("", "v1", "pods", "Pod", status_subresource=True, short_names=("po",)),
    Kind("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim", status_subresource=True, short_names=("pvc",)),
    Kind("", "v1", "secrets", "Secret"),
    Kind("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=("netpol",)),
)

T = TypeVar("T")


@functools.cache
def load_crd(path: Path) -> Mapping[str, Any]:
    with open(path, encoding="utf-8") as f:
        return next(doc for doc in yaml.load_all(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc)


def crd_paths() -> tuple[Path, ...]:
    return PTJ_CRD, KUBERAY_CRDS / "ray.io_rayjobs.yaml", KUBERAY_CRDS / "ray.io_rayclusters.yaml"


def default_kinds() -> list[Kind]:
    """Built-in kinds plus one `Kind` per CRD in `crd_paths()` (ray.io at v1)."""
    return [*BUILTIN_KINDS, *_crd_kinds()]


@functools.cache
def _crd_kinds() -> tuple[Kind, ...]:  # shared by every Cluster: kinds are frozen, validators built once
    return tuple(Kind.from_crd(load_crd(p), "v1" if "ray.io" in p.name else None) for p in crd_paths())


class Cluster:
    """The emulated API server on its own thread and event loop; a context manager.

    `url`, `kubeconfig_path` and `connection_info()` point clients at it; `get`, `list`, `create`,
    `apply`, `patch`, `patch_status`, `delete`, `events` change and read the same state
    synchronously from the test, as cluster admin (watchers see those changes); errors raise
    `kubeemu.ApiError` with `.status`.

    `tokens` maps bearer tokens to users (`"system:serviceaccount:<ns>:<name>"`, or `(name, groups)`);
    `kubeconfig_for(token)`, `api_client(token)`, `connection_info(token)` and
    `Operator(..., token=...)` call as that user. `rbac=True` authorises every HTTP request against
    the RBAC objects stored in the cluster, and with it OwnerReferencesPermissionEnforcement (as on
    OpenShift; `owner_reference_enforcement=False` for a plain kube-apiserver). `gc_delay` is the seconds from a change to the garbage
    collector's and namespace controller's pass (None: only `run_controllers()`). `audit` lists the
    HTTP requests served, with user and status code.
    """

    def __init__(self, *, kinds: Iterable[Kind] | None = None, namespaces: Iterable[str] = ("default",),
                 crds: Iterable[Path] | None = None, rbac: bool = False,
                 tokens: Mapping[str, str | tuple[str, Iterable[str]]] | None = None,
                 gc_delay: float | None = 0.05, owner_reference_enforcement: bool = True) -> None:
        self._kinds = list(kinds) if kinds is not None else default_kinds()
        self._namespaces = list(namespaces)
        self._crds = list(crds) if crds is not None else list(crd_paths()) if kinds is None else []
        self._rbac, self._gc_delay, self._owner_refs = rbac, gc_delay, owner_reference_enforcement
        self._tokens = {token: user(who) if isinstance(who, str) else user(who[0], who[1])
                        for token, who in (tokens or {}).items()}
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._tmp: str | None = None
        self.emulator: Emulator
        self.url = ""
        self.kubeconfig_path = Path()

    # --- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        started: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(started,), name="kubeemu", daemon=True)
        self._thread.start()
        self.url = started.result(timeout=30)
        self._tmp = tempfile.mkdtemp(prefix="kubeemu-")
        self.kubeconfig_path = self.kubeconfig_for(ADMIN_TOKEN)
        return self

    def kubeconfig_for(self, token: str, *, namespace: str = "default") -> Path:
        """A kubeconfig file that calls this cluster with `token` (the default one: the admin's)."""
        assert self._tmp, "the Cluster is not started"
        plain = token == ADMIN_TOKEN and namespace == "default"
        path = Path(self._tmp) / ("kubeconfig" if plain else
                                  f"kubeconfig-{hashlib.sha256(f'{token}/{namespace}'.encode()).hexdigest()[:12]}")
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "kubeemu",
            "clusters": [{"name": "kubeemu", "cluster": {"server": self.url}}],
            "users": [{"name": "kubeemu", "user": {"token": token}}],
            "contexts": [{"name": "kubeemu", "context": {"cluster": "kubeemu", "user": "kubeemu",
                                                         "namespace": namespace}}],
        }))
        return path

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
        errors = getattr(getattr(self, "emulator", None), "controller_errors", None)
        if errors and exc[0] is None:
            raise errors[0]  # a bug in the emulator's garbage collector or namespace controller

    def _run(self, started: concurrent.futures.Future[str]) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve(started))
        except BaseException as e:  # noqa: BLE001 -- handed to the test thread
            if not started.done():
                started.set_exception(e)
        finally:
            self._loop.close()

    async def _serve(self, started: concurrent.futures.Future[str]) -> None:
        self._stop = asyncio.Event()
        # kmock.Server would also patch aiohttp's resolver process-wide; its plain test server is enough.
        async with Emulator() as emulator, aiohttp.test_utils.RawTestServer(emulator, host="127.0.0.1") as server:
            self.emulator = emulator
            emulator.gc_delay = self._gc_delay
            emulator.authority.tokens.update(self._tokens)
            emulator.authority.rbac = self._rbac
            emulator.authority.owner_reference_enforcement = self._owner_refs
            for kind in self._kinds:
                emulator.add_kind(kind)
            store = emulator.store
            namespaces = store.kinds.get(kmock.resource("", "v1", "namespaces"))
            for name in self._namespaces if namespaces else ():
                store.create(namespaces, None, {"metadata": {"name": name}})
            crds = store.kinds.get(kmock.resource("apiextensions.k8s.io", "v1", "customresourcedefinitions"))
            for path in self._crds if crds else ():
                store.create(crds, None, load_crd(path))
            started.set_result(str(server.make_url("")).rstrip("/"))
            await self._stop.wait()
            emulator.close_watches()

    # --- direct access (from the test thread) ------------------------------------------------------

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async def on_loop() -> T:
            return fn(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(on_loop(), self._loop).result(timeout=30)

    def kind(self, api_version: str, plural: str) -> Kind:
        group, _, version = api_version.rpartition("/")
        return self._call(self.emulator.store.kind, group, version, plural)

    def connection_info(self, token: str = ADMIN_TOKEN) -> kopf.ConnectionInfo:
        """What a `@kopf.on.login` handler returns to reach this cluster (outranking any other login)."""
        return kopf.ConnectionInfo(server=self.url, default_namespace="default", priority=1000, token=token)

    def api_client(self, token: str = ADMIN_TOKEN) -> Any:
        """A `kubernetes.client.ApiClient` for this cluster (e.g. for the operator's `kube.Kube`)."""
        import kubernetes

        path = self.kubeconfig_path if token == ADMIN_TOKEN else self.kubeconfig_for(token)
        return kubernetes.config.new_client_from_config(config_file=str(path))

    @property
    def requests(self) -> list[kmock.Request]:
        """The newest HTTP requests served (up to `Emulator.request_log_limit`), parsed by kmock."""
        return list(self.emulator)  # kmock iterates a handler as its request log

    @property
    def audit(self) -> list[dict[str, Any]]:
        """The newest resource requests over HTTP: user, verb, group, resource, subresource,
        namespace, name, code (and the error's message), oldest first."""
        return self._call(lambda: [dict(e) for e in self.emulator.audit])

    def run_controllers(self) -> bool:
        """Run the garbage collector and namespace controller now (e.g. with `gc_delay=None`)."""
        return self._call(self.emulator.run_controllers)

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any]:
        return self._call(self.emulator.store.get, self.kind(api_version, plural), namespace, name)

    def find(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """`get`, or None when there is no such object."""
        try:
            return self.get(api_version, plural, namespace, name)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None = None, *,
             label_selector: str | None = None, field_selector: str | None = None) -> list[dict[str, Any]]:
        return self._call(self.emulator.store.list, self.kind(api_version, plural), namespace,
                          label_selector=label_selector, field_selector=field_selector)

    def create(self, obj: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create `obj` (kind from its apiVersion/kind) in `namespace`, its own, or "default"."""
        kind = self._call(self.emulator.store.kind_of, obj.get("apiVersion", ""), obj.get("kind", ""))
        return self._call(self.emulator.store.create, kind, namespace, dict(obj))

    def apply(self, obj: Mapping[str, Any], namespace: str | None = None, *, manager: str = "kubeemu") -> dict[str, Any]:
        """Server-side apply `obj` as `manager` (creates it when absent), as `kubectl apply --server-side`."""
        kind = self._call(self.emulator.store.kind_of, obj.get("apiVersion", ""), obj.get("kind", ""))
        name = (obj.get("metadata") or {}).get("name", "")
        namespace = namespace or (obj.get("metadata") or {}).get("namespace") or ("default" if kind.namespaced else None)
        return self._call(self.emulator.store.apply, kind, namespace, name, dict(obj), manager=manager)[0]

    def create_namespace(self, name: str) -> dict[str, Any]:
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: Any, *,
              subresource: str | None = None, patch_type: str = MERGE_PATCH) -> dict[str, Any]:
        return self._call(self.emulator.store.update, self.kind(api_version, plural), namespace, name,
                          patch=patch, patch_type=patch_type, subresource=subresource)

    def patch_status(self, api_version: str, plural: str, namespace: str | None, name: str,
                     status: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `status` into the object's status through `/status`, as a controller would."""
        return self.patch(api_version, plural, namespace, name, {"status": dict(status)}, subresource="status")

    def set_rayjob_status(self, namespace: str, name: str, *, deployment: str, job: str | None = None,
                          **fields: Any) -> dict[str, Any]:
        """Play KubeRay: set `jobDeploymentStatus` (and `jobStatus`, plus any other status fields)."""
        if deployment not in RAYJOB_DEPLOYMENT_STATUSES or (job is not None and job not in RAYJOB_JOB_STATUSES):
            raise ValueError(f"not a KubeRay v1.7 status: {deployment!r}/{job!r}; see RAYJOB_*_STATUSES")
        status = {"jobDeploymentStatus": deployment, **({"jobStatus": job} if job is not None else {}), **fields}
        return self.patch_status(*RAYJOB, namespace, name, status)

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str, *,
               propagation: str | None = None) -> dict[str, Any]:
        return self._call(self.emulator.store.delete, self.kind(api_version, plural), namespace, name,
                          propagation=propagation)

    def events(self, namespace: str | None = None, *, involved: Mapping[str, Any] | None = None,
               reason: str | None = None) -> list[dict[str, Any]]:
        """Core v1 Events, optionally about one object (matched by uid, else kind and name) and reason."""
        found = self.list(*EVENT, namespace)
        if involved is not None:
            meta = involved.get("metadata", {})

            def about(event: dict[str, Any]) -> bool:
                ref = event.get("involvedObject") or {}
                if meta.get("uid") and ref.get("uid"):
                    return ref["uid"] == meta["uid"]
                return ref.get("kind") == involved.get("kind") and ref.get("name") == meta.get("name")

            found = [e for e in found if about(e)]
        return [e for e in found if reason is None or e.get("reason") == reason]

    def wait_for(self, predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.02,
                 what: str = "") -> T:
        """Poll `predicate` until it returns something truthy (a 404 counts as falsy); return that."""
        deadline, last = time.monotonic() + timeout, None
        while True:
            try:
                last = predicate()
            except ApiError as e:
                if e.status != 404:
                    raise
                last = None
            if last:
                return last
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}; last: {last!r}")
            time.sleep(interval)
