"""The HTTP face of the emulator: kmock's Kubernetes request routing over our `Store`.

kmock parses every request into (action, resource, namespace, name, subresource), serves
discovery (`/api`, `/apis`, `/apis/<group>/<version>`, `/version`) from `resources`, renders
`KubernetesError` as a `Status` and logs every request (iterate the emulator). Its own object handlers
are replaced here by ones that go through `Store` (see that module for what kmock lacks), plus:

* list responses with `kind: XxxList`, `apiVersion`, `metadata.resourceVersion`, selectors;
* watch streams that honour `resourceVersion` (replay from the log, or synthetic ADDED for the
  current state when absent or "0"), `labelSelector`/`fieldSelector` (an object that stops or
  starts matching arrives as DELETED/ADDED), `timeoutSeconds`, `sendInitialEvents` (ending with
  a BOOKMARK), and that end when the cluster stops;
* PUT (replace), 201 on create, DELETE's `propagationPolicy` (Background, Orphan);
* `/api/v1/namespaces[/<name>[/status]]`, which kmock 0.8 parses as a namespace prefix with
  no resource (or fails on): such paths are renamed before kmock parses them, and the parsed
  resource is set back to `v1/namespaces`.

Reactions added through kmock's DSL take precedence over all of this, for fault injection:
`emulator["post", kmock.resource("ray.io", "v1", "rayjobs")] << 500` fails every RayJob create
over HTTP (and changes nothing); the direct `Cluster` methods do not go through HTTP.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import attrs
import kmock

from kubeemu_admission import Kind, api_error, clone, field_matcher, label_matcher
from kubeemu_store import Change, Store

VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}
_NAMESPACES_PATH = re.compile(r"/api/v1/namespaces(/[^/]+(/status|/finalize)?)?/?")
_NAMESPACES_ALIAS = "kubeemu-namespaces"  # what kmock parses as a plain plural


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with `Store` semantics; lives on one event loop."""

    store: Store = attrs.field(init=False)
    _waiters: set[asyncio.Future[None]] = attrs.field(factory=set, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store = Store(self.objects, on_change=self._wake_watchers)
        self.fallback[kmock.method.PUT] << self._serve_replace

    def add_kind(self, kind: Kind) -> None:
        self.store.add_kind(kind)
        self.resources[kind.resource] = kmock.ResourceInfo(
            kind=kind.kind, namespaced=kind.namespaced, singular=kind.singular or kind.kind.lower(), verbs=VERBS,
            shortnames=kind.short_names, categories=kind.categories,
            subresources={"status"} if kind.status_subresource else set())

    def close_watches(self) -> None:
        """End every open watch stream (called before the server stops)."""
        self._closing = True
        self._wake_watchers()

    # kmock matches every request against its reactions by scanning the whole request log (an
    # identity check over a filtered view), so each request costs O(requests so far). Keeping only
    # the newest entries keeps a load test of thousands of objects linear; tests that read
    # `Cluster.requests` see the newest `request_log_limit` requests.
    request_log_limit: ClassVar[int] = 64

    async def __call__(self, raw_request: Any) -> Any:
        if len(self._requests) > self.request_log_limit:
            del self._requests[: len(self._requests) - self.request_log_limit]
        if _NAMESPACES_PATH.fullmatch(raw_request.path):
            path = raw_request.rel_url.path.replace("/namespaces", f"/{_NAMESPACES_ALIAS}", 1)
            raw_request = raw_request.clone(rel_url=raw_request.rel_url.with_path(path).with_query(raw_request.query))
        return await super().__call__(raw_request)

    # kmock's KubernetesEmulator changes its naive state here before any reaction runs; all state
    # changes are ours (in the fallbacks below), so skip straight to kmock's reaction matching.
    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.resource.plural == _NAMESPACES_ALIAS:
            restored = attrs.evolve(request, resource=kmock.resource("", "v1", "namespaces"))
            self._requests[next(i for i, r in enumerate(self._requests) if r is request)] = restored
            request = restored
        return await kmock.KubernetesScaffold._handle(self, request)

    async def _serve_version(self, request: kmock.Request) -> Any:
        payload = await super()._serve_version(request)
        if request.resource is not None and request.resource.group == "":
            payload["groupVersion"] = request.resource.version  # kmock says "/v1"
        return payload

    # --- reads -------------------------------------------------------------------------------------

    def _kind(self, request: kmock.Request) -> Kind:
        res = request.resource
        assert res is not None
        kind = self.store.kind(res.group or "", res.version or "", res.plural or "")
        if kind.namespaced is False and request.namespace is not None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return kind

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        if request.subresource not in (None, "status"):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return self.store.get(self._kind(request), request.namespace, request.name or "")

    async def _serve_list(self, request: kmock.Request) -> Any:
        kind = self._kind(request)
        items = self.store.list(kind, request.namespace, label_selector=request.params.get("labelSelector"),
                                field_selector=request.params.get("fieldSelector"))
        if not kind.custom:  # built-in lists carry kind/apiVersion on the list only
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                "metadata": {"resourceVersion": self.store.resource_version}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        # Errors raised here (before the stream starts) come back as a plain Status response.
        kind = self._kind(request)
        labels_match = label_matcher(request.params.get("labelSelector"))
        fields_match = field_matcher(request.params.get("fieldSelector"), kind)
        since = request.params.get("resourceVersion") or "0"
        if not since.isdigit():
            raise api_error(400, "BadRequest", f"invalid resourceVersion: {since!r}")
        timeout = float(request.params.get("timeoutSeconds") or 0) or None

        def matches(obj: dict[str, Any] | None) -> bool:
            return (obj is not None and (request.namespace is None or obj["metadata"].get("namespace") == request.namespace)
                    and (request.name is None or obj["metadata"]["name"] == request.name)
                    and labels_match(obj["metadata"].get("labels") or {}) and fields_match(obj))

        def as_event(change: Change) -> dict[str, Any] | None:
            now, before = matches(change.obj), matches(change.old)
            if change.type == "MODIFIED" and now != before:  # moved into or out of the selection
                return {"type": "ADDED" if now else "DELETED", "object": clone(change.obj)}
            return {"type": change.type, "object": clone(change.obj)} if now else None

        return self._stream(kind, since, timeout, matches, as_event, request.params.get("sendInitialEvents") == "true")

    async def _stream(self, kind: Kind, since: str, timeout: float | None, matches: Any, as_event: Any,
                      initial_bookmark: bool) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        yield b""  # send the headers now: a watch with nothing to say is still a watch
        cursor = int(since)
        if cursor == 0:  # "start at the most recent": the current state as synthetic ADDED events
            cursor = int(self.store.resource_version)
            for obj in self.store.list(kind):
                if matches(obj):
                    yield {"type": "ADDED", "object": obj}
            if initial_bookmark:
                yield {"type": "BOOKMARK", "object": {
                    "apiVersion": kind.api_version, "kind": kind.kind, "metadata": {
                        "resourceVersion": str(cursor), "annotations": {"k8s.io/initial-events-end": "true"}}}}
        while not self._closing:
            pending = self.store.changes_after(cursor)
            if pending:
                cursor = pending[-1].rv
                for event in (as_event(c) for c in pending if c.kind == kind):
                    if event is not None:
                        yield event
                continue
            waiter = loop.create_future()
            self._waiters.add(waiter)
            try:
                remaining = None if deadline is None else deadline - loop.time()
                if remaining is not None and remaining <= 0:
                    return
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                return
            finally:
                self._waiters.discard(waiter)

    def _wake_watchers(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    # --- writes ------------------------------------------------------------------------------------

    async def _serve_create(self, request: kmock.Request) -> Any:
        if request.subresource is not None:
            raise api_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        return kmock.Response(status=201, payload=self.store.create(self._kind(request), request.namespace, request.data))

    async def _serve_update(self, request: kmock.Request) -> Any:
        content_type = next((v for k, v in request.headers.items() if k.lower() == "content-type"), "")
        return self.store.update(self._kind(request), request.namespace, request.name or "", patch=request.data,
                                 patch_type=content_type.split(";")[0].strip(), subresource=request.subresource)

    async def _serve_replace(self, request: kmock.Request) -> Any:
        if request.resource is None or request.name is None:
            raise api_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        return self.store.update(self._kind(request), request.namespace, request.name, body=request.data,
                                 subresource=request.subresource)

    async def _serve_delete(self, request: kmock.Request) -> Any:
        options = request.data if isinstance(request.data, dict) else {}
        propagation = request.params.get("propagationPolicy") or options.get("propagationPolicy")
        return self.store.delete(self._kind(request), request.namespace, request.name or "", propagation=propagation)
