"""Reading PostTrainingJob files: YAML in, validated models or readable errors out.

    >>> job = parse_job({"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
    ...     "metadata": {"name": "x"}, "spec": {"algorithm": "sft", "model": {"source": "m"},
    ...     "data": {"train": [{"source": "d.jsonl"}]}, "training": {"maxSteps": 1}}})
    >>> job.spec.training.max_steps
    1
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.api.spec import AVAILABLE_ALGORITHMS, PostTrainingJob


@dataclass(frozen=True)
class SpecError:
    """One problem in a job file: the field's dotted path and what to do about it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidJob(ValueError):
    def __init__(self, errors: list[SpecError], source: str = "") -> None:
        self.errors = errors
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(str(e) for e in errors))


_HINTS = {
    "extra_forbidden": "unknown field; check its spelling and nesting (`kubectl explain ptj.spec` lists the fields)",
    "missing": "required field is missing",
}


def _wire_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in ("str", "list[str]", "list[int]", "KeepEvery", "function-after", "function-before"):
            continue  # union-member and validator tags, not fields
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def errors_from_validation(exc: ValidationError) -> list[SpecError]:
    out: list[SpecError] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        path = _wire_path(err["loc"])
        message = _HINTS.get(err["type"], err["msg"])
        if err["type"] == "value_error":
            message = message.removeprefix("Value error, ")
            # Cross-field validators name the field they blame as "@relative.path: message".
            if message.startswith("@"):
                rel, _, message = message[1:].partition(": ")
                path = f"{path}.{rel}" if path else rel
        elif (err["type"] not in _HINTS and "input" in err and not isinstance(err["input"], (dict, list))
              and not _is_env(path)):
            # Never echo an environment value: it may be a credential, and messages reach status and logs.
            message = f"{message} (got {err['input']!r})"
        if err["type"] == "enum" and "expected" in err.get("ctx", {}):
            message = f"must be one of {err['ctx']['expected']} (got {err['input']!r})"
        key = (path, message)
        if key not in seen:
            seen.add(key)
            out.append(SpecError(path, message))
    return out


def _is_env(path: str) -> bool:
    return path.startswith(("spec.env", "env"))


def non_finite_errors(value: Any, path: str = "") -> list[SpecError]:
    """`.nan` / `.inf` anywhere in a document (typed fields and free-form ones like reward kwargs alike).

    >>> [str(e) for e in non_finite_errors({"spec": {"rl": {"temperature": float("nan")}}})]
    ['spec.rl.temperature: must be a finite number (got nan)']
    """
    if isinstance(value, float) and not math.isfinite(value):
        return [SpecError(path, f"must be a finite number (got {value})")]
    if isinstance(value, dict):
        return [e for k, v in value.items() for e in non_finite_errors(v, f"{path}.{k}" if path else str(k))]
    if isinstance(value, list):
        return [e for i, v in enumerate(value) for e in non_finite_errors(v, f"{path}[{i}]")]
    return []


def parse_job(doc: Any, *, source: str = "", require_available: bool = False) -> PostTrainingJob:
    """Validate one document; raise InvalidJob listing every error with its field path."""
    if not isinstance(doc, dict):
        raise InvalidJob([SpecError("", "a PostTrainingJob must be a YAML mapping")], source)
    infinite = non_finite_errors(doc)
    try:
        job = PostTrainingJob.model_validate(doc)
    except ValidationError as exc:
        seen = {e.path for e in infinite}
        raise InvalidJob(infinite + [e for e in errors_from_validation(exc) if e.path not in seen], source) from None
    if infinite:
        raise InvalidJob(infinite, source)
    if require_available and job.spec.algorithm.value not in AVAILABLE_ALGORITHMS:
        raise InvalidJob(
            [
                SpecError(
                    "spec.algorithm",
                    f"{job.spec.algorithm.value} is not available in this version of posttrain "
                    f"(available: {', '.join(sorted(AVAILABLE_ALGORITHMS))})",
                )
            ],
            source,
        )
    return job


def known_fields(doc: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The document without fields this version's models do not know, and the paths of those fields.

    The operator reads objects from the API server this way: after a CRD upgrade the server fills
    in new defaulted fields, which an older operator must ignore rather than call invalid.

    >>> known_fields({"spec": {"training": {"maxSteps": 1, "newKnob": 2}, "future": {}}})[1]
    ['spec.training.newKnob', 'spec.future']
    """
    dropped: list[str] = []
    return _strip(doc, PostTrainingJob, "", dropped), dropped


def _model_in(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """(model, is_list) for `Model`, `Model | None` and `list[Model]` annotations."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args:
        return _model_in(args[0])[0], True
    models = [m for m in (_model_in(a)[0] for a in args) if m is not None]
    return (models[0], False) if len(models) == 1 and origin is not list else (None, False)


def _strip(doc: Any, model: type[BaseModel], path: str, dropped: list[str]) -> Any:
    if not isinstance(doc, dict) or model.model_config.get("extra") != "forbid":
        return doc
    fields = {key: f for name, f in model.model_fields.items() for key in (name, f.alias or name)}
    out: dict[str, Any] = {}
    for key, value in doc.items():
        where = f"{path}.{key}" if path else str(key)
        field = fields.get(key)
        if field is None:
            dropped.append(where)
            continue
        inner, is_list = _model_in(field.annotation)
        if inner is not None and is_list and isinstance(value, list):
            value = [_strip(v, inner, f"{where}[{i}]", dropped) for i, v in enumerate(value)]
        elif inner is not None and not is_list:
            value = _strip(value, inner, where, dropped)
        out[key] = value
    return out


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars and flow collections (`5`, `true`, `[q_proj, v_proj]`)."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `path=value` overrides; paths are relative to `spec` unless they start with `spec.` or `metadata.`.

    >>> apply_overrides({"spec": {"training": {"maxSteps": 100}}}, ["training.maxSteps=5", "data.train[0].weight=2"])
    {'spec': {'training': {'maxSteps': 5}, 'data': {'train': [{'weight': 2}]}}}
    """
    for item in overrides:
        if "=" not in item:
            raise InvalidJob([SpecError(item, "--set takes path=value, e.g. --set training.maxSteps=5")])
        path, _, raw = item.partition("=")
        keys = _split_path(path.strip())
        if keys[0] not in ("spec", "metadata"):
            keys = ["spec", *keys]
        node: Any = doc
        for key, nxt in zip(keys, keys[1:]):
            _check_container(node, key, path.strip())
            if isinstance(key, int):
                _check_index(node, key, path.strip())
                if key == len(node):
                    node.append({} if not isinstance(nxt, int) else [])
                node = node[key]
            else:
                node = node.setdefault(key, [] if isinstance(nxt, int) else {})
        last = keys[-1]
        _check_container(node, last, path.strip())
        if isinstance(last, int):
            _check_index(node, last, path.strip())
            if last == len(node):
                node.append(None)
        node[last] = parse_value(raw)
    return doc


def _check_container(node: Any, key: str | int, path: str) -> None:
    """A `--set` path must step into mappings by name and into lists by index, never into a scalar."""
    want, what = (list, f"list index [{key}]") if isinstance(key, int) else (dict, f"field {key!r}")
    if not isinstance(node, want):
        found = {dict: "a mapping", list: "a list"}.get(type(node), f"{type(node).__name__} {node!r}")
        raise InvalidJob([SpecError(path, f"cannot set {what}: the value there is {found}, "
                                          f"not a {'list' if want is list else 'mapping'}")])


def _check_index(node: list[Any], index: int, path: str) -> None:
    """An index may name an item or the slot right after the last one (append); nothing further, so
    that `data.train[100000000]` is an error, not a list of a hundred million items."""
    if index > len(node):
        raise InvalidJob([SpecError(path, f"list index [{index}] is beyond the end: the list has {len(node)} "
                                          f"item(s); change one with [0]..[{len(node) - 1}] or append with "
                                          f"[{len(node)}]" if node else
                                          f"list index [{index}] is beyond the end: the list is empty; "
                                          "append with [0]")])


def _split_path(path: str) -> list[str | int]:
    keys: list[str | int] = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        if name:
            keys.append(name)
        while rest:
            idx, _, rest = rest.partition("]")
            if not idx.isdigit():
                raise InvalidJob([SpecError(path, "list indexes in --set paths are numbers, e.g. data.train[0].weight=2")])
            keys.append(int(idx))
            rest = rest.removeprefix("[")
    if not keys:
        raise InvalidJob([SpecError(path, "empty --set path")])
    return keys


def read_documents(path: str | Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a file."""
    p = Path(path)
    if not p.is_file():
        raise InvalidJob([SpecError("", f"no such file: {p}")], str(p))
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if d is not None]
    except yaml.YAMLError as exc:
        raise InvalidJob([SpecError("", f"not valid YAML: {exc}")], str(p)) from None
    if not docs:
        raise InvalidJob([SpecError("", "the file holds no YAML document")], str(p))
    return docs


def load_job(path: str | Path, overrides: list[str] | None = None, *, require_available: bool = True) -> PostTrainingJob:
    """The single PostTrainingJob in `path`, with `--set` overrides applied."""
    docs = read_documents(path)
    if len(docs) != 1:
        raise InvalidJob([SpecError("", f"expected one PostTrainingJob, found {len(docs)} documents")], str(path))
    doc = apply_overrides(docs[0], overrides or [])
    return parse_job(doc, source=str(path), require_available=require_available)
