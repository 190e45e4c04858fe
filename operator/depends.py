"""Jobs that wait for other jobs: the `ptj://<job>` gate of a job that has not started yet.

A job whose spec refers to another job of its namespace (`posttrain.api.refs`) stays `Pending` with a
`WaitingForDependency` condition until every job it names has `Succeeded`; then the references are
resolved to those jobs' outputs and the resolved spec goes into the job's immutable spec ConfigMap
(the user's spec is never rewritten). A dependency that `Failed`, a cycle of jobs that need each
other, or a dependency that still does not exist `grace` seconds after the job was created fails the
job (`DependencyFailed`, `DependencyCycle`, `DependencyNotFound`). The grace lets `kubectl apply -f`
of a file create the jobs in any order.

No polling: the controller keeps an `Index` (job -> the jobs it waits for, in memory) and runs the
waiting jobs' passes when a job they wait for changes phase or goes away. The index is rebuilt by
the passes themselves, which kopf runs for every job when it starts listing (after a restart, or
when a standby replica becomes leader); the only timer is one wake-up at the end of a missing
dependency's grace.

    >>> gate("b", {"model": {"source": "ptj://a"}}, {"a": None}, cycle=None, waited=0.0, grace=60.0).wait[0]
    'DependencyNotFound'
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from posttrain.api import refs
from posttrain.api.status import Phase
from posttrain.operator import vocab


class Index:
    """job -> the jobs it waits for, and the reverse, per namespace (this process's memory only)."""

    def __init__(self) -> None:
        self._waits_for: dict[tuple[str, str], set[str]] = {}
        self._waited_by: dict[tuple[str, str], set[str]] = {}

    def set(self, namespace: str, job: str, dependencies: set[str]) -> None:
        for dep in self._waits_for.pop((namespace, job), set()):
            self._waited_by.get((namespace, dep), set()).discard(job)
        if dependencies:
            self._waits_for[(namespace, job)] = set(dependencies)
            for dep in dependencies:
                self._waited_by.setdefault((namespace, dep), set()).add(job)

    def dependents(self, namespace: str, job: str) -> list[str]:
        return sorted(self._waited_by.get((namespace, job), ()))


@dataclass
class Gate:
    spec: dict[str, Any] | None = None  # the resolved spec (wire form) once every dependency succeeded
    wait: tuple[str, str] | None = None  # (reason, message) while one has not finished or does not exist yet
    fail: tuple[str, str] | None = None  # (reason, message): the job can never run
    wake_in: float | None = None  # seconds until a missing dependency's grace ends


def seconds_between(start: str | None, end: str, *, default: float) -> float:
    """Seconds from one RFC 3339 time to another (`default` when either cannot be read).

    >>> seconds_between("2026-01-01T00:00:00Z", "2026-01-01T00:01:30Z", default=0.0)
    90.0
    """
    try:
        a, b = (dt.datetime.fromisoformat(str(t).replace("Z", "+00:00")) for t in (start, end))
    except ValueError:
        return default
    return (b - a).total_seconds()


def _failure(body: dict[str, Any]) -> str:
    cond = next((c for c in (body.get("status") or {}).get("conditions") or []
                 if c.get("type") == vocab.COND_FAILED and c.get("status") == "True"), {})
    return f"{cond.get('reason', 'Failed')}: {cond.get('message', '')}".rstrip(": ")


def gate(name: str, spec: dict[str, Any], found: dict[str, dict[str, Any] | None], *, cycle: list[str] | None,
         waited: float, grace: float, namespace: str = "") -> Gate:
    """What a job that has not started does about its references.

    spec: the job's spec (wire form); found: each referenced job's object (None: it does not exist);
    cycle: a cycle of jobs through this one, if any; waited: seconds since this job was created.
    """
    if cycle:
        ref = next(r for r in refs.references(spec) if r.job == cycle[1])
        return Gate(fail=(vocab.REASON_DEPENDENCY_CYCLE,
                          f"{ref.path}: {ref.uri}: jobs {' -> '.join(cycle)} need each other's output, so none of "
                          "them can start; change one of them to use something else"))
    pending: list[str] = []
    missing: list[str] = []
    targets: dict[str, str] = {}
    where = f" in namespace {namespace}" if namespace else ""
    for ref in refs.references(spec):
        body = found.get(ref.job)
        phase = ((body or {}).get("status") or {}).get("phase") or Phase.pending.value
        if body is None:
            missing.append(f"{ref.path}: {ref.uri}: no PostTrainingJob {ref.job}{where}")
        elif phase == Phase.failed.value:
            return Gate(fail=(vocab.REASON_DEPENDENCY_FAILED,
                              f"{ref.path}: {ref.uri}: job {ref.job} failed ({_failure(body)}); fix and run it again, "
                              f"then create {name} again"))
        elif phase != Phase.succeeded.value:
            pending.append(f"{ref.path}: waiting for job {ref.job} to succeed (it is {phase})")
        else:
            output = ((body.get("spec") or {}).get("output") or {}).get("uri")
            if not output:
                return Gate(fail=(vocab.REASON_DEPENDENCY_FAILED,
                                  f"{ref.path}: {ref.uri}: job {ref.job} has no spec.output.uri to read from"))
            targets[ref.path] = refs.target(ref, output=output, dependency=body.get("spec") or {})
    if missing:
        if waited >= grace:
            return Gate(fail=(vocab.REASON_DEPENDENCY_NOT_FOUND,
                              f"{'; '.join(missing)} (waited {grace:.0f}s after this job was created); create "
                              f"the job it names, then {name} again"))
        return Gate(wait=(vocab.REASON_DEPENDENCY_NOT_FOUND,
                          f"{'; '.join(missing)} yet; {name} fails if it does not exist {grace:.0f}s after "
                          f"{name} was created"), wake_in=grace - waited)
    if pending:
        return Gate(wait=(vocab.REASON_WAITING_FOR_DEPENDENCY, "; ".join(pending)))
    return Gate(spec=refs.resolve(spec, targets))


MAX_WALK = 64  # jobs read at most to look for a cycle through one job


async def read(namespace: str, name: str, spec: dict[str, Any], get_job: Any) -> tuple[
        dict[str, dict[str, Any] | None], list[str] | None]:
    """The jobs `spec` names (None: missing), and a cycle through `name` among the jobs that have not finished,
    found by reading the jobs they name in turn (`get_job(namespace, name)`, at most MAX_WALK of them)."""
    direct = {r.job for r in refs.references(spec)}
    found: dict[str, dict[str, Any] | None] = {}
    edges: dict[str, set[str]] = {name: direct}
    todo = sorted(direct)
    while todo and len(found) < MAX_WALK:
        job = todo.pop(0)
        if job in found or job == name:
            continue
        body = found[job] = await get_job(namespace, job)
        phase = ((body or {}).get("status") or {}).get("phase")
        if body is None or phase in (Phase.succeeded.value, Phase.failed.value):
            continue  # a finished job waits for nothing: no cycle goes through it
        try:
            edges[job] = {r.job for r in refs.references(body.get("spec") or {})}
        except refs.ReferenceError:
            continue  # that job is invalid and fails on its own
        todo += sorted(edges[job] - set(found))
    return {job: found.get(job) for job in direct}, refs.cycle_through(edges, name)
