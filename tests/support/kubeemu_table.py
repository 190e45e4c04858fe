"""`Table` responses: what `kubectl get` shows, computed by the server as kube-apiserver does it.

A GET whose `Accept` asks for `application/json;as=Table;g=meta.k8s.io;v=v1` gets a
`meta.k8s.io/v1 Table`: a `Name` column, then a CRD's `additionalPrinterColumns` (its JSONPaths
evaluated per object; `date` columns shown as an age such as `5s` or `3m2s`, `integer`/`number`
as numbers, missing values as null cells, which kubectl prints blank), or `Age` for a CRD
without columns; a few built-ins have their usual columns (Namespace: Status; ConfigMap: Data).
Each row carries the object's metadata (`includeObject=Metadata`, the default), or the whole
object (`Object`), or nothing (`None`)::

    table(kind, objects, resource_version="42", include="Metadata")

JSONPath: `.a.b`, `.a[0]`, `.a[*]`, `.a[?(@.type=="Ready")].status` (the first result is shown).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from kubeemu_admission import Kind

NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace. Is required when creating resources, "
                              "although some resources may allow a client to request the generation of an "
                              "appropriate name automatically."}
AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
       "description": "CreationTimestamp is a timestamp representing the server time when this object was created."}
_BUILTIN_COLUMNS: dict[str, tuple[Mapping[str, Any], ...]] = {
    "Namespace": ({"name": "Status", "type": "string", "jsonPath": ".status.phase",
                   "description": "The status of the namespace"}, AGE),
    "ConfigMap": ({"name": "Data", "type": "integer", "jsonPath": "data|count",
                   "description": "Number of keys"}, AGE),
}
_STEP = re.compile(r"""\.(?P<name>[^.\[]+)|\[(?P<index>-?\d+|\*)\]|\[\?\(@\.(?P<key>[\w.-]+)\s*==\s*["'](?P<value>[^"']*)["']\)\]""")


def wants_table(accept: str | None) -> bool:
    return any("as=Table" in part and "g=meta.k8s.io" in part for part in (accept or "").split(","))


def columns(kind: Kind) -> tuple[Mapping[str, Any], ...]:
    if kind.custom:
        return tuple(kind.printer_columns) or (AGE,)
    return _BUILTIN_COLUMNS.get(kind.kind, (AGE,))


def table(kind: Kind, objects: Iterable[Mapping[str, Any]], *, resource_version: str,
          include: str | None = None) -> dict[str, Any]:
    wanted = columns(kind)
    definitions = [NAME_COLUMN] + [{"name": c["name"], "type": c.get("type", "string"), "format": c.get("format", ""),
                                    "description": c.get("description", ""), "priority": c.get("priority", 0)}
                                   for c in wanted]
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [obj["metadata"]["name"], *(cell(c, obj) for c in wanted)]}
        if include in (None, "", "Metadata"):
            row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                             "metadata": obj["metadata"]}
        elif include == "Object":
            row["object"] = obj
        rows.append(row)
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": definitions, "rows": rows}


def cell(column: Mapping[str, Any], obj: Mapping[str, Any]) -> Any:
    """One column's value for one object (`cellForJSONValue` in apiextensions-apiserver)."""
    path, type_ = column.get("jsonPath", ""), column.get("type", "string")
    if path == "data|count":
        return len(obj.get("data") or {}) + len(obj.get("binaryData") or {})
    found = jsonpath(obj, path)
    if not found or found[0] is None:
        return None
    value = found[0]
    if type_ == "string":
        return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) \
            else str(value).lower() if isinstance(value, bool) else str(value)
    if type_ == "integer" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    if type_ == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if type_ == "boolean" and isinstance(value, bool):
        return value
    if type_ == "date" and isinstance(value, str):
        try:
            then = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return "<invalid>"
        return human_duration((datetime.datetime.now(datetime.timezone.utc) - then).total_seconds())
    return None


def jsonpath(obj: Any, path: str) -> list[Any]:
    """Every value `path` selects in `obj` (the subset of JSONPath printer columns use)."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    path = path.removeprefix("$")
    current, pos = [obj], 0
    while pos < len(path):
        m = _STEP.match(path, pos)
        if m is None:
            return []
        pos = m.end()
        following: list[Any] = []
        for value in current:
            if m["name"] is not None and isinstance(value, dict) and m["name"] in value:
                following.append(value[m["name"]])
            elif m["index"] == "*" and isinstance(value, list):
                following += value
            elif m["index"] is not None and m["index"] != "*" and isinstance(value, list):
                i = int(m["index"])
                if -len(value) <= i < len(value):
                    following.append(value[i])
            elif m["key"] is not None and isinstance(value, list):
                following += [item for item in value if _has(item, m["key"], m["value"])]
        current = following
    return current


def _has(item: Any, key: str, value: str) -> bool:
    found = jsonpath(item, "." + key) if isinstance(item, dict) else []
    return bool(found) and (str(found[0]).lower() if isinstance(found[0], bool) else str(found[0])) == value


def human_duration(seconds: float) -> str:
    """`duration.HumanDuration` of k8s.io/apimachinery: 5s, 2m, 3m2s, 4h5m, 3d2h, 2y30d."""
    s = int(seconds)
    if s < -1:
        return "<invalid>"
    if s < 0:
        return "0s"
    if s < 120:
        return f"{s}s"
    minutes = s // 60
    if minutes < 10:
        return f"{minutes}m" if s % 60 == 0 else f"{minutes}m{s % 60}s"
    if minutes < 180:
        return f"{minutes}m"
    hours = s // 3600
    if hours < 8:
        return f"{hours}h" if minutes % 60 == 0 else f"{hours}h{minutes % 60}m"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d" if hours % 24 == 0 else f"{hours // 24}d{hours % 24}h"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    if hours < 24 * 365 * 8:
        days = (hours // 24) % 365
        return f"{hours // 24 // 365}y" if days == 0 else f"{hours // 24 // 365}y{days}d"
    return f"{hours // 24 // 365}y"
