"""The cluster's own controllers: the garbage collector and the namespace controller.

kube-controller-manager runs them next to the API server; they act eventually, never inside the
request that caused the work. Here `run(store)` is one pass of both, which the emulator schedules
on its event loop a short, configurable delay (`Cluster(gc_delay=...)`) after a change that may
need it (an object removed, an owner marked for deletion, a dependent created, a namespace
deleted); a pass that changes something schedules the next, so cascades finish on their own.

Garbage collector (ownerReferences, matched by uid):
* a dependent all of whose owners are gone is deleted (background);
* an owner deleted with `propagationPolicy=Foreground` carries the `foregroundDeletion`
  finalizer: its dependents are deleted, then the finalizer is removed (and the owner with it);
* `propagationPolicy=Orphan` carries the `orphan` finalizer: the dependents lose their
  ownerReferences to it, then the finalizer is removed.

Namespace controller: a namespace with a `deletionTimestamp` (phase Terminating) has all its
contents deleted; objects with finalizers stay until those are removed, and the namespace
reports what remains in its conditions; once empty, its `spec.finalizers` ("kubernetes") are
cleared and it is removed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kubeemu_admission import MERGE_PATCH

if TYPE_CHECKING:
    from kubeemu_store import Store

FOREGROUND, ORPHAN = "foregroundDeletion", "orphan"


def run(store: Store) -> bool:
    """One pass of both controllers; True when it changed something (another pass may be due)."""
    before = store.resource_version
    collect_garbage(store)
    finalize_namespaces(store)
    return store.resource_version != before


def _refs(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in obj["metadata"].get("ownerReferences") or () if isinstance(r, dict)]


def _drop_finalizer(store: Store, kind: Any, obj: dict[str, Any], finalizer: str) -> None:
    meta = obj["metadata"]
    rest = [f for f in meta.get("finalizers") or () if f != finalizer]
    store.update(kind, meta.get("namespace"), meta["name"], patch_type=MERGE_PATCH,
                 patch={"metadata": {"finalizers": rest or None}})


def collect_garbage(store: Store) -> None:
    live = list(store.live())
    uids = {obj["metadata"]["uid"] for _, obj in live}
    dependents: dict[str, list[tuple[Any, dict[str, Any]]]] = {}
    for kind, obj in live:
        for ref in _refs(obj):
            dependents.setdefault(ref.get("uid", ""), []).append((kind, obj))

    for kind, seen in live:
        obj = store.find(kind, seen["metadata"].get("namespace"), seen["metadata"]["name"])
        if obj is None:
            continue  # removed earlier in this pass
        meta = obj["metadata"]
        finalizers = meta.get("finalizers") or ()
        mine = [d for d in dependents.get(meta["uid"], ()) if store.find(d[0], d[1]["metadata"].get("namespace"),
                                                                          d[1]["metadata"]["name"]) is not None]
        if meta.get("deletionTimestamp") and ORPHAN in finalizers:
            for dep_kind, dep in mine:
                others = [r for r in _refs(dep) if r.get("uid") != meta["uid"]]
                store.update(dep_kind, dep["metadata"].get("namespace"), dep["metadata"]["name"], patch_type=MERGE_PATCH,
                             patch={"metadata": {"ownerReferences": others or None}})
            _drop_finalizer(store, kind, obj, ORPHAN)
        elif meta.get("deletionTimestamp") and FOREGROUND in finalizers:
            for dep_kind, dep in mine:
                if not dep["metadata"].get("deletionTimestamp"):
                    store.delete(dep_kind, dep["metadata"].get("namespace"), dep["metadata"]["name"])
            if not any(store.find(k, d["metadata"].get("namespace"), d["metadata"]["name"]) for k, d in mine):
                _drop_finalizer(store, kind, obj, FOREGROUND)

    for kind, obj in live:
        meta, refs = obj["metadata"], _refs(obj)
        if refs and not any(r.get("uid") in uids for r in refs) and not meta.get("deletionTimestamp"):
            if store.find(kind, meta.get("namespace"), meta["name"]) is not None:
                store.delete(kind, meta.get("namespace"), meta["name"])


def finalize_namespaces(store: Store) -> None:
    namespaces = store.namespaces_kind()
    if namespaces is None:
        return
    for ns in [obj for _, obj in store.live() if obj.get("kind") == "Namespace" and obj["metadata"].get("deletionTimestamp")]:
        name = ns["metadata"]["name"]
        for kind, obj in [(k, o) for k, o in store.live() if o["metadata"].get("namespace") == name]:
            if not obj["metadata"].get("deletionTimestamp"):
                store.delete(kind, name, obj["metadata"]["name"])
        remaining = [(k, o) for k, o in store.live() if o["metadata"].get("namespace") == name]
        if remaining:
            held: dict[str, int] = {}
            for _, o in remaining:
                for f in o["metadata"].get("finalizers") or ():
                    held[f] = held.get(f, 0) + 1
            message = ("Some content in the namespace has finalizers remaining: "
                       + ", ".join(f"{f} in {n} resource instances" for f, n in sorted(held.items())))
            conditions = [{"type": "NamespaceContentRemaining", "status": "True", "reason": "SomeResourcesRemain",
                           "message": f"Some resources are remaining: {len(remaining)} objects"},
                          {"type": "NamespaceFinalizersRemaining", "status": "True" if held else "False",
                           "reason": "SomeFinalizersRemain" if held else "ContentHasNoFinalizers",
                           "message": message if held else "All content-preserving finalizers finished"}]
            if (ns.get("status") or {}).get("conditions") != conditions:
                store.update(namespaces, None, name, subresource="status", patch_type=MERGE_PATCH,
                             patch={"status": {"conditions": conditions}})
            continue
        if (ns.get("spec") or {}).get("finalizers"):
            store.update(namespaces, None, name, patch_type=MERGE_PATCH, patch={"spec": {"finalizers": None}})
        current = store.find(namespaces, None, name)
        if current is not None and not current["metadata"].get("finalizers"):
            store.remove(namespaces, current)
