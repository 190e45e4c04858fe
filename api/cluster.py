"""What a job needs to run on a cluster, where the head and every worker are separate pods.

`cluster_errors(job)` lists the spec errors of a job meant for a cluster (the operator refuses
such a job as Failed/InvalidSpec before creating anything; `posttrain validate --cluster` prints
them). `pvc_claims(spec)` says which PersistentVolumeClaims a job mounts and whether it writes
to them (the operator checks their access modes).

    >>> from posttrain.api.load import parse_job
    >>> job = parse_job({"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
    ...     "metadata": {"name": "x"}, "spec": {"algorithm": "sft", "model": {"source": "hf://org/m"},
    ...     "data": {"train": [{"source": "pvc://data/t.jsonl"}]}, "training": {"maxSteps": 1},
    ...     "output": {"uri": "pvc://models/x"}}})
    >>> cluster_errors(job), pvc_claims(job.spec)
    ([], {'data': 'read', 'models': 'write'})
"""

from __future__ import annotations

from posttrain.api.load import SpecError
from posttrain.api.runtime import OBJECT_SCHEMES, PVC_ROOT, SHARED_SCHEMES
from posttrain.api.spec import PostTrainingJob, PostTrainingJobSpec

_SHARED_HINT = ("use pvc://<claim>/<path> (a ReadWriteMany PersistentVolumeClaim) or object storage "
                f"({', '.join(OBJECT_SCHEMES)})")
_INPUT_HINT = ("use pvc://<claim>/<path>, object storage (s3://, gs://, ...), hf://org/name, or an absolute "
               "path baked into the runtime image")


def _inputs(spec: PostTrainingJobSpec) -> list[tuple[str, str]]:
    """(field path, URI) of everything the job reads."""
    out = [("spec.model.source", spec.model.source)]
    if spec.model.tokenizer:
        out.append(("spec.model.tokenizer", spec.model.tokenizer))
    out += [(f"spec.data.train[{i}].source", s.source) for i, s in enumerate(spec.data.train)]
    if spec.data.eval is not None:
        out.append(("spec.data.eval.source", spec.data.eval.source))
    out += [(f"spec.rewards[{i}].model", r.model) for i, r in enumerate(spec.rewards) if r.model]
    out += [(f"spec.rewards[{i}].judge.model", r.judge.model) for i, r in enumerate(spec.rewards) if r.judge]
    if spec.generate is not None and spec.generate.judge is not None:
        out.append(("spec.generate.judge.model", spec.generate.judge.model))
    if spec.teacher is not None:
        out.append(("spec.teacher.source", spec.teacher.source))
        if spec.teacher.tokenizer:
            out.append(("spec.teacher.tokenizer", spec.teacher.tokenizer))
    if spec.evaluation is not None:
        ev = spec.evaluation
        for i, m in enumerate(ev.models):
            out.append((f"spec.evaluation.models[{i}].source", m.source))
            if m.adapter:
                out.append((f"spec.evaluation.models[{i}].adapter", m.adapter))
        if ev.data:
            out.append(("spec.evaluation.data", ev.data))
    # A reward file on a claim, e.g. /mnt/pvc/datasets/reward.py:fn, needs that claim mounted.
    for i, reward in enumerate(spec.rewards):
        module = (reward.function or "").rpartition(":")[0]
        if module.startswith(PVC_ROOT + "/"):
            out.append((f"spec.rewards[{i}].function", "pvc://" + module[len(PVC_ROOT) + 1:]))
    return out


def _outputs(spec: PostTrainingJobSpec) -> list[tuple[str, str]]:
    out = [("spec.output.uri", spec.output.uri)] if spec.output.uri else []
    if spec.checkpoint.uri:
        out.append(("spec.checkpoint.uri", spec.checkpoint.uri))
    if spec.distill is not None and spec.distill.cache:
        out.append(("spec.distill.cache", spec.distill.cache))
    return out


def _is_relative(uri: str) -> bool:
    if uri.startswith("file://"):
        return not uri[len("file://"):].startswith("/")
    return "://" not in uri and not uri.startswith(("/", "~"))


def _relative_reward_file(function: str) -> str | None:
    """The file of a `path/to/rewards.py:fn` reward when that path is relative (a module name is fine)."""
    module = function.rpartition(":")[0]
    if module.endswith(".py") or "/" in module:
        return module if _is_relative(module) else None
    return None


def pvc_claims(spec: PostTrainingJobSpec) -> dict[str, str]:
    """Claim name -> "write" (the job writes output or checkpoints there) or "read" (inputs only), sorted."""
    usage: dict[str, str] = {}
    for writes, uris in ((False, _inputs(spec)), (True, _outputs(spec))):
        for _, uri in uris:
            if uri.startswith("pvc://"):
                claim = uri[len("pvc://"):].split("/", 1)[0]
                if claim:
                    usage[claim] = "write" if writes or usage.get(claim) == "write" else "read"
    return dict(sorted(usage.items()))


def cluster_errors(job: PostTrainingJob) -> list[SpecError]:
    """Errors of a valid job that would lose its results or not find its inputs on a cluster."""
    spec, errors = job.spec, []
    if not spec.output.uri:
        errors.append(SpecError("spec.output.uri", "required on a cluster: the head and the worker pods have "
                                "separate filesystems and a pod's own disk is gone when the run ends; "
                                + _SHARED_HINT))
    elif not spec.output.uri.startswith(SHARED_SCHEMES):
        errors.append(SpecError("spec.output.uri", f"{spec.output.uri!r} is not shared storage: on a cluster the "
                                "head and the worker pods have separate filesystems; " + _SHARED_HINT))
    uri = spec.checkpoint.uri
    if uri is not None and not uri.startswith(SHARED_SCHEMES):
        errors.append(SpecError("spec.checkpoint.uri", f"{uri!r} is not shared storage: every worker writes its "
                                "shard and a restarted run reads them back; " + _SHARED_HINT
                                + ", or leave it unset for <output>/checkpoints"))
    cache = spec.distill.cache if spec.distill is not None else None
    if cache is not None and not cache.startswith(SHARED_SCHEMES):
        errors.append(SpecError("spec.distill.cache", f"{cache!r} is not shared storage: a restarted run (a new Ray "
                                "cluster) reads the teacher's scores back from it; " + _SHARED_HINT
                                + ", or leave it unset for <output>/teacher-cache"))
    for path, uri in _inputs(spec):
        if _is_relative(uri):
            errors.append(SpecError(path, f"relative path {uri!r} would resolve under the read-only spec "
                                    "mount of the job's pods; " + _INPUT_HINT))
    for i, reward in enumerate(spec.rewards):
        if reward.function and (path := _relative_reward_file(reward.function)):
            errors.append(SpecError(f"spec.rewards[{i}].function", f"relative file {path!r} would resolve under "
                                    "the read-only spec mount of the job's pods; name an installed module "
                                    "(package.module:function) or an absolute path, e.g. on a mounted claim "
                                    "/mnt/pvc/<claim>/rewards.py:function"))
    return errors
