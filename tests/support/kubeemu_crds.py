"""CustomResourceDefinitions as objects: what the API server checks on one, and what it then serves.

A CRD written to the emulator (created at start-up, `Cluster.create`, `kubectl apply`, server-side
apply) is checked here (`crd_causes`: names, versions, and every CEL rule compiles), gets the
status a real server gives it (`crd_status`: NamesAccepted and Established), and replaces the
served `Kind` (`served_kind`): schema, defaults, CEL rules, printer columns, short names. Objects
stored earlier stay as they were written and are read through the new Kind, so a default the new
CRD adds shows on every read, as kube-apiserver defaults what it reads from etcd.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kubeemu_admission import Kind
from kubeemu_cel import RuleCompileError

GROUP, PLURAL = "apiextensions.k8s.io", "customresourcedefinitions"


def is_crd_kind(kind: Kind) -> bool:
    return kind.group == GROUP and kind.plural == PLURAL


def crd_causes(crd: Mapping[str, Any]) -> list[dict[str, str]]:
    """422 causes for a CRD the server would refuse (the checks a test is likely to trip)."""
    spec, causes = crd.get("spec") or {}, []

    def bad(field: str, message: str, reason: str = "FieldValueInvalid") -> None:
        causes.append({"reason": reason, "field": field, "message": message})

    names = spec.get("names") or {}
    for field in ("group", "scope"):
        if not spec.get(field):
            bad(f"spec.{field}", "Required value", "FieldValueRequired")
    for field in ("plural", "kind"):
        if not names.get(field):
            bad(f"spec.names.{field}", "Required value", "FieldValueRequired")
    expected = f"{names.get('plural')}.{spec.get('group')}"
    if crd.get("metadata", {}).get("name") != expected:
        bad("metadata.name", f'Invalid value: "{crd.get("metadata", {}).get("name")}": must be spec.names.plural+"."+spec.group')
    versions = spec.get("versions") or []
    if not versions:
        bad("spec.versions", "Invalid value: must have exactly one version marked as storage version")
    elif sum(bool(v.get("storage")) for v in versions) != 1:
        bad("spec.versions", "Invalid value: must have exactly one version marked as storage version")
    if causes:
        return causes
    for i, version in enumerate(versions):
        try:
            Kind.from_crd(crd, version["name"]).rules  # noqa: B018 -- compiles (and caches) every rule
        except RuleCompileError as e:
            bad(f"spec.versions[{i}].schema.{e.path.removeprefix('spec.validation.')}", str(e).split(": ", 1)[1])
        except (KeyError, TypeError, StopIteration) as e:
            bad(f"spec.versions[{i}]", f"Invalid value: {e}")
    return causes


def crd_status(crd: Mapping[str, Any], time: str) -> dict[str, Any]:
    spec = crd["spec"]
    return {"acceptedNames": dict(spec["names"]),
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
            "conditions": [{"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": time}
                           for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                           ("Established", "InitialNamesAccepted", "the initial names have been accepted"))]}


def served_kind(crd: Mapping[str, Any], current: Iterable[Kind]) -> Kind:
    """The Kind to serve for `crd`: the version served so far if it still is, else the storage version."""
    spec = crd["spec"]
    served = {v["name"] for v in spec["versions"] if v.get("served", True)}
    before = next((k.version for k in current if k.version in served), None)
    return Kind.from_crd(crd, before)


def kinds_of(crd: Mapping[str, Any], kinds: Iterable[Kind]) -> list[Kind]:
    """The custom Kinds now served for this CRD's group and plural."""
    spec = crd.get("spec") or {}
    return [k for k in kinds if k.custom and k.group == spec.get("group")
            and k.plural == (spec.get("names") or {}).get("plural")]
