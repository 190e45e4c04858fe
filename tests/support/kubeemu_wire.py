"""Request bodies that are not JSON: Kubernetes protobuf, and YAML (server-side apply).

kubectl's typed clients (`kubectl create namespace`, `kubectl create configmap`) send
`application/vnd.kubernetes.protobuf`: the magic `k8s\\x00`, then a `runtime.Unknown` whose
`raw` is the object's protobuf message (field numbers from k8s.io/api `generated.proto`).
`decode(content_type, body)` turns the bodies the emulator understands back into the JSON object
the client meant; a protobuf body of another kind is a 415 naming what is understood. The
emulator answers in JSON, which those clients also accept.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import yaml

from kubeemu_admission import api_error

PROTOBUF = "application/vnd.kubernetes.protobuf"
YAML_TYPES = ("application/apply-patch+yaml", "application/yaml")
_MAGIC = b"k8s\x00"

Fields = dict[int, list[Any]]  # field number -> values (bytes for length-delimited, int for varints)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, pos


def fields(data: bytes) -> Fields:
    """One protobuf message, undecoded: every field's raw values in order."""
    out: Fields = {}
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        out.setdefault(number, []).append(value)
    return out


def _str(f: Fields, n: int) -> str | None:
    return f[n][-1].decode() if n in f else None


def _strings(f: Fields, n: int) -> list[str]:
    return [v.decode() for v in f.get(n, ())]


def _map(f: Fields, n: int, value: Callable[[bytes], Any] = bytes.decode) -> dict[str, Any]:
    entries = [fields(v) for v in f.get(n, ())]
    return {e[1][-1].decode(): value(e[2][-1]) if 2 in e else "" for e in entries}


def _owner_reference(data: bytes) -> dict[str, Any]:
    f = fields(data)
    ref = {"apiVersion": _str(f, 5), "kind": _str(f, 1), "name": _str(f, 3), "uid": _str(f, 4)}
    for n, key in ((6, "controller"), (7, "blockOwnerDeletion")):
        if n in f:
            ref[key] = bool(f[n][-1])
    return ref


def _object_meta(data: bytes) -> dict[str, Any]:
    f = fields(data)
    meta: dict[str, Any] = {k: v for k, v in (("name", _str(f, 1)), ("generateName", _str(f, 2)),
                                              ("namespace", _str(f, 3)), ("resourceVersion", _str(f, 6))) if v}
    for n, key in ((11, "labels"), (12, "annotations")):
        if f.get(n):
            meta[key] = _map(f, n)
    if f.get(13):
        meta["ownerReferences"] = [_owner_reference(v) for v in f[13]]
    if f.get(14):
        meta["finalizers"] = _strings(f, 14)
    return meta


def _namespace(f: Fields) -> dict[str, Any]:
    spec = fields(f[2][-1]) if 2 in f else {}
    return {"spec": {"finalizers": _strings(spec, 1)}} if spec.get(1) else {}


def _configmap(f: Fields) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if f.get(2):
        out["data"] = _map(f, 2)
    if f.get(3):
        out["binaryData"] = _map(f, 3, lambda b: base64.b64encode(b).decode())
    if f.get(4):
        out["immutable"] = bool(f[4][-1])
    return out


_KINDS: dict[tuple[str, str], Callable[[Fields], dict[str, Any]]] = {
    ("v1", "Namespace"): _namespace, ("v1", "ConfigMap"): _configmap}


def decode(content_type: str, body: bytes) -> Any:
    """The JSON value a non-JSON request body stands for (None when there is no body)."""
    content_type = content_type.split(";")[0].strip()
    if not body:
        return None
    if content_type in YAML_TYPES:
        try:
            return yaml.safe_load(body)
        except yaml.YAMLError as e:
            raise api_error(400, "BadRequest", f"error decoding YAML: {e}") from None
    if content_type != PROTOBUF:
        return None
    if not body.startswith(_MAGIC):
        raise api_error(400, "BadRequest", "provided input did not begin with the Kubernetes protobuf magic bytes")
    envelope = fields(body[len(_MAGIC):])
    type_meta = fields(envelope[1][-1]) if 1 in envelope else {}
    api_version, kind = _str(type_meta, 1) or "", _str(type_meta, 2) or ""
    decoder = _KINDS.get((api_version, kind))
    if decoder is None:
        understood = ", ".join(f"{v}/{k}" for v, k in _KINDS)
        raise api_error(415, "UnsupportedMediaType", f"the emulator decodes protobuf bodies of {understood} only, "
                                                     f"not {api_version}/{kind}; send application/json")
    message = fields(envelope[2][-1]) if 2 in envelope else {}
    meta = _object_meta(message[1][-1]) if 1 in message else {}
    return {"apiVersion": api_version, "kind": kind, "metadata": meta, **decoder(message)}
