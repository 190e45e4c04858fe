"""The PostTrainingJob CustomResourceDefinition, generated from the pydantic models.

`posttrain-operator crd` prints it; `charts/posttrain/crds/` holds the
checked-in copy, and a test fails when the two differ. Regenerate with:

    posttrain-operator crd > charts/posttrain/crds/posttrain.dev_posttrainingjobs.yaml

The schema is structural (what Kubernetes requires of a CRD): every `$ref`
inlined, `anyOf: [X, null]` folded into X, `exclusiveMinimum` in OpenAPI 3.0
form, open-ended objects marked `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from posttrain.api.spec import GROUP, KIND, MUTABLE_FIELDS, PLURAL, SHORT_NAME, VERSION, PostTrainingJobSpec
from posttrain.api.status import PostTrainingJobStatus

CRD_FILENAME = f"{GROUP}_{PLURAL}.yaml"

PRINTER_COLUMNS = [
    {"name": "Algorithm", "type": "string", "jsonPath": ".spec.algorithm"},
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.source", "priority": 0},
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Reward", "type": "number", "jsonPath": ".status.progress.reward"},
    # dpo/reward: preference accuracy on the eval pairs; the latest step's reward margin with -o wide
    {"name": "Accuracy", "type": "number", "jsonPath": ".status.progress.evalRewardsAccuracy"},
    {"name": "Margin", "type": "number", "jsonPath": ".status.progress.rewardsMargin", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP = {"title", "discriminator"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Turn one pydantic JSON-schema node into a Kubernetes structural-schema node."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        merged = {**copy.deepcopy(target), **node}  # the field's own description wins
        return _structural(merged, defs)
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [o for o in node.pop(key) if o.get("type") != "null"]
            if len(options) == 1:
                inner = _structural(options[0], defs)
                return _structural({**inner, **node}, defs)
            # A genuine union (e.g. string or list of strings): keep it open, pydantic validates it.
            node.pop("type", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("default", 0) is None:
        node.pop("default")
    if "exclusiveMinimum" in node and not isinstance(node["exclusiveMinimum"], bool):
        node["minimum"] = node["exclusiveMinimum"]
        node["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node and not isinstance(node["exclusiveMaximum"], bool):
        node["maximum"] = node["exclusiveMaximum"]
        node["exclusiveMaximum"] = True
    if "const" in node:  # a one-value Literal: OpenAPI v3 in Kubernetes has no const
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if node.get("additionalProperties") is True or (
        node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node
    ):
        node.pop("additionalProperties", None)
        node["x-kubernetes-preserve-unknown-fields"] = True
    if node.get("additionalProperties") is False:
        node.pop("additionalProperties")  # Kubernetes prunes unknown fields; pydantic rejects them
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key == "$defs":
            continue
        if key == "properties":
            out[key] = {name: _structural(v, defs) for name, v in value.items()}
        elif key in ("items", "additionalProperties"):
            out[key] = _structural(value, defs)
        else:
            out[key] = value
    return out


def openapi_schema(model: type) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def crd_manifest() -> dict[str, Any]:
    """The whole CustomResourceDefinition as a dict."""
    spec_schema = openapi_schema(PostTrainingJobSpec)
    spec_schema["description"] = "What to train, on what data, how, and where each Ray role runs."
    for name, prop in spec_schema["properties"].items():
        if name not in MUTABLE_FIELDS:
            # Transition rule: checked on update when the field exists before and after.
            prop["x-kubernetes-validations"] = [
                {"rule": "self == oldSelf", "message": f"spec.{name} cannot change after creation; create a new PostTrainingJob"}
            ]
    spec_schema["x-kubernetes-validations"] = [
        {"rule": f"has(self.{name}) == has(oldSelf.{name})",
         "message": f"spec.{name} cannot be added or removed after creation"}
        for name in spec_schema["properties"]
        if name not in MUTABLE_FIELDS and name not in spec_schema.get("required", [])
    ]
    status_schema = openapi_schema(PostTrainingJobStatus)
    status_schema["description"] = "Observed state, written by the operator."
    schema = {
        "type": "object",
        "description": "A post-training job (SFT, DPO, reward model, distillation, GRPO, PPO) run on Ray through KubeRay.",
        "properties": {
            "apiVersion": {"type": "string", "description": "posttrain.dev/v1alpha1"},
            "kind": {"type": "string", "description": "PostTrainingJob"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "required": ["spec"],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}", "labels": {"app.kubernetes.io/part-of": "posttrain"}},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "posttrain"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `posttrain-operator crd` from posttrain.api; do not edit by hand.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


def to_jsonschema(node: Any, *, strict: bool = True) -> Any:
    """A Kubernetes OpenAPI v3 schema as plain JSON Schema, for validating objects in tests and emulators.

    Handles `nullable`, `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`
    and the boolean `exclusiveMinimum`; with `strict`, unknown fields are errors (the API
    server would prune them silently, which hides typos).
    """
    if isinstance(node, list):
        return [to_jsonschema(n, strict=strict) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {k: to_jsonschema(v, strict=strict) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_jsonschema(value, strict=strict) if isinstance(value, dict) else value
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_jsonschema(v, strict=strict) for v in value]
        elif key == "exclusiveMinimum" and value is True:
            out["exclusiveMinimum"] = node["minimum"]
        elif key == "exclusiveMaximum" and value is True:
            out["exclusiveMaximum"] = node["maximum"]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and value is False:
            continue
        elif key == "format" and value == "int-or-string":
            continue
        else:
            out[key] = value
    if out.get("exclusiveMinimum") is not None and "minimum" in out and node.get("exclusiveMinimum") is True:
        out.pop("minimum")
    if out.get("exclusiveMaximum") is not None and "maximum" in out and node.get("exclusiveMaximum") is True:
        out.pop("maximum")
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        strict
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out
