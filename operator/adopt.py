"""Whose spec ConfigMap is this, and what does an API error mean for the job: pure decisions.

`<job>-spec` holds the spec every run of a job executes. It is adopted only when it is this
job's own (its ownerReference names this job's uid) and its content is what was written: the
hash of the stored spec must match the ConfigMap's `posttrain.dev/spec-hash` annotation and the
job's `status.specHash`. A ConfigMap left by a deleted namesake job is waited out (garbage
collection removes it); one that belongs to something else, or whose content changed, is never
run.

    >>> configmap_verdict(None, uid="u1", recorded=None, job="tune").spec is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.api.spec import KIND
from posttrain.operator import builders, kube, observe, vocab


class Held(Exception):
    """Why a pass cannot go on: permanent (the job fails with `reason`) or not (a Blocked
    condition, and the pass is retried with backoff)."""

    def __init__(self, reason: str, message: str, *, permanent: bool = False) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message, self.permanent = reason, message, permanent


@dataclass
class Verdict:
    spec: dict[str, Any] | None = None  # the adopted spec (wire form)
    hash: str | None = None  # its content hash
    held: Held | None = None  # wait (a namesake's leftover) or refuse to adopt (someone else's)
    tampered: str | None = None  # this job's ConfigMap, with content nobody here wrote


def configmap_verdict(configmap: dict[str, Any] | None, *, uid: str, recorded: str | None, job: str) -> Verdict:
    if configmap is None:
        return Verdict()
    meta = configmap.get("metadata") or {}
    name = meta.get("name", vocab.configmap_name(job))
    owners = meta.get("ownerReferences") or []
    if not any(ref.get("uid") == uid for ref in owners):
        if any(ref.get("kind") == KIND and ref.get("name") == job for ref in owners):
            return Verdict(held=Held(vocab.REASON_STALE_CONFIGMAP,
                                     f"ConfigMap {name} belongs to a deleted PostTrainingJob of the same name; waiting "
                                     "for garbage collection to remove it before starting (its spec is never reused)"))
        return Verdict(held=Held(vocab.REASON_CONFIGMAP_CONFLICT,
                                 f"ConfigMap {name} exists and is not owned by this job; the job will not adopt it: "
                                 "delete it, or create the job under another name"))
    spec = kube.spec_from_configmap(configmap)
    annotated = (meta.get("annotations") or {}).get(vocab.ANNOTATION_SPEC_HASH)
    actual = builders.content_hash(spec) if spec is not None else None
    if actual is None or actual != annotated or (recorded and actual != recorded):
        return Verdict(tampered=f"ConfigMap {name} does not hold the spec this job wrote (content hash {actual}, "
                                f"written {recorded or annotated}); refusing to run it: delete the job and create it "
                                "again, and check who can edit ConfigMaps in this namespace")
    return Verdict(spec=spec, hash=actual)


def classify(exc: kube.KubeError) -> Held:
    """An API error as the job sees it: which are permanent, and a message that says what to do."""
    text = f"{exc.action}: {observe.summary(exc.message)}"
    if exc.status == 403:
        return Held(vocab.REASON_FORBIDDEN, f"{text}; the operator's RBAC does not allow this call: check the "
                                            "chart's rbac settings and operator.watchNamespaces")
    if exc.action.startswith("create rayjob"):
        if exc.status == 404:
            return Held(vocab.REASON_KUBERAY_MISSING, f"{text}; the API server does not serve ray.io/v1 RayJobs: "
                                                      "install KubeRay's operator (v1.7 or newer)")
        if exc.status in (400, 422):
            return Held(vocab.REASON_RAYJOB_REJECTED, f"{text}; KubeRay's schema refused the RayJob (is the "
                                                      "installed KubeRay older than v1.7?)", permanent=True)
    if exc.action.startswith("create configmap") and exc.status in (400, 422):
        return Held(vocab.REASON_SPEC_TOO_LARGE if "Too long" in exc.message else vocab.REASON_API_ERROR,
                    f"{text}; the spec ConfigMap was refused", permanent=True)
    return Held(vocab.REASON_API_ERROR, text)
