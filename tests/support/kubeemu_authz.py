"""Who is calling (bearer tokens) and what they may do (RBAC), as kube-apiserver decides it.

Authentication: `Authority.authenticate(header)` maps `Authorization: Bearer <token>` to a `User`
from the tokens given to `Cluster(tokens=...)`. A ServiceAccount user
(`system:serviceaccount:<ns>:<name>`) is in the groups `system:serviceaccounts` and
`system:serviceaccounts:<ns>`; every known token is in `system:authenticated`. The Cluster's own
kubeconfig token is `ADMIN_TOKEN`, a member of `system:masters` (allowed everything, as on a real
cluster). With RBAC on, a request without a token is `system:anonymous`, an unknown token 401.

Authorisation (`Authority.check`, only with `Cluster(rbac=True)`): the RBAC authorizer over the
Role, ClusterRole, RoleBinding and ClusterRoleBinding objects stored in the emulator (served as
`rbac.authorization.k8s.io/v1`): subjects (User, Group, ServiceAccount), verbs, apiGroups,
resources with subresources (`posttrainingjobs/status`, `*/finalizers`), resourceNames,
RoleBindings granting in their namespace only (to a Role or a ClusterRole), ClusterRoleBindings
everywhere. A denial is the server's 403:
`rayjobs.ray.io is forbidden: User "system:serviceaccount:ml:op" cannot create resource "rayjobs"
in API group "ray.io" in the namespace "ml"`.

`Authority.owner_references` is the OwnerReferencesPermissionEnforcement admission plugin (on by
default in OpenShift, off in plain kube-apiserver; here on with RBAC unless
`Cluster(owner_reference_enforcement=False)`): changing an object's ownerReferences needs `delete` on the object (except
on create), and setting `blockOwnerDeletion: true` needs `update` on the owner's `finalizers`
subresource.

Not emulated: non-resource URLs (discovery, /openapi, /version are open to every caller, as the
bootstrap `system:discovery` roles make them), ClusterRole aggregation, impersonation,
escalation checks on writing RBAC objects, client certificates.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kubeemu_admission import Kind, api_error

RBAC_GROUP = "rbac.authorization.k8s.io"
ADMIN_TOKEN = "kubeemu"  # the token of the kubeconfig a Cluster writes


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()


ADMIN = User("kubeemu-admin", ("system:masters", "system:authenticated"))
ANONYMOUS = User("system:anonymous", ("system:unauthenticated",))


def user(name: str, groups: Iterable[str] = ()) -> User:
    """A User with the groups the server adds: system:authenticated, and ServiceAccount groups."""
    extra = ["system:authenticated"]
    if name.startswith("system:serviceaccount:") and name.count(":") == 3:
        extra += ["system:serviceaccounts", f"system:serviceaccounts:{name.split(':')[2]}"]
    return User(name, tuple(dict.fromkeys([*groups, *extra])))


@dataclasses.dataclass(frozen=True)
class Attributes:
    """What a request asks to do: the authorizer's input (`authorizer.Attributes` upstream)."""

    user: User
    verb: str
    group: str = ""
    resource: str = ""  # empty: a non-resource request (discovery, /openapi, /version)
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def verb_of(method: str, *, name: str | None, params: Mapping[str, str]) -> str:
    method = method.upper()
    if method in ("GET", "HEAD"):
        return "watch" if params.get("watch") in ("true", "1") else "get" if name else "list"
    return {"POST": "create", "PUT": "update", "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection"}.get(method, method.lower())


def forbidden(qualified: str, name: str, group: str, plural: str, reason: str) -> Exception:
    """The server's 403 Forbidden Status (`apierrors.NewForbidden`)."""
    message = f'{qualified} "{name}" is forbidden: {reason}' if name else f"{qualified} is forbidden: {reason}"
    return api_error(403, "Forbidden", message, name=name, group=group, kind=plural)


def denial(a: Attributes) -> str:
    """The authorizer's words for a denied request (`forbiddenMessage` upstream)."""
    resource = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    where = f"in the namespace {json.dumps(a.namespace)}" if a.namespace else "at the cluster scope"
    return (f"User {json.dumps(a.user.name)} cannot {a.verb} resource {json.dumps(resource)} "
            f"in API group {json.dumps(a.group)} {where}")


class Authority:
    """Tokens, and the RBAC objects of one store; `rbac=False` allows every authenticated call."""

    def __init__(self, store: Any, *, tokens: Mapping[str, User], rbac: bool) -> None:
        self.store, self.rbac = store, rbac
        self.owner_reference_enforcement = True  # the admission plugin, when RBAC is on (as in OpenShift)
        self.tokens = {ADMIN_TOKEN: ADMIN, **tokens}
        self._index: tuple[tuple[int, ...], _Index] | None = None

    def authenticate(self, authorization: str | None) -> User:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return ANONYMOUS if self.rbac else ADMIN
        found = self.tokens.get(token.strip())
        if found is None:
            if not self.rbac:
                return ADMIN
            raise api_error(401, "Unauthorized", "Unauthorized")
        return found

    def check(self, a: Attributes, kind: Kind | None) -> None:
        """Raise the server's 403 unless `a` is allowed."""
        if not self.allowed(a):
            qualified = kind.qualified if kind is not None else (f"{a.resource}.{a.group}" if a.group else a.resource)
            raise forbidden(qualified, a.name, a.group, a.resource, denial(a))

    def allowed(self, a: Attributes) -> bool:
        if not self.rbac or "system:masters" in a.user.groups or not a.resource:
            return True
        index = self._current()
        for binding in index.cluster_bindings:
            if _binds(binding, a.user, "") and _any_rule(index.cluster_roles.get(binding["roleRef"]["name"]), a):
                return True
        for binding in index.role_bindings.get(a.namespace, ()) if a.namespace else ():
            ref = binding["roleRef"]
            rules = (index.roles.get((a.namespace, ref["name"])) if ref.get("kind") == "Role"
                     else index.cluster_roles.get(ref["name"]))
            if _binds(binding, a.user, a.namespace) and _any_rule(rules, a):
                return True
        return False

    def owner_references(self, a: Attributes, kind: Kind, new: Mapping[str, Any], old: Mapping[str, Any] | None,
                         owner_kind: Callable[[str, str], Kind | None]) -> None:
        """OwnerReferencesPermissionEnforcement on a create (`old` None) or update by `a.user`."""
        refs, old_refs = _refs(new), _refs(old or {})
        if refs == old_refs or not (self.rbac and self.owner_reference_enforcement):
            return
        name = new["metadata"].get("name", "")
        if old is not None and not self.allowed(dataclasses.replace(a, verb="delete", subresource="")):
            raise forbidden(kind.qualified, name, kind.group, kind.plural,
                            "cannot set an ownerRef on a resource you can't delete: , <nil>")
        had_blocking = {r.get("uid") for r in old_refs if r.get("blockOwnerDeletion")}
        for ref in refs:
            if not ref.get("blockOwnerDeletion") or ref.get("uid") in had_blocking:
                continue
            owner = owner_kind(ref.get("apiVersion", ""), ref.get("kind", ""))
            if owner is None:
                raise forbidden(kind.qualified, name, kind.group, kind.plural,
                                f"cannot set blockOwnerDeletion in this case because cannot find RESTMapping for "
                                f"APIVersion {ref.get('apiVersion')} Kind {ref.get('kind')}: no matches")
            needed = Attributes(a.user, "update", owner.group, owner.plural, "finalizers",
                                a.namespace if owner.namespaced else "", ref.get("name", ""))
            if not self.allowed(needed):
                raise forbidden(kind.qualified, name, kind.group, kind.plural,
                                "cannot set blockOwnerDeletion if an ownerReference refers to a resource you can't "
                                "set finalizers on: , <nil>")

    def _current(self) -> _Index:
        kinds = [k for k in self.store.kinds.values() if k.group == RBAC_GROUP]
        stamp = tuple(self.store.changed_at.get(k.resource, 0) for k in kinds)
        if self._index is None or self._index[0] != stamp:
            self._index = (stamp, _Index.build(self.store, kinds))
        return self._index[1]


@dataclasses.dataclass
class _Index:
    roles: dict[tuple[str, str], list[Mapping[str, Any]]]
    cluster_roles: dict[str, list[Mapping[str, Any]]]
    role_bindings: dict[str, list[Mapping[str, Any]]]
    cluster_bindings: list[Mapping[str, Any]]

    @classmethod
    def build(cls, store: Any, kinds: list[Kind]) -> _Index:
        index = cls({}, {}, {}, [])
        for kind in kinds:
            for obj in store.list(kind):
                meta = obj["metadata"]
                if kind.kind == "Role":
                    index.roles[(meta["namespace"], meta["name"])] = obj.get("rules") or []
                elif kind.kind == "ClusterRole":
                    index.cluster_roles[meta["name"]] = obj.get("rules") or []
                elif kind.kind == "RoleBinding":
                    index.role_bindings.setdefault(meta["namespace"], []).append(obj)
                elif kind.kind == "ClusterRoleBinding":
                    index.cluster_bindings.append(obj)
        return index


def _binds(binding: Mapping[str, Any], who: User, namespace: str) -> bool:
    for s in binding.get("subjects") or ():
        kind, name = s.get("kind"), s.get("name")
        if ((kind == "User" and name == who.name) or (kind == "Group" and name in who.groups)
                or (kind == "ServiceAccount"
                    and who.name == f"system:serviceaccount:{s.get('namespace') or namespace}:{name}")):
            return True
    return False


def _any_rule(rules: Iterable[Mapping[str, Any]] | None, a: Attributes) -> bool:
    return any(_rule_allows(rule, a) for rule in rules or ())


def _rule_allows(rule: Mapping[str, Any], a: Attributes) -> bool:
    """`rbac/v1` rule matching (`RuleAllows` upstream)."""
    verbs, groups = rule.get("verbs") or (), rule.get("apiGroups") or ()
    if not ("*" in verbs or a.verb in verbs) or not ("*" in groups or a.group in groups):
        return False
    combined = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    if not any(r == "*" or r == combined or (a.subresource and r == f"*/{a.subresource}")
               for r in rule.get("resources") or ()):
        return False
    names = rule.get("resourceNames") or ()
    return not names or a.name in names


def _refs(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [r for r in (obj.get("metadata") or {}).get("ownerReferences") or () if isinstance(r, Mapping)]
