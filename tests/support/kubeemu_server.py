"""The HTTP face of the emulator: kmock's Kubernetes request routing over our `Store`.

kmock parses every request into (action, resource, namespace, name, subresource), serves the
group lists of discovery (`/api`, `/apis`, `/apis/<group>`), renders `KubernetesError` as a
`Status` and logs every request (iterate the emulator). Its own object handlers are replaced
here by ones that go through `Store` (see that module for what kmock lacks), plus:

* authentication and RBAC (`kubeemu_authz`) on every resource request, and an audit log
  (`Emulator.audit`: who did what, and the status code);
* discovery per group-version as the real server lists it (`posttrainingjobs/status` with only
  get/patch/update and no short names, so `kubectl get ptj` is not ambiguous); `/version` 1.32;
* `/openapi/v3` (`kubeemu_openapi`): kubectl's explain, field validation and patch types;
* list responses with `kind: XxxList`, `apiVersion`, `metadata.resourceVersion`, selectors;
  `Table` responses (`kubeemu_table`) when the client asks for them (`kubectl get`, also `-w`);
* watch streams that honour `resourceVersion` (replay from the log, or synthetic ADDED for the
  current state when absent or "0"), `labelSelector`/`fieldSelector` (an object that stops or
  starts matching arrives as DELETED/ADDED), `timeoutSeconds`, `sendInitialEvents` (ending with
  a BOOKMARK), objects as read now (defaulted by the current CRD), and that end when the
  cluster stops or the kind's CRD changes (as the real server tears down that storage);
* PUT (replace), 201 on create, server-side apply (`application/apply-patch+yaml`: 201 when it
  creates), `fieldValidation` (Strict refuses unknown fields; Warn answers `Warning` headers),
  DELETE's `propagationPolicy` (Background, Foreground, Orphan), `dryRun=All` (everything but
  the write), protobuf bodies of kubectl's typed clients (`kubeemu_wire`);
* `/api/v1/namespaces[/<name>[/status]]`, which kmock 0.8 parses as a namespace prefix with
  no resource (or fails on): such paths are renamed before kmock parses them, and the parsed
  resource is set back to `v1/namespaces`.

Reactions added through kmock's DSL take precedence over all of this, for fault injection:
`emulator["post", kmock.resource("ray.io", "v1", "rayjobs")] << 500` fails every RayJob create
over HTTP (and changes nothing); the direct `Cluster` methods do not go through HTTP and are not
authorised (they are the test acting as cluster admin).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import attrs
import kmock

import kubeemu_controllers
import kubeemu_openapi
import kubeemu_table
from kubeemu_admission import Kind, api_error, clone, field_matcher, label_matcher
from kubeemu_apply import APPLY_PATCH
from kubeemu_authz import ADMIN, Attributes, Authority, User, verb_of
from kubeemu_store import Change, Request, Store
from kubeemu_wire import decode

VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
_NAMESPACES_PATH = re.compile(r"/api/v1/namespaces(/[^/]+(/status|/finalize)?)?/?")
_NAMESPACES_ALIAS = "kubeemu-namespaces"  # what kmock parses as a plain plural
_CALLER: contextvars.ContextVar[Attributes | None] = contextvars.ContextVar("kubeemu_caller", default=None)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator with `Store` semantics; lives on one event loop."""

    store: Store = attrs.field(init=False)
    authority: Authority = attrs.field(init=False)
    audit: collections.deque[dict[str, Any]] = attrs.field(factory=lambda: collections.deque(maxlen=2000), init=False)
    # Seconds from a change to the controllers' pass (garbage collector, namespaces); None: only
    # when `run_controllers` is called. Errors of a pass are kept in `controller_errors`.
    gc_delay: float | None = attrs.field(default=0.05)
    controller_errors: list[BaseException] = attrs.field(factory=list, init=False)
    _controllers_due: asyncio.TimerHandle | None = attrs.field(default=None, init=False)
    _waiters: set[asyncio.Future[None]] = attrs.field(factory=set, init=False)
    _closing: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.store = Store(self.objects, on_change=self._wake_watchers, kick=self._schedule_controllers)
        self.authority = Authority(self.store, tokens={}, rbac=False)
        self.fallback[kmock.method.PUT] << self._serve_replace
        self.fallback["get", re.compile(r"/openapi/v3/?")] << self._serve_openapi_index
        self.fallback["get", re.compile(r"/openapi/v3/(.+)")] << self._serve_openapi

    def add_kind(self, kind: Kind) -> None:
        self.store.add_kind(kind)

    def close_watches(self) -> None:
        """End every open watch stream (called before the server stops)."""
        self._closing = True
        self._wake_watchers()
        if self._controllers_due is not None:
            self._controllers_due.cancel()

    def _schedule_controllers(self) -> None:
        if self._controllers_due is None and self.gc_delay is not None and not self._closing:
            self._controllers_due = asyncio.get_running_loop().call_later(self.gc_delay, self.run_controllers)

    def run_controllers(self) -> bool:
        """One pass of the garbage collector and the namespace controller, now (on the loop)."""
        self._controllers_due = None
        try:
            return kubeemu_controllers.run(self.store)
        except Exception as e:  # noqa: BLE001 -- kept for the test, which re-raises it
            self.controller_errors.append(e)
            return False

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
    # changes are ours (in the fallbacks below), so skip straight to kmock's reaction matching,
    # after authenticating and authorising the caller.
    async def _handle(self, request: kmock.Request) -> Any:
        if request.resource is not None and request.resource.plural == _NAMESPACES_ALIAS:
            restored = attrs.evolve(request, resource=kmock.resource("", "v1", "namespaces"))
            self._requests[next(i for i, r in enumerate(self._requests) if r is request)] = restored
            request = restored
        caller = self._attributes(request, self.authority.authenticate(_header(request, "authorization")))
        _CALLER.set(caller)
        if not caller.resource:
            return await kmock.KubernetesScaffold._handle(self, request)
        entry = {"user": caller.user.name, "verb": caller.verb, "group": caller.group, "resource": caller.resource,
                 "subresource": caller.subresource, "namespace": caller.namespace, "name": caller.name, "code": 0}
        self.audit.append(entry)
        try:
            self.authority.check(caller, self.store.kinds.get(request.resource))
            response = await kmock.KubernetesScaffold._handle(self, request)
        except kmock.KubernetesError as e:
            entry["code"], entry["message"] = e.status, e.message
            raise
        entry["code"] = getattr(response, "status", 200)
        return response

    @staticmethod
    def _attributes(request: kmock.Request, user: User) -> Attributes:
        res = request.resource
        if res is None or not res.plural or res.version is None:
            return Attributes(user, request.method.value.lower() if request.method else "get")
        name = request.name or ""
        namespace = request.namespace or (name if res.plural == "namespaces" and res.group == "" else "")
        return Attributes(user, verb_of(str(request.method.value), name=request.name, params=request.params),
                          res.group or "", res.plural, request.subresource or "", namespace, name)

    # --- discovery and OpenAPI ---------------------------------------------------------------------

    def _get_resources(self) -> list[kmock.resource]:
        return [kind.resource for kind in self.store.kinds.values()]

    async def _serve_version(self, request: kmock.Request) -> Any:
        res = request.resource
        assert res is not None
        kinds = [k for k in self.store.kinds.values() if k.group == (res.group or "") and k.version == res.version]
        if not kinds and res.group:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        resources: list[dict[str, Any]] = []
        for k in kinds:
            resources.append({"name": k.plural, "singularName": k.singular or k.kind.lower(), "namespaced": k.namespaced,
                              "kind": k.kind, "verbs": list(VERBS), **({"shortNames": list(k.short_names)}
                                                                     if k.short_names else {}),
                              **({"categories": list(k.categories)} if k.categories else {})})
            if k.status_subresource:  # as the real server lists a subresource: no names to resolve
                resources.append({"name": f"{k.plural}/status", "singularName": "", "namespaced": k.namespaced,
                                  "kind": k.kind, "verbs": ["get", "patch", "update"]})
        return {"apiVersion": "v1", "kind": "APIResourceList", "groupVersion": res.version if not res.group
                else f"{res.group}/{res.version}", "resources": resources}

    async def _serve_server_version(self, request: kmock.Request) -> Any:
        return {"major": "1", "minor": "32", "gitVersion": "v1.32.0+kubeemu", "gitTreeState": "clean",
                "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"}

    async def _serve_openapi_index(self, request: kmock.Request) -> Any:
        return kubeemu_openapi.index(self.store.kinds.values())

    async def _serve_openapi(self, request: kmock.Request) -> Any:
        doc = kubeemu_openapi.document(self.store.kinds.values(), request.url.path.removeprefix("/openapi/v3/"))
        if doc is None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return doc

    # --- reads -------------------------------------------------------------------------------------

    def _kind(self, request: kmock.Request) -> Kind:
        res = request.resource
        assert res is not None
        kind = self.store.kind(res.group or "", res.version or "", res.plural or "")
        if kind.namespaced is False and request.namespace is not None:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return kind

    def _table(self, request: kmock.Request, kind: Kind, items: list[dict[str, Any]]) -> Any:
        return kubeemu_table.table(kind, items, resource_version=self.store.resource_version,
                                   include=request.params.get("includeObject"))

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        if request.subresource not in (None, "status"):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        kind = self._kind(request)
        obj = self.store.get(kind, request.namespace, request.name or "")
        return self._table(request, kind, [obj]) if kubeemu_table.wants_table(_header(request, "accept")) else obj

    async def _serve_list(self, request: kmock.Request) -> Any:
        kind = self._kind(request)
        items = self.store.list(kind, request.namespace, label_selector=request.params.get("labelSelector"),
                                field_selector=request.params.get("fieldSelector"))
        if kubeemu_table.wants_table(_header(request, "accept")):
            return self._table(request, kind, items)
        if not kind.custom:  # built-in lists carry kind/apiVersion on the list only
            for item in items:
                item.pop("kind", None)
                item.pop("apiVersion", None)
        return {"apiVersion": kind.api_version, "kind": f"{kind.kind}List",
                "metadata": {"resourceVersion": self.store.resource_version}, "items": items}

    async def _serve_watch(self, request: kmock.Request) -> Any:
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

        as_table = kubeemu_table.wants_table(_header(request, "accept"))  # `kubectl get -w`

        def shown(obj: dict[str, Any]) -> dict[str, Any]:
            return self._table(request, kind, [obj]) if as_table else obj

        def as_event(change: Change) -> dict[str, Any] | None:
            now, before = matches(change.obj), matches(change.old)
            if change.type == "MODIFIED" and now != before:  # moved into or out of the selection
                return {"type": "ADDED" if now else "DELETED", "object": shown(self.store.served(kind, change.obj))}
            return {"type": change.type, "object": shown(self.store.served(kind, change.obj))} if now else None

        stream = self._stream(kind, since, timeout, matches, as_event, shown,
                              request.params.get("sendInitialEvents") == "true")
        return kmock.Response(headers={"Content-Type": "application/json"}, payload=stream)  # client-go checks it

    async def _stream(self, kind: Kind, since: str, timeout: float | None, matches: Any, as_event: Any,
                      shown: Any, initial_bookmark: bool) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        yield b""  # send the headers now: a watch with nothing to say is still a watch
        cursor = int(since)
        if cursor == 0:  # "start at the most recent": the current state as synthetic ADDED events
            cursor = int(self.store.resource_version)
            for obj in self.store.list(kind):
                if matches(obj):
                    yield {"type": "ADDED", "object": shown(obj)}
            if initial_bookmark:
                yield {"type": "BOOKMARK", "object": {
                    "apiVersion": kind.api_version, "kind": kind.kind, "metadata": {
                        "resourceVersion": str(cursor), "annotations": {"k8s.io/initial-events-end": "true"}}}}
        while not self._closing:
            if self.store.kinds.get(kind.resource) is not kind:
                return  # its CRD changed: the server replaces the storage and ends its watches; clients re-watch
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

    def _write_request(self, request: kmock.Request) -> Request:
        """Field validation, and the admission checks that depend on who is calling."""
        caller = _CALLER.get() or Attributes(ADMIN, "create")

        def owner_kind(api_version: str, kind: str) -> Kind | None:
            try:
                return self.store.kind_of(api_version, kind)
            except kmock.KubernetesError:
                return None

        return Request(validation=request.params.get("fieldValidation"), dry_run=request.params.get("dryRun") == "All",
                       check=lambda kind, new, old: self.authority.owner_references(caller, kind, new, old, owner_kind))

    @staticmethod
    def _body(request: kmock.Request) -> Any:
        if request.data is not None:
            return request.data
        return decode(_header(request, "content-type"), request.body)

    @staticmethod
    def _respond(payload: Any, write: Request, status: int = 200) -> Any:
        headers = {"Warning": ", ".join(f"299 - {json.dumps(w)}" for w in write.warnings)} if write.warnings else None
        return kmock.Response(status=status, payload=payload, headers=headers)

    async def _serve_create(self, request: kmock.Request) -> Any:
        if request.subresource is not None:
            raise api_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        write = self._write_request(request)
        created = self.store.create(self._kind(request), request.namespace, self._body(request), request=write)
        return self._respond(created, write, 201)

    async def _serve_update(self, request: kmock.Request) -> Any:
        content_type = _header(request, "content-type").split(";")[0].strip()
        kind, name, write = self._kind(request), request.name or "", self._write_request(request)
        if content_type == APPLY_PATCH and request.subresource is None:
            caller = _CALLER.get()
            if caller is not None and self.store.find(kind, request.namespace, name) is None:
                self.authority.check(dataclasses.replace(caller, verb="create"), kind)  # apply creates
            obj, created = self.store.apply(kind, request.namespace, name, self._body(request),
                                            manager=request.params.get("fieldManager", ""), request=write)
            return self._respond(obj, write, 201 if created else 200)
        obj = self.store.update(kind, request.namespace, name, patch=self._body(request), patch_type=content_type,
                                subresource=request.subresource, request=write)
        return self._respond(obj, write)

    async def _serve_replace(self, request: kmock.Request) -> Any:
        if request.resource is None or request.name is None:
            raise api_error(405, "MethodNotAllowed", "the server does not allow this method on the requested resource")
        write = self._write_request(request)
        obj = self.store.update(self._kind(request), request.namespace, request.name, body=self._body(request),
                                subresource=request.subresource, request=write)
        return self._respond(obj, write)

    async def _serve_delete(self, request: kmock.Request) -> Any:
        options = request.data if isinstance(request.data, dict) else {}
        propagation = request.params.get("propagationPolicy") or options.get("propagationPolicy")
        if propagation not in (None, "Background", "Foreground", "Orphan"):
            raise api_error(422, "Invalid", f'DeleteOptions.meta.k8s.io "" is invalid: propagationPolicy: Unsupported '
                                            f'value: "{propagation}": supported values: "Foreground", "Background", '
                                            f'"Orphan", "nil"')
        if request.params.get("dryRun") == "All" or "All" in (options.get("dryRun") or ()):  # kubectl: in the body
            return self.store.get(self._kind(request), request.namespace, request.name or "")
        return self.store.delete(self._kind(request), request.namespace, request.name or "", propagation=propagation)


def _header(request: kmock.Request, name: str) -> str:
    return next((v for k, v in request.headers.items() if k.lower() == name), "")


__all__ = ["Emulator", "VERBS", "clone"]
