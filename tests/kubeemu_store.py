"""The emulated cluster's state: create, update, delete, garbage collection, and the watch log.

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
* admission from `kubeemu_admission` on every write (422 `Invalid`), 409 `AlreadyExists`,
  409 `Conflict` on a stale `metadata.resourceVersion`, 404 `NotFound` (object or namespace);
* finalizers (delete sets `deletionTimestamp`; emptying them removes the object, and no new
  finalizer may be added meanwhile) and a garbage collector that deletes dependents whose
  `ownerReferences` name a removed uid (also one created after its owner is gone), at once
  rather than eventually;
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

import jsonpatch
import kmock

from kubeemu_admission import (JSON_PATCH, MANAGED_METADATA, MERGE_PATCH, STRATEGIC_PATCH, Body, Kind, api_error,
                               apply_defaults, clone, configmap_causes, field_matcher, label_matcher, merge_patch,
                               metadata_causes, now, prune, schema_causes, spec_part)

_GENERATE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # what the API server's generateName draws from


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

    def __init__(self, objects: kmock.ObjectsArray, on_change: Callable[[], None] = lambda: None) -> None:
        self.objects = objects
        self.kinds: dict[kmock.resource, Kind] = {}
        self.log: list[Change] = []
        self._log_rvs: list[int] = []
        self._rv = 0
        self._on_change = on_change

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

    def _find(self, kind: Kind, namespace: str | None, name: str) -> Body | None:
        key = (kind.resource, namespace if kind.namespaced else None, name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _live(self) -> Iterator[tuple[Kind, Body]]:
        for (resource, _, _), obj in list(self.objects.items()):
            if not obj.deleted and resource in self.kinds:
                yield self.kinds[resource], obj.raw

    def get(self, kind: Kind, namespace: str | None, name: str) -> Body:
        found = self._find(kind, namespace, name)
        if found is None:
            raise api_error(404, "NotFound", f'{kind.qualified} "{name}" not found',
                            name=name, group=kind.group, kind=kind.plural)
        return clone(found)

    def list(self, kind: Kind, namespace: str | None = None, *, label_selector: str | None = None,
             field_selector: str | None = None) -> list[Body]:
        labels_match, fields_match = label_matcher(label_selector), field_matcher(field_selector, kind)
        items = [obj for k, obj in self._live() if k == kind
                 and (namespace is None or obj["metadata"].get("namespace") == namespace)
                 and labels_match(obj["metadata"].get("labels") or {}) and fields_match(obj)]
        items.sort(key=lambda o: (o["metadata"].get("namespace") or "", o["metadata"]["name"]))
        return clone(items)

    def changes_after(self, rv: int) -> list[Change]:
        return self.log[bisect.bisect_right(self._log_rvs, rv):]

    # --- writes ------------------------------------------------------------------------------------

    def create(self, kind: Kind, namespace: str | None, body: Any) -> Body:
        obj = self._typed(kind, body)
        meta = obj["metadata"]
        if kind.namespaced:
            if namespace and meta.get("namespace") not in (None, namespace):
                raise api_error(400, "BadRequest", "the namespace of the provided object does not match "
                                                   "the namespace sent on the request")
            meta["namespace"] = namespace or meta.get("namespace") or "default"
            self._require_namespace(meta["namespace"])
        else:
            meta.pop("namespace", None)
        if meta.get("resourceVersion"):
            raise api_error(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + "".join(random.choices(_GENERATE_ALPHABET, k=5))
        if not meta.get("name"):
            raise self._invalid(kind, "", [{"reason": "FieldValueRequired", "field": "metadata.name",
                                            "message": "Required value: name or generateName is required"}])
        if self._find(kind, meta.get("namespace"), meta["name"]) is not None:
            raise api_error(409, "AlreadyExists", f'{kind.qualified} "{meta["name"]}" already exists',
                            name=meta["name"], group=kind.group, kind=kind.plural)
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
        obj = self._admit(kind, obj)
        self._commit(kind, "ADDED", obj)
        refs = meta.get("ownerReferences") or []
        if refs:
            # The garbage collector also removes a dependent whose owners are all gone already
            # (created by a controller that raced the owner's deletion): at once here, eventually there.
            live = {o["metadata"]["uid"] for _, o in self._live()}
            if not any(ref.get("uid") in live for ref in refs):
                self.delete(kind, meta.get("namespace"), meta["name"])
        return clone(obj)

    def update(self, kind: Kind, namespace: str | None, name: str, *, patch: Any = None,
               patch_type: str | None = None, body: Any = None, subresource: str | None = None) -> Body:
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
                raise self._invalid(kind, name, [{"reason": "FieldValueInvalid", "field": "metadata.resourceVersion",
                                                  "message": "Invalid value: 0x0: must be specified for an update"}])
        else:
            new = self._patched(kind, old, patch, patch_type)
        sent_rv = (new.get("metadata") or {}).get("resourceVersion") if isinstance(new, dict) else None
        if sent_rv is not None and sent_rv != old["metadata"]["resourceVersion"]:
            raise api_error(409, "Conflict", f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object '
                                             "has been modified; please apply your changes to the latest version and "
                                             "try again", name=name, group=kind.group, kind=kind.plural)
        new = self._keep_managed(kind, old, new, subresource)
        new = self._admit(kind, new)
        if new == old:
            return old  # a no-op write: same resourceVersion, no event
        if kind.custom and spec_part(new) != spec_part(old):
            new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        self._commit(kind, "MODIFIED", new, old)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(kind, new)
        return clone(new)

    def delete(self, kind: Kind, namespace: str | None, name: str, *, propagation: str | None = None) -> Body:
        """Remove the object, or mark it for deletion while finalizers remain; dependents follow."""
        obj = self.get(kind, namespace, name)
        meta = obj["metadata"]
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                old = clone(obj)
                meta.update(deletionTimestamp=now(), deletionGracePeriodSeconds=0)
                self._commit(kind, "MODIFIED", obj, old)
            return clone(obj)
        self._remove(kind, obj, orphan=propagation == "Orphan")
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success",
                "details": {"name": name, "group": kind.group, "kind": kind.plural, "uid": meta["uid"]}}

    # --- internals ---------------------------------------------------------------------------------

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

    def _patched(self, kind: Kind, old: Body, patch: Any, patch_type: str | None) -> Any:
        if patch_type == JSON_PATCH:
            try:
                return jsonpatch.apply_patch(old, patch)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                raise self._invalid(kind, old["metadata"]["name"], [{"reason": "FieldValueInvalid", "field": "",
                                                                     "message": f"the patch failed: {e}"}]) from None
            except (TypeError, AttributeError, KeyError) as e:
                raise api_error(400, "BadRequest", f"invalid JSON patch: {e}") from None
        if patch_type == MERGE_PATCH or (patch_type == STRATEGIC_PATCH and not kind.custom):
            # Strategic merge is approximated by a merge patch: lists are replaced, not merged by key.
            if not isinstance(patch, dict):
                raise api_error(400, "BadRequest", "a merge patch must be a JSON object")
            return merge_patch(clone(old), patch)
        raise api_error(415, "UnsupportedMediaType",
                        f"the body of the request was in an unknown format ({patch_type}) - accepted media types "
                        f"include: {JSON_PATCH}, {MERGE_PATCH}" + ("" if kind.custom else f", {STRATEGIC_PATCH}"))

    def _keep_managed(self, kind: Kind, old: Body, new: Any, subresource: str | None) -> Body:
        if not isinstance(new, dict) or not isinstance(new.get("metadata", {}), dict):
            raise self._invalid(kind, old["metadata"]["name"], [{"reason": "FieldValueInvalid", "field": "metadata",
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
        new["apiVersion"], new["kind"] = kind.api_version, kind.kind
        if kind.status_subresource:  # the main resource keeps the stored status
            new.pop("status", None)
            if "status" in old:
                new["status"] = old["status"]
        added = set(meta.get("finalizers") or ()) - set(old["metadata"].get("finalizers") or ())
        if old["metadata"].get("deletionTimestamp") and added:
            raise self._invalid(kind, old["metadata"]["name"], [{
                "reason": "FieldValueForbidden", "field": "metadata.finalizers",
                "message": f"Forbidden: no new finalizers can be added if the object is being deleted, "
                           f"found new finalizers {sorted(added)}"}])
        return new

    def _admit(self, kind: Kind, obj: Body) -> Body:
        """Prune, default and validate the object as it would be stored; raise 422 with every cause."""
        if kind.schema is not None:
            content = prune({k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}, kind.schema)
            apply_defaults(content, kind.schema)
            obj = {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "metadata": obj["metadata"], **content}
        causes = metadata_causes(kind, obj["metadata"])
        if kind.validator is not None:
            causes += schema_causes(kind, obj)
        if kind.kind == "ConfigMap":
            causes += configmap_causes(obj)
        if causes:
            raise self._invalid(kind, obj["metadata"].get("name", ""), causes)
        return obj

    def _invalid(self, kind: Kind, name: str, causes: list[dict[str, str]]) -> kmock.KubernetesError:
        said = [f"{c['field']}: {c['message']}" if c["field"] else c["message"] for c in causes]
        title = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
        return api_error(422, "Invalid", f'{title} "{name}" is invalid: '
                                         + (said[0] if len(said) == 1 else "[" + ", ".join(said) + "]"),
                         name=name, group=kind.group, kind=kind.kind, causes=causes)

    def _require_namespace(self, namespace: str) -> None:
        namespaces = self.kinds.get(kmock.resource("", "v1", "namespaces"))
        if namespaces is not None and self._find(namespaces, None, namespace) is None:
            raise api_error(404, "NotFound", f'namespaces "{namespace}" not found',
                            name=namespace, group="", kind="namespaces")

    def _commit(self, kind: Kind, event: str, obj: Body, old: Body | None = None) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        key = (kind.resource, obj["metadata"].get("namespace"), obj["metadata"]["name"])
        if event == "DELETED":
            self.objects[key].delete()
        elif key in self.objects:
            self.objects[key].create(clone(obj))  # a new version in kmock's history
        else:
            self.objects[key] = clone(obj)
        self.log.append(Change(self._rv, kind, event, clone(obj), old))
        self._log_rvs.append(self._rv)
        self._on_change()

    def _remove(self, kind: Kind, obj: Body, *, orphan: bool = False) -> None:
        self._commit(kind, "DELETED", obj)
        if kind.kind == "Namespace":  # a namespace takes its contents with it
            contents = [(k, child["metadata"]["name"]) for k, child in self._live()
                        if child["metadata"].get("namespace") == obj["metadata"]["name"]]
            for k, name in contents:
                if self._find(k, obj["metadata"]["name"], name) is not None:
                    self.delete(k, obj["metadata"]["name"], name)
        self._collect_garbage(obj["metadata"]["uid"], orphan=orphan)

    def _collect_garbage(self, owner_uid: str, *, orphan: bool) -> None:
        """Delete (or, orphaning, release) every dependent whose ownerReferences name `owner_uid`."""
        live_uids = {obj["metadata"]["uid"] for _, obj in self._live()}
        for kind, obj in self._live():
            meta, refs = obj["metadata"], obj["metadata"].get("ownerReferences") or []
            if not any(ref.get("uid") == owner_uid for ref in refs):
                continue
            if self._find(kind, meta.get("namespace"), meta["name"]) is None:
                continue  # removed by an earlier step of this cascade
            others = [ref for ref in refs if ref.get("uid") != owner_uid]
            if orphan:
                self.update(kind, meta.get("namespace"), meta["name"], patch_type=MERGE_PATCH,
                            patch={"metadata": {"ownerReferences": others or None}})
            elif not any(ref.get("uid") in live_uids for ref in others):
                self.delete(kind, meta.get("namespace"), meta["name"])
