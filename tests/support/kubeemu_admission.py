"""Rules the emulated API server applies to every request: kinds, selectors, admission, patches.

What kube-apiserver does to a body before it is stored, as plain functions: which resource a
`Kind` is (and whether it has a status subresource, a CRD schema with CEL rules and printer
columns, `metadata.generation`); label and field selectors; pruning (reporting the unknown
fields that `fieldValidation=Strict` refuses), defaulting and validating against a CRD's
structural schema (one 422 cause per field, named the way the server names it:
`spec.data.train[0].source`); metadata and ConfigMap validation; RFC 7386 merge patches.
`kubeemu_store` applies them.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jsonpatch
import jsonschema
import kmock

from kubeemu_cel import Node, compile_rules
from posttrain.api.crd import to_jsonschema

Body = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC_PATCH = "application/strategic-merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
# Written by the server only; a client's value is replaced by the stored one on every write.
MANAGED_METADATA = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
                    "deletionTimestamp", "deletionGracePeriodSeconds")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_CONFIGMAP_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_CONFIGMAP_MAX_BYTES = 1024 * 1024


def api_error(code: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    """A Kubernetes `Status` failure; `details` become `Status.details` (name, group, kind, causes)."""
    return kmock.KubernetesError(status=code, reason=reason, message=message, details=details or {"causes": []})


def clone(value: Any) -> Any:
    """A deep copy of JSON data (several times faster than copy.deepcopy on a 25k-line CRD)."""
    return json.loads(json.dumps(value))


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One served resource: where it lives in the API, and which server behaviours apply to it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    status_subresource: bool = False
    custom: bool = False  # a CRD's resource: metadata.generation, PUT needs resourceVersion, no strategic merge
    schema: Mapping[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    printer_columns: tuple[Mapping[str, Any], ...] = dataclasses.field(default=(), repr=False, compare=False)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def resource(self) -> kmock.resource:
        return kmock.resource(self.group, self.version, self.plural)

    @property
    def qualified(self) -> str:
        """`rayjobs.ray.io`, or `configmaps` for the core group: how the server names it in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @functools.cached_property
    def validator(self) -> jsonschema.protocols.Validator | None:
        if self.schema is None:
            return None
        return jsonschema.Draft7Validator(to_jsonschema(dict(self.schema), strict=False))

    @functools.cached_property
    def rules(self) -> Node | None:
        """The schema's CEL rules, compiled once per Kind (raises `kubeemu_cel.RuleCompileError`)."""
        return compile_rules(self.schema, "spec.validation.openAPIV3Schema")

    @classmethod
    def from_crd(cls, crd: Mapping[str, Any], version: str | None = None) -> Kind:
        """The resource a CustomResourceDefinition serves, at `version` (default: its storage version).

        Equal CRDs give the same Kind object (kept for the process), so a Cluster that stores the
        CRDs it was started with, or a test that applies one CRD file again, compiles nothing anew.
        """
        if version is None:
            version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
        return _kind_from_crd(json.dumps(crd["spec"], sort_keys=True), version)


@functools.lru_cache(maxsize=64)
def _kind_from_crd(spec_json: str, version: str) -> Kind:
    spec = json.loads(spec_json)
    names = spec["names"]
    served = next(v for v in spec["versions"] if v["name"] == version)
    return Kind(group=spec["group"], version=served["name"], plural=names["plural"], kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced", custom=True,
                status_subresource="status" in (served.get("subresources") or {}),
                schema=(served.get("schema") or {}).get("openAPIV3Schema"), singular=names.get("singular", ""),
                short_names=tuple(names.get("shortNames", ())), categories=tuple(names.get("categories", ())),
                printer_columns=tuple(served.get("additionalPrinterColumns") or ()))


# --- selectors -------------------------------------------------------------------------------------

_REQUIREMENT = re.compile(r"""\s*(?:
    !\s*(?P<absent>[\w./-]+)
  | (?P<key>[\w./-]+)(?:\s*(?P<op>==|=|!=)\s*(?P<value>[\w./-]*)
                      | \s+(?P<setop>in|notin)\s*\((?P<values>[^()]*)\))?
)\s*(?:,|$)""", re.X)
_EVENT_FIELDS = ("involvedObject.", "reason", "type", "source", "reportingComponent")


def label_matcher(selector: str | None) -> Callable[[Mapping[str, str]], bool]:
    """Equality (`a=b`, `a==b`, `a!=b`), set (`a in (x,y)`, `a notin (x)`) and existence (`a`, `!a`)."""
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    text, pos = (selector or "").strip(), 0
    while pos < len(text):
        m = _REQUIREMENT.match(text, pos)
        if not m or m.end() == pos:
            raise api_error(400, "BadRequest", f"unable to parse requirement: {text[pos:]!r}")
        pos = m.end()
        key, value, op, setop = m["key"], m["value"], m["op"], m["setop"]
        values = {v.strip() for v in (m["values"] or "").split(",") if v.strip()}
        if m["absent"]:
            checks.append(lambda labels, k=m["absent"]: k not in labels)
        elif op in ("=", "=="):
            checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
        elif op == "!=":
            checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
        elif setop == "in":
            checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
        elif setop == "notin":
            checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels) for check in checks)


def field_matcher(selector: str | None, kind: Kind) -> Callable[[Body], bool]:
    """`metadata.name` and `metadata.namespace` (and an Event's involvedObject/reason/type), `=`/`==`/`!=`."""
    checks: list[Callable[[Body], bool]] = []
    for term in filter(None, (t.strip() for t in (selector or "").split(","))):
        m = re.fullmatch(r"([\w.]+)\s*(==|=|!=)\s*(.*)", term)
        path = m[1] if m else term
        allowed = path in ("metadata.name", "metadata.namespace") or (
            kind.plural == "events" and path.startswith(_EVENT_FIELDS))
        if not m or not allowed:
            raise api_error(400, "BadRequest", f'field label not supported: "{path}"')

        def lookup(obj: Body, path: str = path) -> str:
            for part in path.split("."):
                obj = obj.get(part) if isinstance(obj, dict) else None
            return "" if obj is None else str(obj)

        negate, value = m[2] == "!=", m[3]
        checks.append(lambda obj, get=lookup, v=value, neg=negate: (get(obj) == v) != neg)
    return lambda obj: all(check(obj) for check in checks)


# --- admission: pruning, defaulting, validation ---------------------------------------------------

def prune(value: Any, schema: Mapping[str, Any], path: tuple[Any, ...] = (), unknown: list[str] | None = None) -> Any:
    """Drop fields a structural schema does not declare (kept under preserve-unknown-fields).

    Each dropped field's path (`spec.training.maxStep`) is added to `unknown` when given.
    """
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields") or extra is True
        out = {}
        for k, v in value.items():
            if k in props:
                out[k] = prune(v, props[k], (*path, k), unknown)
            elif isinstance(extra, Mapping):
                out[k] = prune(v, extra, (*path, k), unknown)
            elif preserve:
                out[k] = v
            elif unknown is not None:
                unknown.append(field_path(path, k))
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(v, schema["items"], (*path, i), unknown) for i, v in enumerate(value)]
    return value


OBJECT_META_FIELDS = frozenset(("name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
                                "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
                                "annotations", "ownerReferences", "finalizers", "managedFields"))


def unknown_metadata(meta: Mapping[str, Any]) -> list[str]:
    """ObjectMeta fields that do not exist (`metadata.lables`), as strict decoding names them."""
    return [f"metadata.{k}" for k in meta if k not in OBJECT_META_FIELDS]


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> None:
    """Fill absent fields with the schema's `default`, in place, wherever the parent exists."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = clone(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
        if isinstance(schema.get("additionalProperties"), Mapping):
            for item in value.values():
                apply_defaults(item, schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            apply_defaults(item, schema["items"])


def field_path(path: Iterable[Any], *more: str) -> str:
    """`spec.data.train[0].source`, as the API server names fields in its causes."""
    out = ""
    for part in [*path, *more]:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def schema_causes(kind: Kind, obj: Body) -> list[dict[str, str]]:
    assert kind.validator is not None
    causes = []
    for err in sorted(kind.validator.iter_errors(obj), key=lambda e: [str(p) for p in e.absolute_path]):
        where = field_path(err.absolute_path)
        if err.validator == "required":
            causes += [{"reason": "FieldValueRequired", "field": field_path(err.absolute_path, k),
                        "message": "Required value"} for k in err.validator_value if k not in err.instance]
        elif err.validator == "enum":
            allowed = ", ".join(json.dumps(v) for v in err.validator_value)
            causes.append({"reason": "FieldValueNotSupported", "field": where,
                           "message": f"Unsupported value: {json.dumps(err.instance)}: supported values: {allowed}"})
        elif err.validator == "type":
            causes.append({"reason": "FieldValueTypeInvalid", "field": where,
                           "message": f"Invalid value: {json.dumps(err.instance)[:80]}: "
                                      f"{where} in body must be of type {err.validator_value}"})
        else:
            causes.append({"reason": "FieldValueInvalid", "field": where,
                           "message": f"Invalid value: {json.dumps(err.instance)[:80]}: {err.message}"})
    return causes


def metadata_causes(kind: Kind, meta: Body) -> list[dict[str, str]]:
    causes = []

    def bad(field: str, message: str) -> None:
        causes.append({"reason": "FieldValueInvalid", "field": f"metadata.{field}", "message": message})

    name = meta.get("name", "")
    pattern, limit = (_DNS_LABEL, 63) if kind.kind == "Namespace" else (_DNS_SUBDOMAIN, 253)
    if not isinstance(name, str) or len(name) > limit or not pattern.fullmatch(name):
        bad("name", f"Invalid value: {json.dumps(name)}: a lowercase RFC 1123 name of at most {limit} "
                    "characters ([a-z0-9] and '-', starting and ending alphanumeric) is required")
    for field in ("labels", "annotations"):
        for key, value in (meta.get(field) or {}).items():
            prefix, _, short = key.rpartition("/")
            if (len(short) > 63 or not _QUALIFIED_NAME.fullmatch(short)
                    or (prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)))):
                bad(field, f"Invalid value: {json.dumps(key)}: not a valid qualified name")
            if not isinstance(value, str) or (field == "labels" and (
                    len(value) > 63 or not _LABEL_VALUE.fullmatch(value))):
                bad(f"{field}.{key}" if field == "annotations" else field,
                    f"Invalid value: {json.dumps(value)}: a valid label value must be 63 characters or less "
                    "and begin and end with an alphanumeric character" if field == "labels" else
                    f"Invalid value: {json.dumps(value)}: must be a string")
    return causes


def configmap_causes(obj: Body) -> list[dict[str, str]]:
    causes, size = [], 0
    for field in ("data", "binaryData"):
        for key, value in (obj.get(field) or {}).items():
            if len(key) > 253 or not _CONFIGMAP_KEY.fullmatch(key):
                causes.append({"reason": "FieldValueInvalid", "field": f"{field}[{key}]",
                               "message": f"Invalid value: {json.dumps(key)}: a valid config key must consist "
                                          "of alphanumeric characters, '-', '_' or '.'"})
            if not isinstance(value, str):
                raise api_error(400, "BadRequest", f"json: cannot unmarshal {type(value).__name__} into Go "
                                                   f"struct field ConfigMap.{field} of type string")
            size += len(key) + len(value.encode())
    if size > _CONFIGMAP_MAX_BYTES:
        causes.append({"reason": "FieldValueTooLong", "field": "",
                       "message": f"Too long: must have at most {_CONFIGMAP_MAX_BYTES} bytes"})
    return causes


def invalid(kind: Kind, name: str, causes: list[dict[str, str]]) -> kmock.KubernetesError:
    """The server's 422 `Invalid` with one cause per bad field."""
    said = [f"{c['field']}: {c['message']}" if c["field"] else c["message"] for c in causes]
    title = f"{kind.kind}.{kind.group}" if kind.group else kind.kind
    return api_error(422, "Invalid", f'{title} "{name}" is invalid: '
                                     + (said[0] if len(said) == 1 else "[" + ", ".join(said) + "]"),
                     name=name, group=kind.group, kind=kind.kind, causes=causes)


def patched(kind: Kind, old: Body, patch: Any, patch_type: str | None) -> Any:
    """`old` with a JSON patch or a merge patch applied (strategic merge: as a merge patch)."""
    if patch_type == JSON_PATCH:
        try:
            return jsonpatch.apply_patch(old, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
            raise invalid(kind, old["metadata"]["name"], [{"reason": "FieldValueInvalid", "field": "",
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
                    f"include: {JSON_PATCH}, {MERGE_PATCH}" + ("" if kind.custom else f", {STRATEGIC_PATCH}")
                    + f", {APPLY_PATCH}")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge, `null` deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return clone(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def spec_part(obj: Body) -> Body:
    """What `metadata.generation` tracks: everything except metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
