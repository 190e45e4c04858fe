"""Jobs that feed each other: `ptj://<job>` references, what they resolve to, and their order.

A field that takes a model or a data set may instead name another PostTrainingJob of the same
namespace, `ptj://<job>` or `ptj://<job>/<path>`. Which fields may hold a reference is written
once, in `FIELDS` below (a new field, e.g. a distillation teacher, is one line there); everything
else (validation, the local runner, the operator) goes through the functions of this module.

What a reference resolves to, once the named job has succeeded (`<output>` is its `spec.output.uri`,
or its output folder in a local run):

- a model field (`kind` "model"): the model that job published, `<output>/model` when it wrote one
  (full fine-tuning, or `output.mergeAdapter: true`), else `<output>/adapter` (an adapter folder
  whose `posttrain.json` names its base; model loading merges it into that base);
- a data field (`kind` "data"): `<output>/data/train.jsonl` (DATA_FILE), the set a data-producing job writes;
- `ptj://<job>/<path>`: `<output>/<path>`, whatever the field.

    >>> spec = {"model": {"source": "ptj://sft-a"}, "data": {"train": [{"source": "x.jsonl"}]}}
    >>> [(r.path, r.job, r.kind) for r in references(spec)]
    [('spec.model.source', 'sft-a', 'model')]
    >>> dep = {"adapter": {"type": "lora"}, "output": {"uri": "pvc://models/sft-a"}}
    >>> target(references(spec)[0], output="pvc://models/sft-a", dependency=dep)
    'pvc://models/sft-a/adapter'
    >>> find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}})
    ['a', 'b', 'c', 'a']
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SCHEME = "ptj://"
DATA_FILE = "data/train.jsonl"  # what a data reference to a job resolves to inside its output
MODEL_FOLDER, ADAPTER_FOLDER = "model", "adapter"  # what a model reference resolves to (see `published`)

# Every spec field that may name another job: (wire path below `spec`, kind). `[]` walks a list.
FIELDS: tuple[tuple[str, str], ...] = (
    ("model.source", "model"),
    ("model.tokenizer", "model"),
    ("data.train[].source", "data"),
    ("data.eval.source", "data"),
    ("rewards[].model", "model"),
    ("teacher.source", "model"),
    ("teacher.tokenizer", "model"),
)

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # a PostTrainingJob's name (metadata.name)


@dataclass(frozen=True)
class Reference:
    path: str  # wire path of the field, e.g. "spec.data.train[1].source"
    uri: str  # as written, e.g. "ptj://sft-a/adapter"
    job: str  # the job it names, e.g. "sft-a"
    subpath: str  # "" or the path inside that job's output, e.g. "adapter"
    kind: str  # "model" or "data"


class ReferenceError(ValueError):
    """A `ptj://` value that is not a valid reference; `path` is the field's wire path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.message = path, message


def is_reference(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(SCHEME)


def parse(value: str, path: str = "") -> tuple[str, str]:
    """`ptj://job[/sub/path]` -> (job, sub/path); ReferenceError when the name or path is not valid.

    >>> parse("ptj://gen/pairs/train.jsonl")
    ('gen', 'pairs/train.jsonl')
    """
    job, _, sub = value[len(SCHEME):].partition("/")
    if len(job) > 63 or not _NAME.match(job):
        raise ReferenceError(path, f"{value!r} does not name a job: write ptj://<job-name> with the job's "
                                   "metadata.name (lowercase letters, digits and '-', at most 63 characters)")
    sub = sub.rstrip("/")
    parts = sub.split("/") if sub else []
    if any(p in ("", ".", "..") for p in parts):
        raise ReferenceError(path, f"{value!r}: the path after the job name must be a plain relative path "
                                   "inside that job's output (no empty, '.' or '..' parts)")
    return job, sub


def _walk(node: Any, keys: list[str], path: str) -> Iterator[tuple[str, dict[str, Any], str]]:
    """(wire path, the dict holding the value, its key) for every place `keys` reaches in `node`."""
    if not isinstance(node, dict):
        return
    key, rest = keys[0], keys[1:]
    name, is_list = key.removesuffix("[]"), key.endswith("[]")
    if name not in node:
        return
    here = f"{path}.{name}"
    if not rest:
        yield here, node, name
    elif is_list and isinstance(node[name], list):
        for i, item in enumerate(node[name]):
            yield from _walk(item, rest, f"{here}[{i}]")
    elif not is_list:
        yield from _walk(node[name], rest, here)


def _places(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], str, str]]:
    for field, kind in FIELDS:
        for path, holder, key in _walk(spec, field.split("."), "spec"):
            yield path, holder, key, kind


def references(spec: dict[str, Any]) -> list[Reference]:
    """Every `ptj://` reference in a spec (wire form, the mapping under `spec`), in field order.
    Raises ReferenceError for a malformed one."""
    out = []
    for path, holder, key, kind in _places(spec):
        value = holder[key]
        if is_reference(value):
            job, sub = parse(value, path)
            out.append(Reference(path, value, job, sub, kind))
    return out


def errors(spec: dict[str, Any], *, own_name: str | None = None) -> list[tuple[str, str]]:
    """(wire path, message) of every malformed reference, and of one to the job itself."""
    out = []
    for path, holder, key, _ in _places(spec):
        value = holder[key]
        if not is_reference(value):
            continue
        try:
            job, _ = parse(value, path)
        except ReferenceError as exc:
            out.append((path, exc.message))
            continue
        if job == own_name:
            out.append((path, f"{value!r} refers to this job itself ({own_name}); a job cannot use its own output"))
    return out


def published(dependency: dict[str, Any]) -> str:
    """What a job's output holds as its model (wire spec in, `model` or `adapter` out): full fine-tuning
    and merged adapters write `model/`, every other adapter only `adapter/`."""
    adapter = (dependency.get("adapter") or {}).get("type", "none")
    merged = bool((dependency.get("output") or {}).get("mergeAdapter"))
    return MODEL_FOLDER if adapter == "none" or merged else ADAPTER_FOLDER


def target(ref: Reference, *, output: str, dependency: dict[str, Any]) -> str:
    """The URI `ref` resolves to, given the named job's output URI and its spec (wire form)."""
    inside = ref.subpath or (published(dependency) if ref.kind == "model" else DATA_FILE)
    return f"{output.rstrip('/')}/{inside}"


def resolve(spec: dict[str, Any], targets: dict[str, str]) -> dict[str, Any]:
    """A copy of `spec` (wire form) with the value at each path in `targets` replaced by its target URI.
    The user's spec is never changed: the resolved copy is what runs."""
    out = copy.deepcopy(spec)
    for path, holder, key, _ in _places(out):
        if path in targets:
            holder[key] = targets[path]
    return out


def keep_references(resolved: dict[str, Any], requested: dict[str, Any]) -> dict[str, Any]:
    """`resolved` with the references of `requested` put back, so that a spec as written and the resolved
    spec it ran with compare equal (the operator's check that fixed fields did not change)."""
    back = {r.path: r.uri for r in references(requested)}
    return resolve(resolved, back)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in `job -> jobs it refers to`, as [a, b, ..., a], or None. Deterministic (sorted walk)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def cycle_through(edges: dict[str, set[str]], start: str) -> list[str] | None:
    """A cycle that passes through `start`, as [start, ..., start], or None.

    >>> cycle_through({"a": {"x"}, "x": {"y"}, "y": {"x"}}, "a") is None, cycle_through({"a": {"b"}, "b": {"a"}}, "a")
    (True, ['a', 'b', 'a'])
    """
    seen: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(edges.get(node, ())):
            if nxt == start:
                return path + [start]
            if nxt not in seen:
                seen.add(nxt)
                if found := visit(nxt, path + [nxt]):
                    return found
        return None

    return visit(start, [start])


def order(names: list[str], edges: dict[str, set[str]]) -> list[str]:
    """`names` in dependency order (every job after the jobs it refers to), otherwise as given.
    Call `find_cycle` first: jobs on a cycle are left out.

    >>> order(["c", "b", "a"], {"c": {"b"}, "b": {"a"}})
    ['a', 'b', 'c']
    """
    done: list[str] = []
    pending, known = list(names), set(names)
    while pending:
        ready = next((n for n in pending if edges.get(n, set()) & known <= set(done)), None)
        if ready is None:
            break
        done.append(ready)
        pending.remove(ready)
    return done


def graph(specs: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    """job name -> the names its spec refers to (wire specs in)."""
    return {name: {r.job for r in references(spec)} for name, spec in specs.items()}


def set_errors(specs: dict[str, dict[str, Any]], *, others_exist: bool = False) -> list[tuple[str, str, str]]:
    """(job, wire path, message) for the references of a set of jobs run together (one namespace, or one
    `posttrain run`): a reference to a job outside the set (unless `others_exist`: on a cluster it may
    already be there) and a cycle, which is reported once per job on it."""
    out = []
    if not others_exist:
        for name, spec in specs.items():
            for ref in references(spec):
                if ref.job not in specs:
                    out.append((name, ref.path, f"{ref.uri} names job {ref.job!r}, which is not among the jobs given "
                                                f"({', '.join(sorted(specs))}); give its file too, or fix the name"))
    cycle = find_cycle(graph(specs))
    if cycle:
        loop = " -> ".join(cycle)
        for name in cycle[:-1]:
            ref = next(r for r in references(specs[name]) if r.job == cycle[cycle.index(name) + 1])
            out.append((name, ref.path, f"{ref.uri} closes a cycle of jobs that need each other's output ({loop}); "
                                        "a job can only use the output of a job that does not need its own"))
    return out
