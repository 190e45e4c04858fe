"""CEL validation rules (`x-kubernetes-validations`) of a CRD schema, evaluated as kube-apiserver does.

`compile_rules(schema)` walks a structural schema once and compiles every rule with cel-python
(`celpy`, PyPI), keeping only the branches that lead to a rule; `Kind.rules` caches the result,
so a Kind compiles its rules once, not per request. `rule_causes(tree, new, old)` evaluates them
against an object (after defaulting) and returns one 422 cause per failing rule::

    tree = compile_rules(kind.schema)
    causes = rule_causes(tree, new_obj, old_obj)   # old_obj None on create
    # [{"reason": "FieldValueInvalid", "field": "spec.training",
    #   "message": 'Invalid value: "object": spec.training cannot change after creation; ...'}]

Semantics followed (apiextensions-apiserver `pkg/apiserver/schema/cel`):

* a rule runs where its value exists, with `self` bound to the value at its schema node, typed by
  the schema (`number` is a double, `integer` an int); rules under `items` run per list element
  and under `additionalProperties` per map value;
* a rule that mentions `oldSelf` is a transition rule: it runs only on update, and only where the
  old object has a correlated value (same property path, same map key, same key fields of a
  `x-kubernetes-list-type: map` item; items of other lists do not correlate);
* ratcheting (on by default since 1.30): on update, a value equal to its correlated old value is
  not validated again;
* the cause: `Invalid value: "<schema type>": <message>`, the message being `messageExpression`'s
  result, else `message`, else `failed rule: <rule>`; `reason` (FieldValueForbidden, ...Required,
  ...Duplicate) and `fieldPath` (relative to the rule's node) as given.

Not emulated: Kubernetes' CEL extension libraries (`isURL`, `quantity`, `format`, ...), cost
limits, `optionalOldSelf`, order-insensitive equality of set/map lists, `format`-typed values
(timestamps, durations) — strings stay strings.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import celpy
from celpy import celtypes

_ENV = celpy.Environment()
_OLD_SELF = re.compile(r"\boldSelf\b")
_MESSAGES = {"FieldValueForbidden": "Forbidden: {msg}", "FieldValueRequired": "Required value: {msg}",
             "FieldValueDuplicate": "Duplicate value: {type}"}


class RuleCompileError(ValueError):
    """A rule that does not compile; `path` names it the way the CRD's validation would."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: Invalid value: compilation failed: {message}")
        self.path = path


@dataclasses.dataclass(frozen=True)
class Rule:
    rule: str
    program: Any  # celpy Runner
    transition: bool
    message: str = ""
    message_program: Any = None
    field_path: str = ""
    reason: str = ""


@dataclasses.dataclass
class Node:
    """A schema node on the way to at least one rule."""

    schema: Mapping[str, Any]
    rules: list[Rule] = dataclasses.field(default_factory=list)
    properties: dict[str, Node] = dataclasses.field(default_factory=dict)
    items: Node | None = None
    values: Node | None = None  # additionalProperties
    list_keys: tuple[str, ...] = ()  # x-kubernetes-list-map-keys of a list-type map


def _program(text: str, where: str) -> Any:
    try:
        return _ENV.program(_ENV.compile(text))
    except Exception as e:  # noqa: BLE001 -- celpy's parse errors have no common base besides Exception
        raise RuleCompileError(where, str(e).strip()) from None


def compile_rules(schema: Mapping[str, Any] | None, where: str = "openAPIV3Schema") -> Node | None:
    """The rule tree of `schema`, or None when it holds no rule. Raises `RuleCompileError`."""
    if not isinstance(schema, Mapping):
        return None
    node = Node(schema=schema)
    for i, spec in enumerate(schema.get("x-kubernetes-validations") or ()):
        at = f"{where}.x-kubernetes-validations[{i}]"
        text = spec["rule"]
        node.rules.append(Rule(
            rule=text, program=_program(text, f"{at}.rule"),
            transition=bool(_OLD_SELF.search(text)), message=spec.get("message", ""),
            message_program=_program(spec["messageExpression"], f"{at}.messageExpression")
            if spec.get("messageExpression") else None,
            field_path=spec.get("fieldPath", ""), reason=spec.get("reason", "")))
    for key, sub in (schema.get("properties") or {}).items():
        child = compile_rules(sub, f"{where}.properties[{key}]")
        if child is not None:
            node.properties[key] = child
    node.items = compile_rules(schema.get("items"), f"{where}.items")
    node.values = compile_rules(schema.get("additionalProperties"), f"{where}.additionalProperties")
    if schema.get("x-kubernetes-list-type") == "map":
        node.list_keys = tuple(schema.get("x-kubernetes-list-map-keys") or ())
    if not (node.rules or node.properties or node.items or node.values):
        return None
    return node


def to_cel(value: Any, schema: Mapping[str, Any] | None) -> Any:
    """JSON `value` as the CEL value the API server binds, typed by its schema."""
    schema = schema or {}
    if isinstance(value, dict):
        props, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        return celtypes.MapType({celtypes.StringType(k): to_cel(v, props.get(k) or (
            extra if isinstance(extra, Mapping) else None)) for k, v in value.items()})
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items")) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, (int, float)) and schema.get("type") == "number":
        return celtypes.DoubleType(value)
    if isinstance(value, int):
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    return None  # null, as celpy binds it


def rule_causes(tree: Node | None, new: Any, old: Any = None) -> list[dict[str, str]]:
    """One 422 cause per failing rule; `old` is the stored object on update, None on create."""
    causes: list[dict[str, str]] = []
    if tree is not None:
        _walk(tree, new, old, old is not None, "", causes)
    return causes


def _walk(node: Node, new: Any, old: Any, correlated: bool, path: str, causes: list[dict[str, str]]) -> None:
    if new is None or (correlated and new == old):
        return  # absent values are not validated; unchanged ones are ratcheted
    if node.rules:
        bound = to_cel(new, node.schema)
        bound_old = to_cel(old, node.schema) if correlated else None
        for rule in node.rules:
            if rule.transition and not correlated:
                continue
            cause = _evaluate(rule, node.schema, path, {"self": bound, **({"oldSelf": bound_old} if correlated else {})})
            if cause is not None:
                causes.append(cause)
    if isinstance(new, dict):
        olds = old if correlated and isinstance(old, dict) else {}
        for key, child in node.properties.items():
            if key in new:
                _walk(child, new[key], olds.get(key), key in olds, _child(path, key), causes)
        if node.values is not None:
            for key, value in new.items():
                if key not in node.properties:
                    _walk(node.values, value, olds.get(key), key in olds, f"{path}[{key}]", causes)
    elif isinstance(new, list) and node.items is not None:
        olds_by_key = {}
        if node.list_keys and correlated and isinstance(old, list):
            olds_by_key = {_key(item, node.list_keys): item for item in old if isinstance(item, dict)}
        for i, item in enumerate(new):
            key = _key(item, node.list_keys) if node.list_keys and isinstance(item, dict) else None
            _walk(node.items, item, olds_by_key.get(key), key in olds_by_key, f"{path}[{i}]", causes)


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _key(item: Mapping[str, Any], keys: tuple[str, ...]) -> str:
    return json.dumps([item.get(k) for k in keys])


def _evaluate(rule: Rule, schema: Mapping[str, Any], path: str, activation: dict[str, Any]) -> dict[str, str] | None:
    try:
        result = rule.program.evaluate(activation)
    except Exception as e:  # noqa: BLE001 -- celpy raises CELEvalError and, for some overloads, TypeError
        result = e
    where = path + (rule.field_path if rule.field_path.startswith(("[", ".")) or not rule.field_path
                    else "." + rule.field_path)
    where = where.lstrip(".")
    type_ = json.dumps(schema.get("type", "object"))
    if isinstance(result, celtypes.BoolType) or isinstance(result, bool):
        if result:
            return None
        message = _message(rule, activation)
    else:
        detail = result.args[0] if isinstance(result, Exception) and result.args else result
        return {"reason": "FieldValueInvalid", "field": where,
                "message": f"Invalid value: {type_}: rule evaluation error: {detail}"}
    template = _MESSAGES.get(rule.reason, "Invalid value: {type}: {msg}")
    return {"reason": rule.reason or "FieldValueInvalid", "field": where,
            "message": template.format(type=type_, msg=message)}


def _message(rule: Rule, activation: dict[str, Any]) -> str:
    if rule.message_program is not None:
        try:
            said = rule.message_program.evaluate(activation)
        except Exception:  # noqa: BLE001 -- a broken messageExpression falls back, as the server does
            said = None
        if isinstance(said, str) and said.strip():
            return str(said)
    return rule.message or f"failed rule: {rule.rule.strip()}"
