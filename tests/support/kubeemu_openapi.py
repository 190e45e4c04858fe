"""The OpenAPI documents kubectl reads: `/openapi/v3` (explain, field validation, patch types).

`index(kinds)` is `GET /openapi/v3`: one entry per group-version with a `serverRelativeURL`
whose `hash` changes when the served kinds do; `document(kinds, "apis/posttrain.dev/v1alpha1")`
is that group-version's OpenAPI 3.0 document, built the way kube-apiserver builds it:

* `components.schemas`: each kind's schema under its reverse-domain name
  (`dev.posttrain.v1alpha1.PostTrainingJob`, `io.k8s.api.core.v1.ConfigMap`) tagged with
  `x-kubernetes-group-version-kind`, `metadata` pointing at `ObjectMeta`; a CRD's schema as
  served now (so `kubectl explain ptj.spec.training` prints our field descriptions), a small
  hand-written schema for each built-in kind; the meta/v1 types they refer to;
* `paths`: list/create/get/replace/patch/delete per resource (and its `/status`), each operation
  with `x-kubernetes-action` and `x-kubernetes-group-version-kind`; PATCH lists the query
  parameter `fieldValidation` (so kubectl leaves validation to the server, which honours
  `fieldValidation=Strict`) and the patch content types the server takes (strategic merge for
  built-in kinds only, as for real).

Not emulated: `/openapi/v2` (kubectl 1.32 falls back to it only when v3 is missing), and the
complete built-in schemas (only what the emulator serves, with their main fields).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from kubeemu_admission import Kind

META = "io.k8s.apimachinery.pkg.apis.meta.v1"
_STR, _INT, _BOOL = {"type": "string"}, {"type": "integer", "format": "int64"}, {"type": "boolean"}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string", "default": ""}}
_META_SCHEMAS: dict[str, dict[str, Any]] = {
    "ObjectMeta": {"type": "object", "description": "ObjectMeta is metadata that all persisted resources must have, "
                                                    "which includes all objects users must create.",
                   "properties": {"name": _STR, "generateName": _STR, "namespace": _STR, "uid": _STR,
                                  "resourceVersion": _STR, "generation": _INT, "labels": _STR_MAP,
                                  "annotations": _STR_MAP, "finalizers": {"type": "array", "items": _STR},
                                  "creationTimestamp": {"$ref": f"#/components/schemas/{META}.Time"},
                                  "deletionTimestamp": {"$ref": f"#/components/schemas/{META}.Time"},
                                  "ownerReferences": {"type": "array", "items": {
                                      "$ref": f"#/components/schemas/{META}.OwnerReference"}},
                                  "managedFields": {"type": "array", "items": {"type": "object"}}}},
    "OwnerReference": {"type": "object", "required": ["apiVersion", "kind", "name", "uid"],
                       "properties": {"apiVersion": _STR, "kind": _STR, "name": _STR, "uid": _STR,
                                      "controller": _BOOL, "blockOwnerDeletion": _BOOL}},
    "ListMeta": {"type": "object", "properties": {"resourceVersion": _STR, "continue": _STR}},
    "Time": {"type": "string", "format": "date-time"},
    "Patch": {"type": "object", "description": "Patch is provided to give a concrete name and type to the "
                                               "Kubernetes PATCH request body."},
    "Status": {"type": "object", "properties": {"status": _STR, "message": _STR, "reason": _STR, "code": _INT}},
}
# The main fields of the built-in kinds the emulator serves; anything else is kept as written.
_BUILTIN_FIELDS: dict[str, dict[str, Any]] = {
    "Namespace": {"spec": {"type": "object", "properties": {"finalizers": {"type": "array", "items": _STR}}},
                  "status": {"type": "object", "properties": {"phase": _STR}}},
    "ConfigMap": {"data": _STR_MAP, "binaryData": {"type": "object", "additionalProperties": {
        "type": "string", "format": "byte"}}, "immutable": _BOOL},
}
_TOP = ("apiVersion", "kind", "metadata")


def group_version_path(kind: Kind) -> str:
    return f"apis/{kind.group}/{kind.version}" if kind.group else f"api/{kind.version}"


def schema_name(kind: Kind, *, suffix: str = "") -> str:
    if kind.custom:
        return ".".join([*reversed(kind.group.split(".")), kind.version, kind.kind + suffix])
    # io.k8s.api.core.v1.ConfigMap, io.k8s.api.rbac.v1.Role, io.k8s.apiextensions-apiserver.pkg.apis...
    prefix = "io.k8s.apiextensions-apiserver.pkg.apis" if kind.group == "apiextensions.k8s.io" else "io.k8s.api"
    return f"{prefix}.{kind.group.split('.')[0] or 'core'}.{kind.version}.{kind.kind}{suffix}"


def index(kinds: Iterable[Kind]) -> dict[str, Any]:
    """`GET /openapi/v3`."""
    kinds = list(kinds)
    gvs = sorted({group_version_path(k) for k in kinds})
    return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={_built(kinds, gv)[1]}"} for gv in gvs}}


def document(kinds: Iterable[Kind], gv: str) -> dict[str, Any] | None:
    """`GET /openapi/v3/<gv>`: the OpenAPI 3.0 document of one group-version, None if not served."""
    return _built(list(kinds), gv)[0]


# (ids of the kinds) -> (those kinds, document, hash). Kinds are immutable, and holding them keeps
# their ids from being reused, so a replaced CRD (a new Kind) gets a new document and hash.
_CACHE: dict[tuple[int, ...], tuple[list[Kind], dict[str, Any] | None, str]] = {}


def _built(kinds: list[Kind], gv: str) -> tuple[dict[str, Any] | None, str]:
    served = [k for k in kinds if group_version_path(k) == gv]
    key = tuple(id(k) for k in served)
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        doc = _document(served, gv) if served else None
        _CACHE[key] = (served, doc, hashlib.sha512(json.dumps(doc, sort_keys=True).encode()).hexdigest().upper())
    return _CACHE[key][1], _CACHE[key][2]  # shared: callers only serialise it


def _document(served: list[Kind], gv: str) -> dict[str, Any]:
    schemas = {f"{META}.{name}": copy.deepcopy(s) for name, s in _META_SCHEMAS.items()}
    paths: dict[str, Any] = {}
    for kind in served:
        schemas[schema_name(kind)] = kind_schema(kind)
        schemas[schema_name(kind, suffix="List")] = {
            "type": "object", "required": ["items"], "x-kubernetes-group-version-kind": [_gvk(kind, "List")],
            "properties": {"apiVersion": _STR, "kind": _STR,
                           "items": {"type": "array", "items": {"$ref": _ref(schema_name(kind))}},
                           "metadata": {"allOf": [{"$ref": _ref(f"{META}.ListMeta")}], "default": {}}}}
        paths.update(_paths(kind))
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
            "paths": paths, "components": {"schemas": schemas}}


def kind_schema(kind: Kind) -> dict[str, Any]:
    if kind.schema is not None:
        schema = copy.deepcopy(dict(kind.schema))
    else:
        schema = {"type": "object", "properties": copy.deepcopy(_BUILTIN_FIELDS.get(kind.kind, {})),
                  "x-kubernetes-preserve-unknown-fields": kind.kind not in _BUILTIN_FIELDS}
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"type": "string", "description": "APIVersion defines the versioned schema of this "
                                                            "representation of an object."}
    props["kind"] = {"type": "string", "description": "Kind is a string value representing the REST resource this "
                                                      "object represents."}
    props["metadata"] = {"allOf": [{"$ref": _ref(f"{META}.ObjectMeta")}], "default": {},
                         "description": "Standard object's metadata."}
    schema["x-kubernetes-group-version-kind"] = [_gvk(kind)]
    return schema


def _ref(name: str) -> str:
    return f"#/components/schemas/{name}"


def _gvk(kind: Kind, suffix: str = "") -> dict[str, str]:
    return {"group": kind.group, "kind": kind.kind + suffix, "version": kind.version}


def _paths(kind: Kind) -> dict[str, Any]:
    base = f"/{group_version_path(kind)}" + ("/namespaces/{namespace}" if kind.namespaced else "")
    collection, item = f"{base}/{kind.plural}", f"{base}/{kind.plural}/{{name}}"
    body = {"$ref": _ref(schema_name(kind))}
    in_path = [{"name": "namespace", "in": "path", "required": True, "schema": _STR}] if kind.namespaced else []
    named = [{"name": "name", "in": "path", "required": True, "schema": _STR}, *in_path]
    patch_types = ["application/apply-patch+yaml", "application/json-patch+json", "application/merge-patch+json",
                   *(["application/strategic-merge-patch+json"] if not kind.custom else [])]
    write_params = [{"name": n, "in": "query", "schema": _STR} for n in ("dryRun", "fieldManager", "fieldValidation")]

    def op(action: str, *, request: Any = None, content: tuple[str, ...] = ("application/json",),
           params: list[Any] | None = None, result: Any = body) -> dict[str, Any]:
        out: dict[str, Any] = {"operationId": f"{action}{kind.kind}", "x-kubernetes-action": action,
                               "x-kubernetes-group-version-kind": _gvk(kind), "parameters": params or [],
                               "responses": {"200": {"description": "OK", "content": {
                                   "application/json": {"schema": result}}}}}
        if request is not None:
            out["requestBody"] = {"required": True, "content": {c: {"schema": request} for c in content}}
        return out

    paths = {
        collection: {"parameters": in_path, "get": op("list", result={"$ref": _ref(schema_name(kind, suffix="List"))}),
                     "post": op("post", request=body, params=write_params)},
        item: {"parameters": named, "get": op("get"), "put": op("put", request=body, params=write_params),
               "patch": op("patch", request={"$ref": _ref(f"{META}.Patch")}, content=tuple(patch_types),
                           params=[*write_params, {"name": "force", "in": "query", "schema": _BOOL}]),
               "delete": op("delete", result={"$ref": _ref(f"{META}.Status")})},
    }
    if kind.status_subresource:
        paths[f"{item}/status"] = {k: v for k, v in paths[item].items() if k in ("parameters", "get", "put", "patch")}
    if kind.namespaced:
        paths[f"/{group_version_path(kind)}/{kind.plural}"] = {"get": op("list", result={
            "$ref": _ref(schema_name(kind, suffix="List"))})}
    return paths
