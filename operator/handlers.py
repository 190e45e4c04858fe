"""kopf wiring: thin handlers that call one `Controller.reconcile(namespace, name)`.

Every trigger (a PostTrainingJob changed, one of its RayJobs changed, the poll timer fired)
runs the same level-based pass (see `posttrain.operator.controller`), except the watch event of
a write the operator made and already acted on (`Controller.own_change`: its status write, its
RayJob's creation). Only watching handlers are
registered (`@kopf.on.event`) and the poll timer is a task of our own, not `@kopf.timer`: kopf
then keeps no state on the objects, in particular no finalizer, which would block deleting a
namespace or the CRD whenever the operator is not running.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import kopf

from posttrain.api.spec import GROUP, PLURAL, VERSION
from posttrain.operator import kube, vocab
from posttrain.operator.controller import Controller, OperatorConfig, now_rfc3339

__all__ = ["Controller", "OperatorConfig", "now_rfc3339", "register"]

log = logging.getLogger("posttrain.operator")


def register(registry: kopf.OperatorRegistry, controller: Controller) -> None:
    """Attach the handlers to a registry (tests build their own registry and controller)."""
    poller: dict[str, asyncio.Task] = {}

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = vocab.FINALIZER
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=vocab.ANNOTATION_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=vocab.ANNOTATION_PREFIX, key="last-handled-configuration")
        settings.posting.level = logging.WARNING  # Events come from our reconcile, not from kopf's log lines
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.request_timeout = 60  # kopf's own calls (watch excepted) never hang
        settings.networking.connect_timeout = 10
        poller["task"] = asyncio.create_task(controller.poll_forever(), name="posttrain-poll")

    @kopf.on.cleanup(registry=registry)
    async def stop_polling(**_: Any) -> None:
        task = poller.pop("task", None)
        if task is not None:
            task.cancel()

    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_changed(type: str | None, name: str, namespace: str, meta: Any, **_: Any) -> None:
        if type == "DELETED":
            await controller.deleted(namespace, name)  # children go through garbage collection
            return
        # A listing (type None: start-up, a watch restarted after a CRD change) reads objects anew, with the
        # defaults served now: never skipped, even at the resourceVersion of our own write.
        if type is None or not controller.own_change("job", namespace, name, name, meta.get("resourceVersion")):
            await controller.reconcile(namespace, name)

    @kopf.on.event(kube.RAY_GROUP, kube.RAY_VERSION, kube.RAY_PLURAL, labels={vocab.LABEL_JOB: kopf.PRESENT},
                   registry=registry)
    async def rayjob_changed(type: str | None, labels: dict[str, str], name: str, namespace: str, meta: Any,
                             **_: Any) -> None:
        job = labels[vocab.LABEL_JOB]
        if type is None or not controller.own_change("rayjob", namespace, job, name, meta.get("resourceVersion")):
            await controller.reconcile(namespace, job)
