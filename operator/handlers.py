"""kopf wiring: thin handlers that call one `Controller.reconcile(namespace, name)`.

Every trigger (a PostTrainingJob changed, one of its RayJobs changed, the
progress timer fired) runs the same level-based pass under a per-job lock:
observe -> `reconcile.plan` (pure) -> create-or-get children -> write the
status if it changed -> emit Events for transitions. kopf keeps no state of
its own for us: no handler needs its progress annotations, and its
finalizer/annotation prefixes are set to posttrain.dev anyway.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import kopf

from posttrain.api.load import InvalidJob, parse_job
from posttrain.api.spec import GROUP, PLURAL, VERSION, PostTrainingJob
from posttrain.operator import builders, kube, reconcile, vocab
from posttrain.operator.metrics import OperatorMetrics

log = logging.getLogger("posttrain.operator")


@dataclass
class OperatorConfig:
    build: builders.BuildSettings
    namespaces: list[str] = field(default_factory=list)  # empty: every namespace
    metrics_port: int = 8080
    driver_port: int = vocab.DRIVER_METRICS_PORT
    progress_interval: float = 10.0  # seconds between polls of a running job's /progress
    progress_timeout: float = 3.0


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _job_document(body: dict[str, Any], spec: dict[str, Any] | None = None) -> dict[str, Any]:
    meta = body.get("metadata", {})
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"), "labels": meta.get("labels") or {}},
        "spec": spec if spec is not None else body.get("spec"),
    }


def _status_patch(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch from `old` to `new` (keys that disappear are set to null)."""
    return {**{k: None for k in (old or {}) if k not in new}, **new}


class Controller:
    def __init__(self, config: OperatorConfig, *, kube_api: kube.Kube, metrics: OperatorMetrics) -> None:
        self.config = config
        self.kube = kube_api
        self.metrics = metrics
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def reconcile(self, namespace: str, name: str) -> None:
        lock = self._locks.setdefault((namespace, name), asyncio.Lock())
        started = time.perf_counter()
        result = "success"
        try:
            async with lock:
                await self._reconcile(namespace, name)
        except kopf.TemporaryError:
            result = "retry"
            raise
        except Exception:
            result = "error"
            raise
        finally:
            self.metrics.reconciles.labels(result=result).inc()
            self.metrics.duration.observe(time.perf_counter() - started)

    async def _reconcile(self, namespace: str, name: str) -> None:
        body = await self.kube.get_job(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return
        uid = body["metadata"]["uid"]
        now = now_rfc3339()
        try:
            # The runtime image ships with this operator: refuse algorithms it cannot run yet.
            requested = parse_job(_job_document(body), source=f"{namespace}/{name}", require_available=True)
        except InvalidJob as exc:
            text = "; ".join(str(e) for e in exc.errors)
            await self._apply(body, reconcile.invalid(body, text, now), job=None)
            return

        configmap = await self.kube.create_or_get_configmap(builders.build_configmap(requested, owner_uid=uid))
        started_with = kube.spec_from_configmap(configmap)
        requested_wire = requested.spec.wire()
        effective = reconcile.effective_spec(requested_wire, started_with)
        job = requested if effective == requested_wire else parse_job(_job_document(body, effective))

        rayjobs = await self.kube.list_rayjobs(namespace, name, uid)
        progress = None
        current = max(rayjobs, key=reconcile.run_of) if rayjobs else None
        if current is not None and (current.get("status") or {}).get("jobDeploymentStatus") == "Running":
            url = kube.progress_url(current, self.config.driver_port)
            if url:
                progress = await kube.fetch_progress(url, self.config.progress_timeout)
        observed = reconcile.Observed(rayjobs=rayjobs, spec_in_configmap=started_with, progress=progress, now=now,
                                      requested_spec=requested_wire)
        await self._apply(body, reconcile.plan(job, body, observed), job=job)

    async def _apply(self, body: dict[str, Any], plan: reconcile.Plan, *, job: PostTrainingJob | None) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if plan.create_run is not None and job is not None:
            manifest = builders.build_rayjob(job, run=plan.create_run, owner_uid=meta["uid"], settings=self.config.build)
            await self.kube.create_or_get_rayjob(manifest)
        if plan.set_suspend is not None:
            await self.kube.set_rayjob_suspend(namespace, *plan.set_suspend)
        old = body.get("status") or {}
        if reconcile.status_changed(old, plan.status):
            # The status is written here and nowhere else, and only when it changed.
            await self.kube.patch_status(namespace, name, _status_patch(old, plan.status))
            for kind, reason, message in plan.events:
                kopf.event(body, type=kind, reason=reason, message=message)
            if plan.status.get("restarts", 0) > old.get("restarts", 0):
                self.metrics.restarts.inc(plan.status["restarts"] - old.get("restarts", 0))
            if (plan.status.get("phase") == "Failed" and old.get("phase") != "Failed"
                    and any(c.get("reason") == vocab.REASON_RESTARTS_EXHAUSTED for c in plan.status["conditions"])):
                self.metrics.exhausted.inc()
        self.metrics.observe_job(namespace, name, plan.status)

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        self.metrics.forget_job(namespace, name)


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Attach the handlers to a registry (tests build their own registry and controller)."""

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = vocab.FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=vocab.ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=vocab.ANNOTATION_PREFIX, key="last-handled-configuration")
        settings.posting.level = logging.WARNING  # Events come from our reconcile, not from kopf's log lines
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_changed(type: str | None, name: str, namespace: str, **_: Any) -> None:
        if type == "DELETED":
            controller.forget(namespace, name)  # children go through garbage collection
            return
        await controller.reconcile(namespace, name)

    @kopf.on.event(kube.RAY_GROUP, kube.RAY_VERSION, kube.RAY_PLURAL, labels={vocab.LABEL_JOB: kopf.PRESENT},
                   registry=registry)
    async def rayjob_changed(labels: dict[str, str], namespace: str, **_: Any) -> None:
        await controller.reconcile(namespace, labels[vocab.LABEL_JOB])

    @kopf.timer(GROUP, VERSION, PLURAL, interval=controller.config.progress_interval, registry=registry)
    async def poll_progress(name: str, namespace: str, status: dict[str, Any], **_: Any) -> None:
        if (status or {}).get("phase") in ("Succeeded", "Failed"):
            return
        await controller.reconcile(namespace, name)
