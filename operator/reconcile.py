"""The pure heart of the operator: (job, observed children, progress, now) -> (actions, status).

Level-based: nothing here remembers anything between calls. The handlers observe the cluster,
call `plan`, carry out its actions (create-or-get and idempotent patches, so a repeated action is
harmless) and write the status it returns, only when it differs from what is stored. Every clock
the plan needs (when the step last changed) lives in the status, so an operator restart loses
nothing.

RayJob states come from KubeRay (`status.jobDeploymentStatus`: Initializing, Running, Complete,
Failed, ValidationFailed, Suspending, Suspended, ...; `status.jobStatus`: PENDING, RUNNING,
SUCCEEDED, FAILED, STOPPED); `observe` reads them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from posttrain.api.cluster import pvc_claims
from posttrain.api.spec import MUTABLE_FIELDS, PostTrainingJob
from posttrain.api.status import Phase
from posttrain.operator import observe, vocab


@dataclass
class Observed:
    """What the handlers saw for one job."""

    rayjobs: list[dict[str, Any]]  # our RayJobs of this job, any order
    spec_in_configmap: dict[str, Any] | None  # the spec the job was started with (wire form)
    progress: dict[str, Any] | None  # the current run's /progress, sanitized (observe.sanitize_progress)
    now: str  # RFC 3339, passed in so this stays pure
    requested_spec: dict[str, Any] | None = None  # the spec as the user has it now (wire form, defaults filled)
    unknown_fields: list[str] = field(default_factory=list)  # stored fields this version does not know
    spec_problem: tuple[str, str] | None = None  # (reason, message): the spec as written cannot be used
    no_new_runs: tuple[str, str] | None = None  # (reason, message): the job may not start another run
    refuse: tuple[str, str] | None = None  # (reason, message): fail the job now and stop its run
    volumes: dict[str, dict[str, Any] | None] | None = None  # claim -> PVC (None: missing); None: not read
    pods_cannot_start: str | None = None  # why the current run's pods can never start
    spec_hash: str | None = None  # hash of the spec ConfigMap's content


@dataclass
class Plan:
    create_run: int | None = None  # create RayJob <job>-r<n>
    set_suspend: tuple[str, bool] | None = None  # (RayJob name, suspend)
    stop_run: tuple[str, str, str] | None = None  # (RayJob name, reason, message): suspend it, mark why
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)

    def needs_volumes(self) -> bool:
        return self.create_run is not None


def run_of(rayjob: dict[str, Any]) -> int:
    value = rayjob.get("metadata", {}).get("labels", {}).get(vocab.LABEL_RUN)
    if value is not None and str(value).isdigit():
        return int(value)
    return vocab.run_index(rayjob["metadata"]["name"]) or 0


def _differences(current: Any, started: Any, path: str) -> list[str]:
    if isinstance(current, dict) and isinstance(started, dict):
        # Only keys both sides know: a field a newer version added (with its default) was not
        # changed by anyone; adding or removing a field by hand is caught by the CRD's CEL rules.
        return [d for k in sorted(set(current) & set(started))
                for d in _differences(current[k], started[k], f"{path}.{k}" if path else k)]
    if isinstance(current, list) and isinstance(started, list) and len(current) == len(started):
        return [d for i, (a, b) in enumerate(zip(current, started)) for d in _differences(a, b, f"{path}[{i}]")]
    return [] if current == started else [path]


def immutable_changes(current: dict[str, Any], started_with: dict[str, Any] | None) -> list[str]:
    """Spec fields (wire paths) that differ from the spec the job was started with, compared
    recursively on the fields both versions know."""
    if not started_with:
        return []
    fixed = {k: v for k, v in current.items() if k not in MUTABLE_FIELDS}
    return _differences(fixed, {k: v for k, v in started_with.items() if k not in MUTABLE_FIELDS}, "")


def effective_spec(current: dict[str, Any], started_with: dict[str, Any] | None) -> dict[str, Any]:
    """The spec to build runs from: the original one, with the mutable fields as they are now."""
    if not started_with:
        return current
    return {**started_with, **{k: v for k, v in current.items() if k in MUTABLE_FIELDS}}


def _condition(prev: list[dict[str, Any]], ctype: str, status: bool, reason: str, message: str,
               generation: int | None, now: str) -> dict[str, Any]:
    value = "True" if status else "False"
    old = next((c for c in prev if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") else now
    return {"type": ctype, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


def _once(prev: list[dict[str, Any]], cond: dict[str, Any], kind: str, events: list) -> None:
    """An Event for `cond` when it is new or says something new (level-based: once per change)."""
    old = next((c for c in prev if c.get("type") == cond["type"]), None)
    if not old or (old.get("reason"), old.get("message")) != (cond["reason"], cond["message"]):
        events.append((kind, cond["reason"], cond["message"]))


def _time(text: str | None) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def invalid(body: dict[str, Any], message: str, now: str) -> Plan:
    """The plan for a spec that does not validate before anything was created: Failed, nothing created."""
    return terminal(body, vocab.REASON_INVALID_SPEC, message, now)


def terminal(body: dict[str, Any], reason: str, message: str, now: str) -> Plan:
    """Failed with `reason`, keeping whatever the status already says (a finished job stays finished)."""
    prev = body.get("status") or {}
    if prev.get("phase") in (Phase.succeeded.value, Phase.failed.value) and prev.get("completionTime"):
        return Plan(status=dict(prev))
    generation = body.get("metadata", {}).get("generation")
    conditions = prev.get("conditions") or []
    status = {
        **{k: v for k, v in prev.items() if k != "conditions"},
        "phase": Phase.failed.value,
        "observedGeneration": generation,
        "conditions": [
            _condition(conditions, vocab.COND_READY, False, reason, message, generation, now),
            _condition(conditions, vocab.COND_PROGRESSING, False, reason, message, generation, now),
            _condition(conditions, vocab.COND_FAILED, True, reason, message, generation, now),
        ],
        "completionTime": prev.get("completionTime") or now,
    }
    return Plan(status=status, events=[("Warning", reason, message)])


def blocked(body: dict[str, Any], reason: str, message: str, now: str) -> Plan:
    """The stored status plus a Blocked condition: something outside the job holds it up for now."""
    prev = body.get("status") or {}
    conditions = [c for c in prev.get("conditions") or [] if c.get("type") != vocab.COND_BLOCKED]
    cond = _condition(prev.get("conditions") or [], vocab.COND_BLOCKED, True, reason, message,
                      body.get("metadata", {}).get("generation"), now)
    out = Plan(status={**prev, "phase": prev.get("phase") or Phase.pending.value, "conditions": conditions + [cond]})
    _once(prev.get("conditions") or [], cond, "Warning", out.events)
    return out


def waiting(body: dict[str, Any], reason: str, message: str, now: str) -> Plan:
    """Pending with a WaitingForDependency condition: a job its spec names (ptj://) has not succeeded yet."""
    prev = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    old = prev.get("conditions") or []
    cond = _condition(old, vocab.COND_WAITING_FOR_DEPENDENCY, True, reason, message, generation, now)
    kept = [c for c in old if c.get("type") != vocab.COND_WAITING_FOR_DEPENDENCY]
    out = Plan(status={**prev, "phase": Phase.pending.value, "observedGeneration": generation,
                       "conditions": kept + [cond]})
    _once(old, cond, "Normal", out.events)
    return out


def _volume_gate(job: PostTrainingJob, obs: Observed) -> tuple[str, str, bool] | None:
    """(reason, message, permanent) when the claims the job names cannot serve a new run."""
    if obs.volumes is None:
        return None
    missing = []
    for claim, usage in pvc_claims(job.spec).items():
        pvc = obs.volumes.get(claim)
        if pvc is None:
            missing.append(claim)
        elif problem := observe.volume_problem(claim, usage, pvc):
            return vocab.REASON_VOLUME_NOT_SHARED, problem, True
    if missing:
        return (vocab.REASON_WAITING_FOR_VOLUME,
                f"waiting for PersistentVolumeClaim(s) {', '.join(missing)} in namespace {job.metadata.namespace}: "
                "create them (ReadWriteMany) and the job starts", False)
    return None


def plan(job: PostTrainingJob, body: dict[str, Any], obs: Observed) -> Plan:
    """Decide what to create or change, and what the status is now."""
    spec, name = job.spec, job.metadata.name
    prev = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    prev_phase = prev.get("phase")
    conditions = prev.get("conditions") or []
    out = Plan()
    runs = sorted(obs.rayjobs, key=run_of)
    current = runs[-1] if runs else None
    run = run_of(current) if current else 0
    blocked_by: tuple[str, str] | None = None

    def restart_or_fail(text: str, restart_reason: str) -> tuple[Phase, str, str]:
        nonlocal run
        if obs.no_new_runs:
            return Phase.failed, obs.no_new_runs[0], f"{text}; {obs.no_new_runs[1]}"
        if run < spec.max_restarts:
            out.create_run = run = run + 1
            message = (f"{text}; restart {run}/{spec.max_restarts}: {vocab.rayjob_name(name, run)} resumes from "
                       "the last checkpoint")
            return Phase.provisioning, restart_reason, message
        return Phase.failed, vocab.REASON_RESTARTS_EXHAUSTED, f"{text}; no restarts left (maxRestarts {spec.max_restarts})"

    phase, reason, message = Phase.pending, vocab.REASON_PENDING, "creating the Ray cluster"
    outcome = observe.outcome(current) if current is not None else None
    if prev_phase in (Phase.succeeded.value, Phase.failed.value) and prev.get("completionTime"):
        # Terminal phases stay terminal: a finished job's RayJob may be garbage collected by its TTL.
        phase = Phase(prev_phase)
        failed = next((c for c in conditions if c.get("type") == vocab.COND_FAILED and c.get("status") == "True"), None)
        reason = failed["reason"] if failed else vocab.REASON_SUCCEEDED
        message = failed.get("message", "") if failed else "training finished"
    elif obs.refuse:
        phase, (reason, message) = Phase.failed, obs.refuse
        if current is not None and outcome in ("starting", "running", "suspended"):
            out.stop_run = (current["metadata"]["name"], reason, message)
    elif current is None:
        out.create_run = 0
        phase, reason, message = Phase.provisioning, vocab.REASON_PROVISIONING, f"created {vocab.rayjob_name(name, 0)}"
    else:
        current_name = current["metadata"]["name"]
        applied_suspend = (current.get("metadata", {}).get("annotations") or {}).get(vocab.ANNOTATION_SUSPEND)
        if outcome == "succeeded":
            phase, reason, message = Phase.succeeded, vocab.REASON_SUCCEEDED, f"{current_name} finished"
        elif outcome == "invalid":
            st = current.get("status") or {}
            phase, reason = Phase.failed, vocab.REASON_RAYJOB_VALIDATION_FAILED
            message = f"KubeRay refused {current_name} ({st.get('reason') or 'ValidationFailed'}): " \
                      f"{observe.summary(st.get('message'))}"
        elif outcome in ("failed", "stopped"):
            text, why = observe.failure_text(current), observe.stop_reason(current)
            if why == vocab.REASON_PODS_CANNOT_START:
                phase, reason, message = Phase.failed, why, text
            elif outcome == "failed" and observe.exit_code(current) == observe.INVALID_INPUT_EXIT_CODE:
                phase, reason = Phase.failed, vocab.REASON_INVALID_INPUT
                message = f"{text}; the driver found bad input (exit code 2) and wrote nothing: fix the spec or " \
                          "the data and create the job again (no restart, it would fail the same way)"
            else:
                phase, reason, message = restart_or_fail(text, why or vocab.REASON_RESTARTING)
        elif outcome == "stopping":
            why = observe.stop_reason(current) or ""
            phase, reason = Phase.provisioning, why
            message = f"stopping {current_name} ({why}); the next run starts once its Ray cluster is gone"
        elif obs.pods_cannot_start and outcome in ("starting", "running"):
            phase, reason, message = Phase.failed, vocab.REASON_PODS_CANNOT_START, \
                f"{current_name} cannot start: {obs.pods_cannot_start}"
            out.stop_run = (current_name, reason, obs.pods_cannot_start)
        elif str(spec.suspend).lower() != applied_suspend:
            out.set_suspend = (current_name, spec.suspend)
            phase = Phase.suspended if spec.suspend else Phase.provisioning
            reason = vocab.REASON_SUSPENDED if spec.suspend else vocab.REASON_PROVISIONING
            message = "suspending the Ray cluster" if spec.suspend else "resuming the Ray cluster"
        elif spec.suspend:
            phase, reason, message = Phase.suspended, vocab.REASON_SUSPENDED, "spec.suspend is true"
        elif outcome == "suspended" or (current.get("spec") or {}).get("suspend"):
            # Suspended although we did not ask: a queue (Kueue) holds it until admitted.
            phase, reason, message = Phase.pending, vocab.REASON_QUEUED, "waiting for admission by the queue"
        elif outcome == "running":
            phase, reason, message = Phase.running, vocab.REASON_RUNNING, f"{current_name} is training"
        else:
            phase, reason, message = Phase.provisioning, vocab.REASON_PROVISIONING, \
                f"{current_name}: waiting for the Ray cluster"

    # The clock of spec.progressDeadlineSeconds: when the step last changed in this Running stretch.
    progress = observe.sanitize_progress(obs.progress) if phase is Phase.running else None
    last_progress = prev.get("lastProgressTime")
    if phase is Phase.running:
        fresh = prev_phase != Phase.running.value or prev.get("rayJob") != current["metadata"]["name"]
        step_moved = progress is not None and progress.get("step") != (prev.get("progress") or {}).get("step")
        if fresh or step_moved or not last_progress:
            last_progress = obs.now
        deadline, since, now = spec.progress_deadline_seconds, _time(last_progress), _time(obs.now)
        if deadline and since and now and (now - since).total_seconds() > deadline:
            text = f"no new step for {deadline}s (progressDeadlineSeconds) in {current['metadata']['name']}"
            out.stop_run = (current["metadata"]["name"], vocab.REASON_PROGRESS_DEADLINE, text)
            phase, reason = Phase.provisioning, vocab.REASON_PROGRESS_DEADLINE
            message = f"{text}; stopping it, then the next run resumes from the last checkpoint"
            out.events.append(("Warning", reason, message))

    if out.create_run is not None and (gate := _volume_gate(job, obs)):
        gate_reason, gate_message, permanent = gate
        out.create_run = None
        if permanent:
            phase, reason, message = Phase.failed, gate_reason, gate_message
        else:
            blocked_by = (gate_reason, gate_message)
            phase, reason, message = Phase.pending, gate_reason, gate_message
            run = run_of(current) if current else 0
    if out.create_run:  # a restart (run 0 is announced by the phase change)
        out.events.append(("Warning", reason, message))

    if phase.is_terminal() and not prev.get("completionTime"):
        completion = obs.now
    else:
        completion = prev.get("completionTime")
    start = prev.get("startTime") or (obs.now if phase is Phase.running else None)
    new_conditions = [
        _condition(conditions, vocab.COND_READY, phase is Phase.succeeded, reason, message, generation, obs.now),
        _condition(conditions, vocab.COND_PROGRESSING, phase in (Phase.provisioning, Phase.running), reason, message,
                   generation, obs.now),
        _condition(conditions, vocab.COND_FAILED, phase is Phase.failed, reason, message if phase is Phase.failed else "",
                   generation, obs.now),
    ]
    changed = immutable_changes(obs.requested_spec or spec.wire(), obs.spec_in_configmap)
    accepted: tuple[str, str] | None = obs.spec_problem
    if accepted is None and changed:
        accepted = (vocab.REASON_IMMUTABLE_FIELD,
                    f"spec fields {', '.join(changed)} cannot change after creation; the job keeps running with "
                    f"the values it started with (only {', '.join(sorted(MUTABLE_FIELDS))} may change)")
    if accepted:
        cond = _condition(conditions, vocab.COND_SPEC_ACCEPTED, False, *accepted, generation, obs.now)
        new_conditions.append(cond)
        _once(conditions, cond, "Warning", out.events)
    if obs.unknown_fields:
        text = (f"this operator does not know the fields {', '.join(obs.unknown_fields[:20])} (set by a newer "
                "CRD or by hand); they are ignored: upgrade the operator to use them")
        cond = _condition(conditions, vocab.COND_UNKNOWN_FIELDS, True, vocab.REASON_UNKNOWN_FIELDS, text,
                          generation, obs.now)
        new_conditions.append(cond)
        _once(conditions, cond, "Warning", out.events)
    if blocked_by:
        cond = _condition(conditions, vocab.COND_BLOCKED, True, *blocked_by, generation, obs.now)
        new_conditions.append(cond)
        _once(conditions, cond, "Warning", out.events)

    has_run = current is not None or out.create_run is not None
    status: dict[str, Any] = {
        "phase": phase.value,
        "observedGeneration": generation,
        "conditions": new_conditions,
        "rayJob": vocab.rayjob_name(name, run) if has_run else prev.get("rayJob"),
        "restarts": run,
        "startTime": start,
        "completionTime": completion,
        "lastCheckpoint": (progress or {}).get("lastCheckpoint") or prev.get("lastCheckpoint"),
        "progress": {k: v for k, v in progress.items() if k != "lastCheckpoint"} if progress else prev.get("progress"),
        "lastProgressTime": last_progress,
        "specHash": prev.get("specHash") or obs.spec_hash,
    }
    out.status = {k: v for k, v in status.items() if v is not None}
    if prev_phase != phase.value:
        kind = "Warning" if phase is Phase.failed else "Normal"
        out.events.append((kind, reason, f"{prev_phase or 'New'} -> {phase.value}: {message}"))
    return out


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return (old or {}) != new
