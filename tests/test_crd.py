"""The generated PostTrainingJob CRD: checked-in copy, structural schema, printer columns,
and the examples validated against the schema as plain JSON Schema.

    .venv/bin/python -m pytest tests/test_crd.py -q
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

from support import REPO
from support.jobs import BASE_JOB
from posttrain.api.crd import CRD_FILENAME, crd_manifest, crd_yaml, to_jsonschema

CHECKED_IN = REPO / "charts" / "posttrain" / "crds" / CRD_FILENAME
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
OPERATOR = Path(sys.executable).parent / "posttrain-operator"

# Keys Kubernetes forbids inside anyOf / allOf / oneOf / not of a structural schema.
_NOT_IN_JUNCTORS = {"type", "description", "default", "additionalProperties", "nullable", "title"}


@pytest.fixture(scope="module")
def version() -> dict[str, Any]:
    [v] = crd_manifest()["spec"]["versions"]
    return v


@pytest.fixture(scope="module")
def schema(version) -> dict[str, Any]:
    return version["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validator(schema):
    json_schema = to_jsonschema(schema, strict=True)
    jsonschema.Draft202012Validator.check_schema(json_schema)
    return jsonschema.Draft202012Validator(json_schema)


def test_checked_in_crd_is_current():
    assert CHECKED_IN.read_text() == crd_yaml(), (
        f"{CHECKED_IN.relative_to(REPO)} is stale: run `make crd` and commit the result"
    )


def test_crd_names(version):
    crd = crd_manifest()
    assert crd["metadata"]["name"] == "posttrainingjobs.posttrain.dev"
    names = crd["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("PostTrainingJob", "posttrainingjobs", ["ptj"])
    assert crd["spec"]["scope"] == "Namespaced"
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)


def _nodes(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node under `node` (properties, items, additionalProperties, junctors)."""
    if not isinstance(node, dict):
        return
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")
    for key in ("anyOf", "allOf", "oneOf"):
        for i, child in enumerate(node.get(key, [])):
            yield from _nodes(child, f"{path}<{key}{i}>")


def _all_keys(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key
            if key not in ("default", "example", "enum"):
                yield from _all_keys(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_keys(item)


def test_schema_is_structural(schema):
    forbidden = set(_all_keys(schema)) & {"$ref", "$defs", "definitions", "title", "discriminator", "const"}
    assert forbidden == set()
    nodes = list(_nodes(schema))
    assert len(nodes) > 80  # the walk reaches the whole spec and status
    for path, node in nodes:
        junctor = "<" in path
        if junctor:
            assert not _NOT_IN_JUNCTORS & node.keys(), f"{path}: {sorted(node)}"
            continue
        for key in ("anyOf", "oneOf", "allOf"):
            for option in node.get(key, []):
                assert not _NOT_IN_JUNCTORS & option.keys(), f"{path}.{key}: {option}"
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            assert "type" in node, f"{path or '<root>'} has no type"
        assert node.get("additionalProperties") is not False, f"{path}: additionalProperties: false"
        if "default" in node:
            assert node["default"] is not None, f"{path}: null default"
        if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
            assert path == ".metadata" or node.get("x-kubernetes-preserve-unknown-fields"), path


def test_schema_inlines_enums_defaults_and_camel_case(schema):
    spec = schema["properties"]["spec"]
    assert spec["type"] == "object"
    assert set(spec["required"]) == {"algorithm", "model", "data"}  # training defaults (generate trains nothing)
    assert spec["properties"]["algorithm"]["enum"] == ["sft", "dpo", "kto", "orpo", "simpo", "reward", "distill", "generate",
                                                         "evaluate", "grpo", "ppo"]
    adapter = spec["properties"]["adapter"]["properties"]
    assert adapter["type"]["enum"][:2] == ["none", "lora"] and adapter["type"]["default"] == "none"
    assert adapter["r"] == {**adapter["r"], "type": "integer", "minimum": 0, "exclusiveMinimum": True, "default": 16}
    assert adapter["targetModules"]["x-kubernetes-preserve-unknown-fields"] is True
    training = spec["properties"]["training"]["properties"]
    assert {"maxSteps", "globalBatchSize", "microBatchSize", "maxSeqLength"} <= training.keys()
    assert not any("_" in name for _, node in _nodes(schema) for name in node.get("properties", {}))
    trainer = spec["properties"]["roles"]["properties"]["trainer"]["properties"]
    assert trainer["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert trainer["affinity"]["x-kubernetes-preserve-unknown-fields"] is True
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Provisioning", "Running", "Succeeded", "Failed", "Suspended"]


def test_every_field_has_a_description(schema):
    spec = schema["properties"]["spec"]
    missing = [path for path, node in _nodes(spec, ".spec") for name, child in node.get("properties", {}).items()
               if not child.get("description", "").strip()]
    assert missing == []


def test_printer_columns(version):
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == ["Algorithm", "Model", "Phase", "Step", "Reward", "Accuracy", "Margin", "Age"]
    by_name = {c["name"]: c for c in columns}
    assert by_name["Algorithm"]["jsonPath"] == ".spec.algorithm"
    assert by_name["Model"]["jsonPath"] == ".spec.model.source"
    assert by_name["Phase"]["jsonPath"] == ".status.phase"
    assert (by_name["Step"]["jsonPath"], by_name["Step"]["type"]) == (".status.progress.step", "integer")
    assert (by_name["Reward"]["jsonPath"], by_name["Reward"]["type"]) == (".status.progress.reward", "number")
    assert (by_name["Age"]["jsonPath"], by_name["Age"]["type"]) == (".metadata.creationTimestamp", "date")
    # dpo/reward: the eval preference accuracy in `kubectl get ptj`, the reward margin with -o wide
    assert by_name["Accuracy"]["jsonPath"] == ".status.progress.evalRewardsAccuracy"
    assert (by_name["Margin"]["jsonPath"], by_name["Margin"]["priority"]) == (".status.progress.rewardsMargin", 1)


def test_status_subresource(version, schema):
    assert version["subresources"] == {"status": {}}
    assert "status" in schema["properties"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates_against_the_crd_schema(path, validator):
    docs = list(yaml.safe_load_all(path.read_text()))  # a pipeline's jobs may share one file
    errors = [f"{i}: {list(e.absolute_path)}: {e.message}" for i, doc in enumerate(docs)
              for e in validator.iter_errors(doc)]
    assert docs and errors == []


def test_a_job_with_status_validates(validator):
    doc = copy.deepcopy(BASE_JOB)
    doc["status"] = {"phase": "Running", "restarts": 1, "rayJob": "tiny-sft-r1",
                     "progress": {"step": 3, "totalSteps": 4, "loss": 0.5},
                     "conditions": [{"type": "Ready", "status": "False", "reason": "Provisioning"}]}
    assert list(validator.iter_errors(doc)) == []


@pytest.mark.parametrize(("mutate", "where", "word"), [
    (lambda s: s["training"].update(maxStep=3), ["spec", "training"], "maxStep"),
    (lambda s: s["data"]["train"][0].update(wieght=2), ["spec", "data", "train", 0], "wieght"),
    (lambda s: s.update(algorithm="rlhf"), ["spec", "algorithm"], "rlhf"),
    (lambda s: s.update(adapter={"type": "lorax"}), ["spec", "adapter", "type"], "lorax"),
    (lambda s: s["model"].update(dtype="int8"), ["spec", "model", "dtype"], "int8"),
    (lambda s: s.update(adapter={"type": "lora", "r": 0}), ["spec", "adapter", "r"], "0"),
    (lambda s: s.update(roles={"trainer": {"memory": "32GB"}}), ["spec", "roles", "trainer", "memory"], "32GB"),
    (lambda s: s.pop("model"), ["spec"], "model"),
])
def test_crd_schema_rejects_bad_specs(validator, mutate, where, word):
    doc = copy.deepcopy(BASE_JOB)
    assert list(validator.iter_errors(doc)) == []
    mutate(doc["spec"])
    errors = list(validator.iter_errors(doc))
    assert [list(e.absolute_path) for e in errors] == [where], [e.message for e in errors]
    assert word in errors[0].message


def test_non_strict_schema_accepts_unknown_fields(schema):
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"]["training"]["maxStep"] = 3
    lenient = jsonschema.Draft202012Validator(to_jsonschema(schema, strict=False))
    assert list(lenient.iter_errors(doc)) == []


def test_operator_crd_command_prints_the_crd():
    result = subprocess.run([str(OPERATOR), "crd"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == crd_yaml()
    assert yaml.safe_load(result.stdout)["kind"] == "CustomResourceDefinition"
