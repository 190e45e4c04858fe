"""The emulated cluster's state: create, update, apply, delete, and the watch log.

kmock's `KubernetesEmulator` stores request bodies as they come: no uid, resourceVersion or
generation, `status` patched like any field, no schema, no generateName, a JSON-patch `test`
failure is a 500. `Store` keeps the objects in kmock's own `ObjectsArray` (so kmock's history
views still work: `objects[resource, ns, name].history`) but decides every change the way
kube-apiserver does:

* server-managed metadata: `uid`, one cluster-wide monotonic `resourceVersion`, `generation`
  (custom resources only; bumped when anything but metadata/status changes),
  `creationTimestamp`, `deletionTimestamp`; `generateName`;
* the status subresource: writes to the main resource keep the stored `status`, writes to
  `/status` change nothing else; create drops `status`;
* admission from `kubeemu_admission` on every write: pruning with `fieldValidation` (Strict: 400
  naming each unknown field; Warn, the default: a warning each), defaults, schema and CEL rules
  (422 `Invalid`), 409 `AlreadyExists`, 409 `Conflict` on a stale `metadata.resourceVersion`,
  404 `NotFound` (object or namespace), 403 `Forbidden` for new objects in a Terminating namespace;
* reads (get, list, watch events) default what is stored with the Kind served now, so a
  default added by a newer CRD shows on objects written before it (as on a real server);
* a CRD written here replaces the Kind it serves (`kubeemu_crds`); deleting it removes its objects;
* server-side apply (`kubeemu_apply`): create when absent, merge when present, managedFields;
* finalizers (delete sets `deletionTimestamp`; emptying them removes the object, and no new
  finalizer may be added meanwhile); `propagationPolicy` Foreground and Orphan add the
  `foregroundDeletion` / `orphan` finalizer; deleting a namespace makes it Terminating. The
  garbage collector and namespace controller (`kubeemu_controllers`) then act eventually: every
  change that may need them calls `kick`, which the emulator turns into a delayed pass;
* a write that changes nothing bumps nothing and emits no watch event.

Every method runs on the emulator's event-loop thread and never awaits, so each call is
atomic: the loop is the lock. Errors are `kmock.KubernetesError`, rendered as a `Status`.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import kmock

import kubeemu_apply
import kubeemu_controllers
import kubeemu_crds
from kubeemu_admission import (MANAGED_METADATA, Body, Kind, api_error, apply_defaults, clone, configmap_causes,
                               field_matcher, invalid, label_matcher, metadata_causes, now, patched, prune, schema_causes,
                               spec_part, unknown_metadata)
from kubeemu_cel import rule_causes

_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server's generateName draws from
_UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public")


@dataclasses.dataclass
class Request:
    """What a write request brings besides its body (direct `Cluster` calls pass none)."""

    validation: str | None = None  # fieldValidation: Strict, Warn (also when None) or Ignore
    warnings: list[str] = dataclasses.field(default_factory=list)  # sent back as Warning headers
    check: Callable[[Kind, Body, Body | None], None] | None = None  # validating admission for the caller
    dry_run: bool = False  # dryRun=All: everything but the write



@dataclasses.dataclass(frozen=True)
class Change:
    """One watch-log entry: what happened at `rv`; `old` is the state before a MODIFIED."""

    rv: int
    kind: Kind
    type: str  # ADDED, MODIFIED, DELETED
    obj: Body
    old: Body | None = None


class Store:
    """All objects of the emulated cluster, keyed by (resource, namespace, name) in kmock's array."""

    def __init__(self, objects: kmock.ObjectsArray, on_change: Callable[[], None] = lambda: None,
                 kick: Callable[[], None] = lambda: None) -> None:
        self.objects = objects
        self.kinds: dict[kmock.resource, Kind] = {}
        self.log: list[Change] = []
        self._log_rvs: list[int] = []
        self._rv = 0
        self.changed_at: dict[kmock.resource, int] = {}  # resource -> resourceVersion of its newest change
        # resource -> namespace -> name -> the live object as stored (kmock's `raw`), kept by `_commit`: a list
        # reads only its kind and namespace, not every object of the cluster (a burst of thousands stays linear).
        self._live: dict[kmock.resource, dict[str | None, dict[str, Body]]] = {}
        self._on_change = on_change
        self._kick = kick

    # --- lookups -----------------------------------------------------------------------------------

    @property
    def resource_version(self) -> str:
        return str(self._rv)

    def add_kind(self, kind: Kind) -> None:
        self.kinds[kind.resource] = kind

    def kind(self, group: str, version: str, plural: str) -> Kind:
        try:
            return self.kinds[kmock.resource(group, version, plural)]
        except KeyError:
            raise api_error(404, "NotFound", "the server could not find the requested resource") from None

    def kind_of(self, api_version: str, kind: str) -> Kind:
        for known in self.kinds.values():
            if known.api_version == api_version and known.kind == kind:
                return known
        raise api_error(404, "NotFound", f"no matches for kind {kind!r} in version {api_version!r}")

    def namespaces_kind(self) -> Kind | None:
        return self.kinds.get(kmock.resource("", "v1", "namespaces"))

    def find(self, kind: Kind, namespace: str | None, name: str) -> Body | None:
        """The stored object as written (no read-time defaults), or None."""
        found = self._live.get(kind.resource, {}).get(namespace if kind.namespaced else None, {}).get(name)
        return dict(found) if found is not None else None  # a shallow copy, as kmock's `raw`

    def live(self) -> Iterator[tuple[Kind, Body]]:
        for (resource, _, _), obj in list(self.objects.items()):
            if not obj.deleted and resource in self.kinds:
                yield self.kinds[resource], obj.raw

    def served(self, kind: Kind, obj: Body) -> Body:
        """A copy of stored `obj` as a read returns it: defaulted by the Kind served now."""
        out = clone(obj)
        current = self.kinds.get(kind.resource, kind)
        if current.schema is not None:
            apply_defaults(out, current.schema)
        return out

    def get(self, kind: Kind, namespace: str | None, name: str) -> Body:
        found = self.find(kind, namespace, name)
        if found is None:
            raise api_error(404, "NotFound", f'{kind.qualified} "{name}" not found',
                            name=name, group=kind.group, kind=kind.plural)
        return self.served(kind, found)

    def list(self, kind: Kind, namespace: str | None = None, *, label_selector: str | None = None,
             field_selector: str | None = None) -> list[Body]:
        labels_match, fields_match = label_matcher(label_selector), field_matcher(field_selector, kind)
        if kind.resource not in self.kinds or self.kinds[kind.resource] != kind:
            return []
        by_namespace = self._live.get(kind.resource, {})
        scopes = by_namespace.values() if namespace is None else [by_namespace.get(namespace, {})]
        items = [obj for scope in scopes for obj in scope.values()
                 if labels_match(obj["metadata"].get("labels") or {}) and fields_match(obj)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return [self.served(kind, o) for o in items]

    def changes_after(self, rv: int) -> list[Change]:
        return self.log[bisect.bisect_right(self._log_rvs, rv):]

    # --- writes ------------------------------------------------------------------------------------

    def create(self, kind: Kind, namespace: str | None, body: Any, *, request: Request | None = None) -> Body:
        obj = self._typed(kind, body)
        meta = obj["metadata"]
        if kind.namespaced:
            if namespace and meta.get("namespace") not in (None, namespace):
                raise api_error(400, "BadRequest", "the namespace of the provided object does not match "
                                                   "the namespace sent on the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise api_error(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
        if not meta.get("name"):
            raise invalid(kind, "", [{"reason": "FieldValueRequired", "field": "metadata.name",
                                      "message": "Required value: name or generateName is required"}])
        if kind.namespaced:
            self._require_namespace(meta["namespace"], kind, meta["name"])
        for field in MANAGED_METADATA[2:]:
            meta.pop(field, None)
        if kind.status_subresource:
            obj.pop("status", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if kind.custom:
            meta["generation"] = 1
        if kind.kind == "Namespace":
            obj["status"] = {"phase": "Active"}
            obj["spec"] = {"finalizers": ["kubernetes"]}
        obj = self._admit(kind, obj, None, request)
        if self.find(kind, meta.get("namespace"), meta["name"]) is not None:  # storage answers after admission
            raise api_error(409, "AlreadyExists", f'{kind.qualified} "{meta["name"]}" already exists',
                            name=meta["name"], group=kind.group, kind=kind.plural)
        if request is not None and request.dry_run:
            return clone(obj)
        self._commit(kind, "ADDED", obj)
        return clone(obj)

    def update(self, kind: Kind, namespace: str | None, name: str, *, patch: Any = None,
               patch_type: str | None = None, body: Any = None, subresource: str | None = None,
               request: Request | None = None) -> Body:
        """PATCH (`patch` with its content type) or PUT (`body`) the object or its `/status`."""
        if subresource not in (None, "status") or (subresource == "status" and not kind.status_subresource):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        old = self.get(kind, namespace, name)
        if body is not None:
            new = self._typed(kind, body)
            if new["metadata"].get("name") not in (None, name):
                raise api_error(400, "BadRequest", f"the name of the object ({new['metadata']['name']}) "
                                                   f"does not match the name on the URL ({name})")
            if kind.custom and not new["metadata"].get("resourceVersion"):
                raise invalid(kind, name, [{"reason": "FieldValueInvalid", "field": "metadata.resourceVersion",
                                            "message": "Invalid value: 0x0: must be specified for an update"}])
        else:
            new = patched(kind, old, patch, patch_type)
        return self._write(kind, old, new, subresource, request)

    def apply(self, kind: Kind, namespace: str | None, name: str, body: Any, *, manager: str,
              request: Request | None = None) -> tuple[Body, bool]:
        """Server-side apply of the configuration `body`; returns (object, whether it was created)."""
        applied = self._typed(kind, body)
        if applied["metadata"].get("name") not in (None, name):
            raise api_error(400, "BadRequest", f"the name of the object ({applied['metadata']['name']}) "
                                               f"does not match the name on the URL ({name})")
        if not manager:
            raise api_error(400, "BadRequest", "PATCH requests with apply content type must have a fieldManager")
        stored = self.find(kind, namespace, name)
        old = None if stored is None else self.get(kind, namespace, name)
        new = kubeemu_apply.apply(old, applied, manager=manager, api_version=kind.api_version, time=now())
        if old is None:
            new["metadata"]["name"] = name
            return self.create(kind, namespace, new, request=request), True
        return self._write(kind, old, new, None, request), False

    def delete(self, kind: Kind, namespace: str | None, name: str, *, propagation: str | None = None) -> Body:
        """Remove the object, or mark it for deletion while finalizers remain; dependents follow."""
        obj = self.get(kind, namespace, name)
        meta = obj["metadata"]
        if kind.kind == "Namespace":
            return self._terminate_namespace(kind, obj)
        extra = {"Foreground": kubeemu_controllers.FOREGROUND, "Orphan": kubeemu_controllers.ORPHAN}.get(propagation or "")
        finalizers = list(meta.get("finalizers") or ())
        if finalizers or extra:
            if not meta.get("deletionTimestamp") or (extra and extra not in finalizers):
                old = clone(obj)
                meta.update(deletionTimestamp=meta.get("deletionTimestamp") or now(), deletionGracePeriodSeconds=0)
                if extra and extra not in finalizers:
                    meta["finalizers"] = [*finalizers, extra]
                self._commit(kind, "MODIFIED", obj, old)
            return clone(obj)
        self.remove(kind, obj)
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": kind.group, "kind": kind.plural, "uid": meta["uid"]}}

    def remove(self, kind: Kind, obj: Body) -> None:
        """Take the object out of the store now (its finalizers are done); dependents follow eventually."""
        self._commit(kind, "DELETED", clone(obj))

    # --- internals ---------------------------------------------------------------------------------

    def _terminate_namespace(self, kind: Kind, obj: Body) -> Body:
        name = obj["metadata"]["name"]
        if name in _UNDELETABLE_NAMESPACES:
            raise api_error(403, "Forbidden", f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                            name=name, group="", kind="namespaces")
        if not obj["metadata"].get("deletionTimestamp"):
            old = clone(obj)
            obj["metadata"]["deletionTimestamp"] = now()
            obj["status"] = {**(obj.get("status") or {}), "phase": "Terminating"}
            self._commit(kind, "MODIFIED", obj, old)
        return clone(obj)

    def _write(self, kind: Kind, old: Body, new: Any, subresource: str | None, request: Request | None) -> Body:
        name = old["metadata"]["name"]
        sent_rv = (new.get("metadata") or {}).get("resourceVersion") if isinstance(new, dict) else None
        if sent_rv is not None and sent_rv != old["metadata"]["resourceVersion"]:
            raise api_error(409, "Conflict", f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object '
                                             "has been modified; please apply your changes to the latest version and "
                                             "try again", name=name, group=kind.group, kind=kind.plural)
        new = self._keep_managed(kind, old, new, subresource)
        new = self._admit(kind, new, old, request)
        if new == old:
            return old  # a no-op write: same resourceVersion, no event
        if kind.custom and spec_part(new) != spec_part(old):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if request is not None and request.dry_run:
            return clone(new)
        self._commit(kind, "MODIFIED", new, old)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers") and kind.kind != "Namespace":
            self.remove(kind, new)
        return clone(new)

    def _typed(self, kind: Kind, body: Any) -> Body:
        if not isinstance(body, dict) or not isinstance(body.get("metadata", {}), dict):
            raise api_error(400, "BadRequest", "the body of the request is not a Kubernetes object")
        try:
            obj = clone(body)
        except (TypeError, ValueError) as e:
            raise api_error(400, "BadRequest", f"the object is not JSON: {e}") from None
        if obj.setdefault("apiVersion", kind.api_version) != kind.api_version or obj.setdefault(
                "kind", kind.kind) != kind.kind:
            raise api_error(400, "BadRequest", f"the object {obj['apiVersion']}/{obj['kind']} does not belong at "
                                               f"{kind.api_version}/{kind.plural}")
        obj.setdefault("metadata", {})
        return obj

    def _keep_managed(self, kind: Kind, old: Body, new: Any, subresource: str | None) -> Body:
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise invalid(kind, old["metadata"]["name"], [{"reason": "FieldValueInvalid", "field": "metadata",
                                                           "message": "Invalid value: must be an object"}])
        if subresource == "status":  # /status changes the status and nothing else
            result = clone(old)
            result.pop("status", None)
            if new.get("status") is not None:
                result["status"] = new["status"]
            return result
        meta = new.setdefault("metadata", {})
        for field in MANAGED_METADATA:
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        if "managedFields" not in meta and "managedFields" in old["metadata"]:  # kept unless a client sets them
            meta["managedFields"] = old["metadata"]["managedFields"]
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        if kind.status_subresource:  # the main resource keeps the stored status
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        added = set(meta.get("finalizers") or ()) - set(old["metadata"].get("finalizers") or ())
        if old["metadata"].get("deletionTimestamp") and added:
            raise invalid(kind, old["metadata"]["name"], [{
                "reason": "FieldValueForbidden", "field": "metadata.finalizers",
                "message": f"Forbidden: no new finalizers can be added if the object is being deleted, "
                           f"found new finalizers {sorted(added)}"}])
        return new

    def _admit(self, kind: Kind, obj: Body, old: Body | None, request: Request | None) -> Body:
        """Prune, default and validate the object as it would be stored; raise 422 with every cause."""
        request = request or Request()
        if kind.schema is not None:
            unknown: list[str] = []
            content = prune({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")},
                            kind.schema, (), unknown)
            unknown += unknown_metadata(obj["metadata"])
            if unknown and request.validation == "Strict":
                raise api_error(400, "BadRequest", f'{kind.kind} in version "{kind.version}" cannot be handled as a '
                                                   f"{kind.kind}: strict decoding error: "
                                + ", ".join(f'unknown field "{u}"' for u in unknown))
            if request.validation != "Ignore":
                request.warnings += [f'unknown field "{u}"' for u in unknown]
            apply_defaults(content, kind.schema)
            obj = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": obj["metadata"], **content}
        causes = metadata_causes(kind, obj["metadata"])
        if kind.validator is not None:
            causes += schema_causes(kind, obj)
        if kind.rules is not None and not any(c["reason"] == "FieldValueTypeInvalid" for c in causes):
            causes += rule_causes(kind.rules, obj, old)  # type errors block CEL, as on the server
        if kind.kind == "ConfigMap":
            causes += configmap_causes(obj)
        if kubeemu_crds.is_crd_kind(kind) and not causes:
            causes += kubeemu_crds.crd_causes(obj)
            if not causes:
                obj["status"] = kubeemu_crds.crd_status(obj, (old or {}).get("metadata", {}).get("creationTimestamp")
                                                        or now())
        if causes:
            raise invalid(kind, obj["metadata"].get("name", ""), causes)
        if request.check is not None:
            request.check(kind, obj, old)
        return obj

    def _require_namespace(self, namespace: str, kind: Kind, name: str) -> None:
        namespaces = self.namespaces_kind()
        found = None if namespaces is None else self.find(namespaces, None, namespace)
        if namespaces is not None and found is None:
            raise api_error(404, "NotFound", f'namespaces "{namespace}" not found',
                            name=namespace, group="", kind="namespaces")
        if found is not None and found["metadata"].get("deletionTimestamp"):  # the NamespaceLifecycle plugin
            raise api_error(403, "Forbidden", f'{kind.qualified} "{name}" is forbidden: unable to create new content '
                                              f"in namespace {namespace} because it is being terminated",
                            name=name, group=kind.group, kind=kind.plural)

    def _commit(self, kind: Kind, event: str, obj: Body, old: Body | None = None) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = (kind.resource, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        scope = self._live.setdefault(kind.resource, {}).setdefault(key[1], {})
        if event == "DELETED":
            self.objects[key].delete()
            scope.pop(key[2], None)
        else:
            stored = clone(obj)
            if key in self.objects:
                self.objects[key].create(stored)  # a new version in kmock's history
            else:
                self.objects[key] = stored
            scope[key[2]] = stored
        self.changed_at[kind.resource] = self._rv
        self.log.append(Change(self._rv, kind, event, clone(obj), old))
        self._log_rvs.append(self._rv)
        if kubeemu_crds.is_crd_kind(kind):
            self._serve_crd(obj, removed=event == "DELETED")
        self._on_change()
        meta = obj["metadata"]
        if event == "DELETED" or meta.get("deletionTimestamp") or meta.get("ownerReferences"):
            self._kick()  # work for the garbage collector or the namespace controller

    def _serve_crd(self, crd: Body, *, removed: bool) -> None:
        before = kubeemu_crds.kinds_of(crd, self.kinds.values())
        if removed:  # a CRD takes its objects with it
            for kind, obj in [(k, o) for k, o in self.live() if k in before]:
                self._commit(kind, "DELETED", clone(obj))
            for kind in before:
                del self.kinds[kind.resource]
            return
        served = kubeemu_crds.served_kind(crd, before)
        for kind in before:
            if kind.resource != served.resource:
                del self.kinds[kind.resource]
        self.kinds[served.resource] = served
