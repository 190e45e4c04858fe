"""Server-side apply (`PATCH` with `application/apply-patch+yaml`), reduced to what a single applier sees.

`apply(live, applied, manager=..., api_version=..., time=...)` returns the object to store: the
applied configuration merged into the live object (maps merge key by key; lists and scalars
are replaced whole, as atomic), minus the fields this manager applied last time and no longer
applies, with `metadata.managedFields` holding one `Apply` entry per manager whose `fieldsV1`
lists the fields it applied (`{"f:spec": {"f:training": {"f:maxSteps": {}}}}`)::

    stored = apply(None, config, manager="kubectl", api_version="posttrain.dev/v1alpha1", time=now())

`live` None means the object does not exist: apply creates it from the configuration.

Not modelled: conflicts between managers (a field another manager set is silently taken over:
`force` changes nothing), ownership of fields changed by ordinary updates (only `Apply` entries
are recorded), merging of list items by key (`x-kubernetes-list-type: map` lists are atomic here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from kubeemu_admission import APPLY_PATCH

__all__ = ["APPLY_PATCH", "apply", "fields_of", "merge"]

# Identity and server-written metadata: never owned by an applier.
_UNOWNED_METADATA = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                     "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields", "selfLink")

Fields = dict[str, Any]


def fields_of(value: Mapping[str, Any], *, top: bool = True) -> Fields:
    """The fieldsV1 set of an applied configuration: every leaf path, maps nested, lists atomic."""
    out: Fields = {}
    for key, sub in value.items():
        if top and key in ("apiVersion", "kind"):
            continue
        if top and key == "metadata" and isinstance(sub, Mapping):
            sub = {k: v for k, v in sub.items() if k not in _UNOWNED_METADATA}
            if not sub:
                continue
        out[f"f:{key}"] = fields_of(sub, top=False) if isinstance(sub, Mapping) and sub else {}
    return out


def merge(live: Any, applied: Any) -> Any:
    """Maps merge key by key; anything else in `applied` replaces what `live` has."""
    if not isinstance(live, dict) or not isinstance(applied, Mapping):
        return json.loads(json.dumps(applied))
    out = dict(live)
    for key, value in applied.items():
        out[key] = merge(live.get(key), value)
    return out


def _leaves(fields: Fields, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()
    for key, sub in fields.items():
        path = (*prefix, key[2:])
        found |= _leaves(sub, path) if sub else {path}
    return found


def _covered(path: tuple[str, ...], owned: set[tuple[str, ...]]) -> bool:
    """Whether `path`, a parent of it or a child of it is among `owned`."""
    return any(path[:len(o)] == o or o[:len(path)] == path for o in owned)


def _remove(obj: dict[str, Any], path: tuple[str, ...]) -> None:
    for key in path[:-1]:
        obj = obj.get(key) if isinstance(obj, dict) else None  # type: ignore[assignment]
        if not isinstance(obj, dict):
            return
    obj.pop(path[-1], None)


def apply(live: dict[str, Any] | None, applied: Mapping[str, Any], *, manager: str, api_version: str,
          time: str) -> dict[str, Any]:
    """The object to store after `manager` applies `applied` to `live` (None: create it)."""
    entries = [dict(e) for e in ((live or {}).get("metadata") or {}).get("managedFields") or ()
               if isinstance(e, Mapping)]
    mine = next((e for e in entries if e.get("manager") == manager and e.get("operation") == "Apply"), None)
    new_fields = fields_of(applied)
    result = merge(live if live is not None else {}, applied)
    if mine is not None:
        others = set().union(*(_leaves(e.get("fieldsV1") or {}) for e in entries if e is not mine))
        now_owned = _leaves(new_fields)
        for path in _leaves(mine.get("fieldsV1") or {}) - now_owned:
            if not _covered(path, now_owned) and not _covered(path, others):
                _remove(result, path)  # applied before, not any more, and nobody else owns it
    entry = {"manager": manager, "operation": "Apply", "apiVersion": api_version, "time": time,
             "fieldsType": "FieldsV1", "fieldsV1": new_fields}
    entries = [entry if e is mine else e for e in entries] if mine is not None else [*entries, entry]
    result.setdefault("metadata", {})["managedFields"] = entries
    return result
