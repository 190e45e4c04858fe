"""All Kubernetes API calls of the operator, in one small module.

The official `kubernetes` client does the calls; they run in a worker thread so kopf's event
loop never blocks, and every call has a request timeout (a hung connection must not hold a job,
or the leader Lease, forever). Creation is create-or-get: a 409 means the object is already there
(a retry, or another pass), and the existing one is returned. An error answer becomes a
`KubeError` carrying the server's code and message, which the controller turns into a status
condition.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from typing import Any

from posttrain.api.spec import GROUP, PLURAL, VERSION
from posttrain.operator import vocab

log = logging.getLogger(__name__)

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
DEFAULT_TIMEOUT = (5.0, 30.0)  # (connect, read) seconds of every API call
MAX_PROGRESS_BYTES = 64 * 1024  # the most of a driver's /progress answer the operator reads


class KubeError(Exception):
    """An API call that failed: `status` is the HTTP code (None: no answer), `message` the server's."""

    def __init__(self, status: int | None, message: str, *, action: str) -> None:
        super().__init__(f"{action}: {status or 'no answer'}: {message}")
        self.status, self.message, self.action = status, message, action


def _server_message(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    try:
        return str(json.loads(body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(getattr(exc, "reason", None) or exc)


class Kube:
    """A thin async facade over the API client; one per operator process."""

    def __init__(self, api_client: Any = None, *, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        from kubernetes import client

        self.api_client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.networking = client.NetworkingV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)
        self.timeout = timeout

    async def _call(self, action: str, fn: Any, *args: Any, ok: tuple[int, ...] = (), **kwargs: Any) -> Any:
        """Run one call; raise KubeError unless it succeeds. A code in `ok` returns None instead."""
        try:
            result = await asyncio.to_thread(fn, *args, _request_timeout=self.timeout, **kwargs)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a KubeError with the server's words
            status = getattr(exc, "status", None)
            if status in ok:
                return None
            raise KubeError(status if isinstance(status, int) and status else None, _server_message(exc),
                            action=action) from exc
        return self.api_client.sanitize_for_serialization(result) if not isinstance(result, dict) else result

    # --- PostTrainingJobs --------------------------------------------------------------------------

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call(f"get posttrainingjob {name}", self.custom.get_namespaced_custom_object,
                                GROUP, VERSION, namespace, PLURAL, name, ok=(404,))

    async def list_jobs(self, namespace: str | None = None) -> list[dict[str, Any]]:
        if namespace:
            found = await self._call("list posttrainingjobs", self.custom.list_namespaced_custom_object,
                                     GROUP, VERSION, namespace, PLURAL)
        else:
            found = await self._call("list posttrainingjobs", self.custom.list_cluster_custom_object,
                                     GROUP, VERSION, PLURAL)
        return list(found.get("items", []))

    async def remove_finalizers(self, body: dict[str, Any], finalizers: tuple[str, ...]) -> bool:
        """Take `finalizers` off a job (guarded by its resourceVersion); False when there were none."""
        meta = body["metadata"]
        kept = [f for f in meta.get("finalizers") or [] if f not in finalizers]
        if len(kept) == len(meta.get("finalizers") or []):
            return False
        patch = {"metadata": {"finalizers": kept or None, "resourceVersion": meta["resourceVersion"]}}
        await self._call(f"remove finalizers of posttrainingjob {meta['name']}",
                         self.custom.patch_namespaced_custom_object, GROUP, VERSION, meta["namespace"], PLURAL,
                         meta["name"], patch)
        return True

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the status subresource; keys set to None are removed. The job as written."""
        return await self._call(f"patch posttrainingjob {name} status", self.custom.patch_namespaced_custom_object_status,
                         GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    # --- RayJobs ---------------------------------------------------------------------------------

    async def list_rayjobs(self, namespace: str, job: str, owner_uid: str) -> list[dict[str, Any]]:
        """Our RayJobs of one job: labelled with its name and owned by its uid (not a namesake's)."""
        found = await self._call("list rayjobs", self.custom.list_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
                                 namespace, RAY_PLURAL, label_selector=f"{vocab.LABEL_JOB}={job}")
        return [item for item in found.get("items", [])
                if any(ref.get("uid") == owner_uid for ref in item["metadata"].get("ownerReferences", []))]

    async def create_rayjob(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created RayJob, or None when one of that name exists already (409)."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        return await self._call(f"create rayjob {name}", self.custom.create_namespaced_custom_object,
                                RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, body, ok=(409,))

    async def set_rayjob_suspend(self, namespace: str, name: str, suspend: bool,
                                 annotations: dict[str, str] | None = None) -> None:
        patch = {"metadata": {"annotations": {vocab.ANNOTATION_SUSPEND: str(suspend).lower(), **(annotations or {})}},
                 "spec": {"suspend": suspend}}
        await self._call(f"patch rayjob {name}", self.custom.patch_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
                         namespace, RAY_PLURAL, name, patch)

    async def stop_rayjob(self, namespace: str, name: str, reason: str, message: str) -> None:
        """Suspend a run for good (KubeRay deletes its Ray cluster) and mark why, so every later pass
        reads the run as stopped by the operator rather than as suspended by a queue."""
        await self.set_rayjob_suspend(namespace, name, True, {vocab.ANNOTATION_STOP_REASON: reason,
                                                              vocab.ANNOTATION_STOP_MESSAGE: message[:1000]})

    async def post_event(self, body: dict[str, Any], *, type: str, reason: str, message: str) -> None:
        """A core v1 Event about the job (what `kubectl describe ptj` shows). Best effort: a lost
        Event is logged, never a failed pass."""
        meta = body["metadata"]
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta.get("uid")},
            "type": type, "reason": reason, "message": message[:1024],
            "source": {"component": "posttrain-operator"}, "reportingComponent": "posttrain-operator",
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            await self._call(f"create event {reason}", self.core.create_namespaced_event, meta["namespace"], event)
        except KubeError as exc:
            log.warning("could not post an Event about %s/%s: %s", meta["namespace"], meta["name"], exc)

    # --- ConfigMap, NetworkPolicy, claims, pods, events ---------------------------------------------

    async def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call(f"get configmap {name}", self.core.read_namespaced_config_map, name, namespace,
                                ok=(404,))

    async def create_configmap(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The created ConfigMap, or None when one of that name exists already (409)."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        return await self._call(f"create configmap {name}", self.core.create_namespaced_config_map, ns, body,
                                ok=(409,))

    async def create_or_get_networkpolicy(self, body: dict[str, Any]) -> dict[str, Any]:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        made = await self._call(f"create networkpolicy {name}", self.networking.create_namespaced_network_policy,
                                ns, body, ok=(409,))
        return made or await self._call(f"get networkpolicy {name}", self.networking.read_namespaced_network_policy,
                                        name, ns)

    async def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._call(f"get persistentvolumeclaim {name}",
                                self.core.read_namespaced_persistent_volume_claim, name, namespace, ok=(404,))

    async def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        found = await self._call("list pods", self.core.list_namespaced_pod, namespace, label_selector=label_selector)
        return list(found.get("items", []))

    async def list_events(self, namespace: str, *, kind: str, name: str) -> list[dict[str, Any]]:
        found = await self._call("list events", self.core.list_namespaced_event, namespace,
                                 field_selector=f"involvedObject.kind={kind},involvedObject.name={name}")
        return list(found.get("items", []))


def spec_from_configmap(configmap: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec a job was started with, as stored in its ConfigMap (None when unreadable)."""
    if not configmap:
        return None
    try:
        spec = json.loads((configmap.get("data") or {}).get(vocab.SPEC_FILE, ""))["spec"]
    except (ValueError, KeyError, TypeError):
        return None
    return spec if isinstance(spec, dict) else None


def progress_url(rayjob: dict[str, Any], port: int) -> str | None:
    """The driver's /progress, through the head Service whose address KubeRay puts in dashboardURL."""
    dashboard = (rayjob.get("status") or {}).get("dashboardURL")
    if not dashboard:
        return None
    host = dashboard.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return f"http://{host}:{port}/progress"


async def fetch_progress(url: str, timeout: float = 3.0) -> Any:
    """GET /progress, parsed but not yet trusted (see observe.sanitize_progress); None when the driver
    does not answer (not started, restarting, gone) or answers more than MAX_PROGRESS_BYTES."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                body = await resp.content.read(MAX_PROGRESS_BYTES + 1)
        if len(body) > MAX_PROGRESS_BYTES:
            log.warning("ignoring a /progress answer over %d bytes from %s", MAX_PROGRESS_BYTES, url)
            return None
        # NaN and Infinity are not JSON: read them as null (dropped), never as floats the API refuses.
        return json.loads(body, parse_constant=lambda _: None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, UnicodeDecodeError) as exc:
        log.debug("no progress from %s: %s", url, exc)
        return None
