"""All Kubernetes API calls of the operator, in one small module.

The official `kubernetes` client does the calls; they run in a worker thread
so kopf's event loop never blocks. Creation is create-or-get: a 409 means the
object is already there (a retry, or another pass), and the existing one is
returned.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from posttrain.api.spec import GROUP, PLURAL, VERSION
from posttrain.operator import vocab

log = logging.getLogger(__name__)

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"


class Kube:
    """A thin async facade over the API client; one per operator process."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        self.api_client = api_client or client.ApiClient()
        self.custom = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.coordination = client.CoordinationV1Api(self.api_client)

    @staticmethod
    async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    @staticmethod
    def _is(exc: BaseException, status: int) -> bool:
        return getattr(exc, "status", None) == status

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:  # noqa: BLE001 - 404 is an answer, the rest propagates
            if self._is(exc, 404):
                return None
            raise

    async def list_rayjobs(self, namespace: str, job: str, owner_uid: str) -> list[dict[str, Any]]:
        """Our RayJobs of one job: labelled with its name and owned by its uid (not a namesake's)."""
        found = await self._call(self.custom.list_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace,
                                 RAY_PLURAL, label_selector=f"{vocab.LABEL_JOB}={job}")
        return [item for item in found.get("items", [])
                if any(ref.get("uid") == owner_uid for ref in item["metadata"].get("ownerReferences", []))]

    async def create_or_get_rayjob(self, body: dict[str, Any]) -> dict[str, Any]:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            return await self._call(self.custom.create_namespaced_custom_object, RAY_GROUP, RAY_VERSION, ns,
                                    RAY_PLURAL, body)
        except Exception as exc:  # noqa: BLE001
            if not self._is(exc, 409):
                raise
            return await self._call(self.custom.get_namespaced_custom_object, RAY_GROUP, RAY_VERSION, ns,
                                    RAY_PLURAL, name)

    async def set_rayjob_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        patch = {"metadata": {"annotations": {f"{vocab.ANNOTATION_PREFIX}/suspend": str(suspend).lower()}},
                 "spec": {"suspend": suspend}}
        await self._call(self.custom.patch_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL,
                         name, patch)

    async def create_or_get_configmap(self, body: dict[str, Any]) -> dict[str, Any]:
        ns = body["metadata"]["namespace"]
        try:
            made = await self._call(self.core.create_namespaced_config_map, ns, body)
        except Exception as exc:  # noqa: BLE001
            if not self._is(exc, 409):
                raise
            made = await self._call(self.core.read_namespaced_config_map, body["metadata"]["name"], ns)
        return self.api_client.sanitize_for_serialization(made)

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource; keys set to None are removed."""
        await self._call(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name,
                         {"status": status})


def spec_from_configmap(configmap: dict[str, Any] | None) -> dict[str, Any] | None:
    """The spec a job was started with, as stored in its ConfigMap."""
    if not configmap:
        return None
    try:
        return json.loads((configmap.get("data") or {}).get(vocab.SPEC_FILE, ""))["spec"]
    except (ValueError, KeyError, TypeError):
        return None


def progress_url(rayjob: dict[str, Any], port: int) -> str | None:
    """The driver's /progress, through the head Service whose address KubeRay puts in dashboardURL."""
    dashboard = (rayjob.get("status") or {}).get("dashboardURL")
    if not dashboard:
        return None
    host = dashboard.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
    return f"http://{host}:{port}/progress"


async def fetch_progress(url: str, timeout: float = 3.0) -> dict[str, Any] | None:
    """GET /progress; None when the driver does not answer (not started, restarting, gone)."""
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url) as resp:
                if resp.status != 200:
                    return None
                return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        log.debug("no progress from %s: %s", url, exc)
        return None
