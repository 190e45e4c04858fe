"""The pure heart of the operator: (job, observed children, progress, now) -> (actions, status).

Level-based: nothing here remembers anything between calls. The handlers
observe the cluster, call `plan`, carry out its actions (create-or-get, so a
repeated action is harmless) and write the status it returns, only when it
differs from what is stored.

RayJob states come from KubeRay (`status.jobDeploymentStatus`: Initializing,
Running, Complete, Failed, Suspending, Suspended, ...; `status.jobStatus`:
PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posttrain.api.spec import MUTABLE_FIELDS, PostTrainingJob
from posttrain.api.status import Phase
from posttrain.operator import vocab


@dataclass
class Observed:
    """What the handlers saw for one job."""

    rayjobs: list[dict[str, Any]]  # our RayJobs of this job, any order
    spec_in_configmap: dict[str, Any] | None  # the spec the job was started with (wire form)
    progress: dict[str, Any] | None  # the driver's GET /progress, when it answered
    now: str  # RFC 3339, passed in so this stays pure
    requested_spec: dict[str, Any] | None = None  # the spec as the user has it now (wire form, defaults filled)


@dataclass
class Plan:
    create_run: int | None = None  # create RayJob <job>-r<n>
    set_suspend: tuple[str, bool] | None = None  # (RayJob name, suspend)
    status: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)


def run_of(rayjob: dict[str, Any]) -> int:
    value = rayjob.get("metadata", {}).get("labels", {}).get(vocab.LABEL_RUN)
    if value is not None and str(value).isdigit():
        return int(value)
    return vocab.run_index(rayjob["metadata"]["name"]) or 0


def immutable_changes(current: dict[str, Any], started_with: dict[str, Any] | None) -> list[str]:
    """Spec fields (wire names) that differ from the spec the job was started with."""
    if not started_with:
        return []
    # Only fields both sides know: a field a newer operator added (with its default) was not
    # changed by anyone; adding or removing a field by hand is caught by the CRD's CEL rules.
    keys = (set(current) & set(started_with)) - MUTABLE_FIELDS
    return sorted(k for k in keys if current.get(k) != started_with.get(k))


def effective_spec(current: dict[str, Any], started_with: dict[str, Any] | None) -> dict[str, Any]:
    """The spec to build runs from: the original one, with the mutable fields as they are now."""
    if not started_with:
        return current
    return {**started_with, **{k: v for k, v in current.items() if k in MUTABLE_FIELDS}}


def _outcome(rayjob: dict[str, Any]) -> str:
    """`succeeded`, `failed`, `suspended`, `running` or `starting` for one RayJob."""
    st = rayjob.get("status") or {}
    deployment, job_status = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    if deployment == "Complete":
        return "succeeded" if job_status == "SUCCEEDED" else "failed"
    if deployment == "Failed" or job_status == "FAILED":
        return "failed"
    if deployment in ("Suspended", "Suspending"):
        return "suspended"
    if deployment == "Running":
        return "running"
    return "starting"


def _failure_text(rayjob: dict[str, Any]) -> str:
    st = rayjob.get("status") or {}
    reason = st.get("reason") or st.get("jobStatus") or st.get("jobDeploymentStatus") or "Failed"
    message = st.get("message") or ""
    return f"{rayjob['metadata']['name']} failed ({reason}{': ' + message if message else ''})"


def _condition(prev: list[dict[str, Any]], ctype: str, status: bool, reason: str, message: str,
               generation: int | None, now: str) -> dict[str, Any]:
    value = "True" if status else "False"
    old = next((c for c in prev if c.get("type") == ctype), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") else now
    return {"type": ctype, "status": value, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


def _progress(progress: dict[str, Any] | None, prev: dict[str, Any] | None) -> dict[str, Any] | None:
    if not progress:
        return prev
    out = {"step": int(progress.get("step") or 0)}
    for key in ("totalSteps", "loss", "reward", "tokensPerSecond"):
        if progress.get(key) is not None:
            out[key] = progress[key]
    return out


def invalid(body: dict[str, Any], message: str, now: str) -> Plan:
    """The plan for a spec that does not validate: Failed, nothing created."""
    prev = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    conditions = prev.get("conditions") or []
    status = {
        **{k: v for k, v in prev.items() if k not in ("conditions",)},
        "phase": Phase.failed.value,
        "observedGeneration": generation,
        "conditions": [
            _condition(conditions, vocab.COND_FAILED, True, vocab.REASON_INVALID_SPEC, message, generation, now),
            _condition(conditions, vocab.COND_READY, False, vocab.REASON_INVALID_SPEC, message, generation, now),
        ],
    }
    status.setdefault("completionTime", now)
    events = [] if prev.get("phase") == Phase.failed.value else [("Warning", vocab.REASON_INVALID_SPEC, message)]
    return Plan(status=status, events=events)


def plan(job: PostTrainingJob, body: dict[str, Any], obs: Observed) -> Plan:
    """Decide what to create or change, and what the status is now."""
    spec = job.spec
    prev = body.get("status") or {}
    generation = body.get("metadata", {}).get("generation")
    prev_phase = prev.get("phase")
    conditions = prev.get("conditions") or []
    out = Plan()
    runs = sorted(obs.rayjobs, key=run_of)
    current = runs[-1] if runs else None
    run = run_of(current) if current else 0

    phase, reason, message = Phase.pending, vocab.REASON_PENDING, "creating the Ray cluster"
    completion: str | None = prev.get("completionTime")
    if prev_phase in (Phase.succeeded.value, Phase.failed.value) and prev.get("completionTime"):
        # Terminal phases stay terminal: a finished job's RayJob may be garbage collected by its TTL.
        phase = Phase(prev_phase)
        failed = next((c for c in conditions if c.get("type") == vocab.COND_FAILED and c.get("status") == "True"), None)
        reason = failed["reason"] if failed else vocab.REASON_SUCCEEDED
        message = failed.get("message", "") if failed else "training finished"
    elif current is None:
        out.create_run = 0
        phase, reason, message = Phase.provisioning, vocab.REASON_PROVISIONING, f"created {vocab.rayjob_name(job.metadata.name, 0)}"
    else:
        outcome = _outcome(current)
        applied_suspend = current.get("metadata", {}).get("annotations", {}).get(f"{vocab.ANNOTATION_PREFIX}/suspend")
        if outcome == "succeeded":
            phase, reason, message = Phase.succeeded, vocab.REASON_SUCCEEDED, f"{current['metadata']['name']} finished"
        elif outcome == "failed":
            text = _failure_text(current)
            if run < spec.max_restarts:
                out.create_run = run + 1
                run += 1
                nxt = vocab.rayjob_name(job.metadata.name, run)
                phase, reason = Phase.provisioning, vocab.REASON_RESTARTING
                message = f"{text}; restart {run}/{spec.max_restarts}: {nxt} resumes from the last checkpoint"
                out.events.append(("Warning", vocab.REASON_RESTARTING, message))
            else:
                phase, reason = Phase.failed, vocab.REASON_RESTARTS_EXHAUSTED
                message = f"{text}; no restarts left (maxRestarts {spec.max_restarts})"
        elif str(spec.suspend).lower() != applied_suspend:
            out.set_suspend = (current["metadata"]["name"], spec.suspend)
            phase = Phase.suspended if spec.suspend else Phase.provisioning
            reason = vocab.REASON_SUSPENDED if spec.suspend else vocab.REASON_PROVISIONING
            message = "suspending the Ray cluster" if spec.suspend else "resuming the Ray cluster"
        elif spec.suspend:
            phase, reason, message = Phase.suspended, vocab.REASON_SUSPENDED, "spec.suspend is true"
        elif outcome == "suspended" or (current.get("spec") or {}).get("suspend"):
            # Suspended although we did not ask: a queue (Kueue) holds it until admitted.
            phase, reason, message = Phase.pending, "Queued", "waiting for admission by the queue"
        elif outcome == "running":
            phase, reason, message = Phase.running, vocab.REASON_RUNNING, f"{current['metadata']['name']} is training"
        else:
            phase, reason, message = Phase.provisioning, vocab.REASON_PROVISIONING, \
                f"{current['metadata']['name']}: waiting for the Ray cluster"

    if phase.is_terminal() and not completion:
        completion = obs.now
    start = prev.get("startTime") or (obs.now if phase is Phase.running else None)
    changed = immutable_changes(obs.requested_spec or spec.wire(), obs.spec_in_configmap)
    new_conditions = [
        _condition(conditions, vocab.COND_READY, phase is Phase.succeeded, reason, message, generation, obs.now),
        _condition(conditions, vocab.COND_PROGRESSING, phase in (Phase.provisioning, Phase.running), reason, message,
                   generation, obs.now),
        _condition(conditions, vocab.COND_FAILED, phase is Phase.failed, reason, message if phase is Phase.failed else "",
                   generation, obs.now),
    ]
    if changed:
        text = (f"spec fields {', '.join(changed)} cannot change after creation; the job keeps running with the "
                f"values it started with (only {', '.join(sorted(MUTABLE_FIELDS))} may change)")
        new_conditions.append(_condition(conditions, vocab.COND_SPEC_ACCEPTED, False, vocab.REASON_IMMUTABLE_FIELD,
                                         text, generation, obs.now))
        old = next((c for c in conditions if c.get("type") == vocab.COND_SPEC_ACCEPTED), None)
        if not old or old.get("message") != text:
            out.events.append(("Warning", vocab.REASON_IMMUTABLE_FIELD, text))
    progress = _progress(obs.progress, prev.get("progress"))
    status: dict[str, Any] = {
        "phase": phase.value,
        "observedGeneration": generation,
        "conditions": new_conditions,
        "rayJob": vocab.rayjob_name(job.metadata.name, run) if (current or out.create_run is not None) else None,
        "restarts": run,
        "startTime": start,
        "completionTime": completion,
        "lastCheckpoint": (obs.progress or {}).get("lastCheckpoint") or prev.get("lastCheckpoint"),
        "progress": progress,
    }
    out.status = {k: v for k, v in status.items() if v is not None}
    if prev_phase != phase.value:
        kind = "Warning" if phase is Phase.failed else "Normal"
        out.events.append((kind, reason, f"{prev_phase or 'New'} -> {phase.value}: {message}"))
    return out


def status_changed(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return (old or {}) != new
