"""Pure readings of what the operator observes: RayJob states, driver exit codes, pods that can
never start, PersistentVolumeClaim access modes, and the driver's /progress answer.

Everything here takes plain dicts (as the API server or the driver sent them) and returns plain
values; `reconcile.plan` decides with them. Text that reaches a status condition or an Event is
cut to its first line and a bounded length: Ray puts the driver's log tail in a failed RayJob's
message, and conditions and Events are readable by anyone with `view` on the namespace.

    >>> exit_code({"status": {"message": "Job entrypoint command failed with exit code 2, last available "
    ...     "logs (truncated to 20,000 chars):\\nTraceback ... HF_TOKEN=hf_secret"}})
    2
    >>> summary("Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 "
    ...     "chars):\\nTraceback ... HF_TOKEN=hf_secret")
    'Job entrypoint command failed with exit code 2'
"""

from __future__ import annotations

import math
import re
from typing import Any

from posttrain.api import runtime
from posttrain.operator import vocab

MAX_TEXT = 300  # characters of server or KubeRay text copied into a condition or an Event
MAX_URI = 1024  # a longer lastCheckpoint from the driver is dropped, not cut (a cut URI is wrong)

# Ray 2.60 `dashboard/modules/job/job_supervisor.py`, copied into RayJob status.message by KubeRay.
_EXIT = re.compile(r"Job entrypoint command failed with exit code (-?\d+)")
_LOG_TAIL = re.compile(r",? ?last available logs.*$", re.S)
INVALID_INPUT_EXIT_CODE = runtime.EXIT_BAD_INPUT  # the driver's "bad input, nothing written" (1: training failed)


def summary(text: str | None, limit: int = MAX_TEXT) -> str:
    """The first line of `text` without Ray's log tail, at most `limit` characters."""
    first = _LOG_TAIL.sub("", (text or "").strip()).split("\n", 1)[0].strip()
    return first if len(first) <= limit else first[: limit - 1] + "…"


def exit_code(rayjob: dict[str, Any]) -> int | None:
    match = _EXIT.search((rayjob.get("status") or {}).get("message") or "")
    return int(match[1]) if match else None


def outcome(rayjob: dict[str, Any]) -> str:
    """`succeeded`, `failed`, `invalid` (KubeRay's ValidationFailed), `stopped` / `stopping` (the
    operator stopped it), `suspended`, `running` or `starting`."""
    st = rayjob.get("status") or {}
    deployment, job_status = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    if deployment == vocab.DEPLOYMENT_VALIDATION_FAILED:
        return "invalid"
    if stop_reason(rayjob):
        done = deployment in (vocab.DEPLOYMENT_SUSPENDED, vocab.DEPLOYMENT_FAILED, vocab.DEPLOYMENT_COMPLETE) \
            or job_status in (vocab.JOB_FAILED, vocab.JOB_STOPPED, vocab.JOB_SUCCEEDED)
        return "stopped" if done else "stopping"
    if deployment == vocab.DEPLOYMENT_COMPLETE:
        return "succeeded" if job_status == vocab.JOB_SUCCEEDED else "failed"
    if deployment == vocab.DEPLOYMENT_FAILED or job_status == vocab.JOB_FAILED:
        return "failed"
    if deployment in (vocab.DEPLOYMENT_SUSPENDED, vocab.DEPLOYMENT_SUSPENDING):
        return "suspended"
    if deployment == vocab.DEPLOYMENT_RUNNING:
        return "running"
    return "starting"


def stop_reason(rayjob: dict[str, Any]) -> str | None:
    return (rayjob.get("metadata", {}).get("annotations") or {}).get(vocab.ANNOTATION_STOP_REASON)


def failure_text(rayjob: dict[str, Any]) -> str:
    """`<rayjob> failed (<reason>: <first line of the message>)`, never Ray's log tail."""
    st = rayjob.get("status") or {}
    annotations = rayjob.get("metadata", {}).get("annotations") or {}
    if stop_reason(rayjob):
        return f"{rayjob['metadata']['name']} stopped ({stop_reason(rayjob)}: " \
               f"{summary(annotations.get(vocab.ANNOTATION_STOP_MESSAGE))})"
    reason = st.get("reason") or st.get("jobStatus") or st.get("jobDeploymentStatus") or "Failed"
    message = summary(st.get("message"))
    return f"{rayjob['metadata']['name']} failed ({reason}{': ' + message if message else ''})"


# --- pods that can never start ------------------------------------------------------------------

_MISSING_CLAIM = re.compile(r'persistentvolumeclaim "[^"]+" not found', re.I)
_MISSING_REF = re.compile(r'(secret|configmap) "[^"]+" not found|couldn\'t find key \S+ in (Secret|ConfigMap)', re.I)
_ADMISSION = re.compile(r"violates PodSecurity|no PriorityClass with name \S+ was found", re.I)
POD_CREATE_FAILURES = ("FailedToCreateHeadPod", "FailedToCreateWorkerPod")  # KubeRay's Event reasons


def pods_cannot_start(pods: list[dict[str, Any]], events: list[dict[str, Any]]) -> str | None:
    """Why the run's pods can never start, or None: a missing PersistentVolumeClaim, Secret or
    ConfigMap key, a Pod Security admission rejection, a missing PriorityClass.

    `pods` are the run's pods; `events` the Events about them and about its RayCluster (KubeRay
    records refused pod creations there: the pod then never exists).
    """
    for pod in pods:
        name = pod.get("metadata", {}).get("name", "?")
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and \
                    _MISSING_CLAIM.search(cond.get("message") or ""):
                return f"pod {name} cannot be scheduled: {summary(cond['message'])}"
        statuses = (pod.get("status") or {}).get("initContainerStatuses") or []
        statuses += (pod.get("status") or {}).get("containerStatuses") or []
        for cs in statuses:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") == "CreateContainerConfigError" and _MISSING_REF.search(waiting.get("message") or ""):
                return f"pod {name} container {cs.get('name')}: {summary(waiting['message'])}"
    for event in events:
        message = event.get("message") or event.get("note") or ""
        if event.get("reason") in POD_CREATE_FAILURES and (_ADMISSION.search(message) or _MISSING_CLAIM.search(message)):
            return f"KubeRay cannot create the pods: {summary(message)}"
        if event.get("reason") == "FailedScheduling" and _MISSING_CLAIM.search(message):
            return f"a pod cannot be scheduled: {summary(message)}"
    return None


# --- PersistentVolumeClaims ------------------------------------------------------------------------

def volume_problem(claim: str, usage: str, pvc: dict[str, Any]) -> str | None:
    """Why `pvc` cannot serve every pod of a job, or None. `usage` is "write" or "read" (inputs only)."""
    modes = set((pvc.get("status") or {}).get("accessModes") or (pvc.get("spec") or {}).get("accessModes") or [])
    allowed = {"ReadWriteMany"} if usage == "write" else {"ReadWriteMany", "ReadOnlyMany"}
    if modes & allowed:
        return None
    need = "ReadWriteMany" if usage == "write" else "ReadWriteMany or ReadOnlyMany (it is only read)"
    return (f"PersistentVolumeClaim {claim} has access modes {sorted(modes) or '[]'}, but the job's head and "
            f"worker pods run on different nodes and all mount it, and a ReadWriteOnce volume attaches to one "
            f"node at a time; use a claim with {need}, e.g. from an NFS, CephFS, EFS, Filestore or Azure Files "
            "storage class")


# --- the driver's /progress ---------------------------------------------------------------------

def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**53 else None


# The preference values of /progress's `preference` the status keeps (flat, beside loss).
PREFERENCE_PROGRESS = ("rewardsAccuracy", "rewardsMargin", "evalRewardsAccuracy")
# /progress's `evaluation` (model -> method -> score): at most this many models and methods each, names
# shaped like Kubernetes labels; the rest is dropped (an evaluation has a handful of each).
MAX_EVAL_MODELS, MAX_EVAL_METHODS = 8, 16
_EVAL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,62}")


def _evaluation(raw: Any) -> dict[str, dict[str, float]] | None:
    """model -> method -> score, names and numbers checked; None when nothing usable is left."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, dict[str, float]] = {}
    for model, methods in list(raw.items())[:MAX_EVAL_MODELS]:
        if not (isinstance(model, str) and _EVAL_NAME.fullmatch(model) and isinstance(methods, dict)):
            continue
        scores = {m: v for m, v in list(methods.items())[:MAX_EVAL_METHODS]
                  if isinstance(m, str) and _EVAL_NAME.fullmatch(m) and _number(v) is not None}
        if scores:
            out[model] = scores
    return out or None


def sanitize_progress(raw: Any) -> dict[str, Any] | None:
    """The fields of a /progress answer the status keeps, type-checked; None when it is unusable.

    The driver runs user code, so its answer is untrusted: wrong types are dropped, NaN and
    infinities are dropped (they are not JSON and the API server refuses them), long strings too.

    >>> sanitize_progress({"step": 3, "loss": float("nan"), "reward": "high", "totalSteps": 10})
    {'step': 3, 'totalSteps': 10}
    >>> sanitize_progress({"step": "3"}) is None
    True
    >>> sanitize_progress({"step": 2, "preference": {"rewardsMargin": 0.5, "evalRewardsAccuracy": "x"}})
    {'step': 2, 'rewardsMargin': 0.5}
    >>> sanitize_progress({"step": 4, "evaluation": {"base": {"direct": 0.3}, "trained": {"direct": 0.9, "x y": 1}}})
    {'step': 4, 'evaluation': {'base': {'direct': 0.3}, 'trained': {'direct': 0.9}}}
    """
    if not isinstance(raw, dict) or _count(raw.get("step")) is None:
        return None
    out: dict[str, Any] = {"step": raw["step"]}
    if _count(raw.get("totalSteps")) is not None:
        out["totalSteps"] = raw["totalSteps"]
    for key in ("loss", "reward", "score", "tokensPerSecond"):
        if _number(raw.get(key)) is not None:
            out[key] = raw[key]
    preference = raw.get("preference")  # dpo, kto, reward
    if isinstance(preference, dict):
        for key in PREFERENCE_PROGRESS:
            if _number(preference.get(key)) is not None:
                out[key] = preference[key]
    evaluation = _evaluation(raw.get("evaluation"))  # evaluate jobs; a training job's base and trained
    if evaluation:
        out["evaluation"] = evaluation
    checkpoint = raw.get("lastCheckpoint")
    if isinstance(checkpoint, str) and 0 < len(checkpoint) <= MAX_URI and checkpoint.isprintable():
        out["lastCheckpoint"] = checkpoint
    return out
