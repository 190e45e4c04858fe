"""Several jobs in one `posttrain run`: read, check their `ptj://` references, order and run them.

    posttrain run sft.yaml reward.yaml ppo.yaml --output out/     # or one file with several documents

Every document of every file is one job. Before anything runs: every document must be valid, names
must be unique, every `ptj://<job>` must name a job of this invocation, and no jobs may need each
other in a cycle (`posttrain.api.refs.set_errors`). Then the jobs run one after another in dependency
order; each reference is resolved to the output folder of the job it names (`refs.target`: its
`model/` or `adapter/`, or `data/train.jsonl`). With `--output DIR` and several jobs, job `x` writes to
`DIR/x`; with one job, to `DIR` itself (as before). A job whose output already holds a finished run
of the same resolved spec is not run again, so running the same command after a failure picks up
where it stopped. When a job fails, the jobs that need it (directly or not) are not run; the others
still are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from posttrain.api import refs, runtime
from posttrain.api.load import InvalidJob, SpecError, apply_overrides, parse_job, read_documents
from posttrain.api.spec import PostTrainingJob


@dataclass
class Entry:
    job: PostTrainingJob
    where: str  # file, or file[i] for a document of a multi-document file
    base_dir: Path  # relative paths in the spec are relative to its file's folder


def load(files: list[str], overrides: list[str]) -> list[Entry]:
    """Every job of `files` (with `--set` applied to each), checked as a set; InvalidJob lists what is wrong."""
    entries: list[Entry] = []
    problems: list[SpecError] = []
    named = {path.partition(":")[0].strip() for path, _, _ in (o.partition("=") for o in overrides) if ":" in path}
    for name in files:
        docs = read_documents(name)
        for i, doc in enumerate(docs):
            where = name if len(docs) == 1 else f"{name}[{i}]"
            job_name = str((doc.get("metadata") or {}).get("name", ""))
            named.discard(job_name)
            try:
                job = parse_job(apply_overrides(doc, for_job(overrides, job_name)), source=where,
                                require_available=True)
            except InvalidJob as exc:
                problems += [SpecError(f"{where}: {e.path}" if e.path else where, e.message) for e in exc.errors]
                continue
            entries.append(Entry(job, where, Path(name).resolve().parent))
    problems += [SpecError("--set", f"{job}: names no job of {', '.join(files)}; prefix a path with a job's "
                                    "metadata.name (--set sft:training.maxSteps=5), or give none to set every job")
                 for job in sorted(named)]
    seen: dict[str, str] = {}
    for e in entries:
        if (other := seen.setdefault(e.job.metadata.name, e.where)) != e.where:
            problems.append(SpecError(f"{e.where}: metadata.name", f"{e.job.metadata.name!r} is also the name of "
                                                                  f"the job in {other}; names must be unique"))
    if not problems:
        where = {e.job.metadata.name: e.where for e in entries}
        specs = {e.job.metadata.name: e.job.spec.wire() for e in entries}
        problems += [SpecError(f"{where[job]}: {path}", message) for job, path, message in refs.set_errors(specs)]
    if problems:
        raise InvalidJob(problems, ", ".join(files))
    return entries


def run_all(entries: list[Entry], *, output: str | None, run_one: Callable[..., int],
            say: Callable[[str], None]) -> int:
    """Run the jobs in dependency order; `run_one(job, output=..., base_dir=..., reuse=...)` runs one job and
    returns its exit code. Returns 0 when every job succeeded, else the code of the first that did not."""
    from posttrain.jobs.run.context import RunOptions, output_location

    by_name = {e.job.metadata.name: e for e in entries}
    edges = refs.graph({n: e.job.spec.wire() for n, e in by_name.items()})
    several = len(entries) > 1
    outputs: dict[str, str] = {}
    codes: dict[str, int] = {}
    for name in refs.order(list(by_name), edges):
        entry = by_name[name]
        failed = sorted(d for d in edges[name] if codes.get(d) != runtime.EXIT_OK)
        if failed:
            say(f"[{name}] not run: it needs the output of {', '.join(failed)}, which did not succeed")
            codes[name] = -1
            continue
        job = _resolved(entry.job, outputs, by_name)
        out = str(Path(output) / name) if (output and several) else output
        loc = output_location(job, RunOptions(output=out, base_dir=entry.base_dir))
        outputs[name] = str(loc.local.resolve()) if loc.local is not None else loc.uri
        codes[name] = run_one(job, output=out, base_dir=entry.base_dir, reuse=several)
    if several:
        words = {runtime.EXIT_OK: "succeeded", runtime.EXIT_FAILED: "failed", runtime.EXIT_BAD_INPUT: "bad input",
                 -1: "not run"}
        say("jobs: " + ", ".join(f"{n} {words.get(c, f'exit {c}')}" for n, c in codes.items()))
    return next((c if c >= 0 else runtime.EXIT_FAILED for c in codes.values() if c != runtime.EXIT_OK),
                runtime.EXIT_OK)


def _resolved(job: PostTrainingJob, outputs: dict[str, str], by_name: dict[str, Entry]) -> PostTrainingJob:
    """`job` with each `ptj://` replaced by the folder it names in its (finished) job's output."""
    spec = job.spec.wire()
    found = refs.references(spec)
    if not found:
        return job
    targets = {r.path: refs.target(r, output=outputs[r.job], dependency=by_name[r.job].job.spec.wire())
               for r in found}
    doc: dict[str, Any] = job.model_dump(by_alias=True, exclude_none=True, mode="json")
    doc["spec"] = refs.resolve(spec, targets)
    return parse_job(doc)


def finished_with_same_spec(job: PostTrainingJob, loc: Any) -> bool:
    """The output at `loc` holds a finished run of exactly this (resolved) spec: nothing to do again."""
    import json

    from posttrain.jobs.run import outputs, storage

    folder = outputs.RunFolder(loc)
    try:
        if folder.inspect() != "finished":
            return False
    except outputs.OutputInUse:
        return False
    try:
        info = json.loads(storage.read_text(loc.child(outputs.RUN_FILE)) or "{}")
    except json.JSONDecodeError:
        return False
    return info.get("spec") == job.spec.wire()


def for_job(overrides: list[str], job: str) -> list[str]:
    """The `--set` items that apply to the job named `job`: `path=value` applies to every job, `JOB:path=value`
    only to the job whose metadata.name is JOB (a pipeline's teacher and student want different model.source).

    >>> for_job(["training.maxSteps=5", "student:model.source=s3://b/m", "teacher:model.source=x"], "student")
    ['training.maxSteps=5', 'model.source=s3://b/m']
    """
    out = []
    for item in overrides:
        path, eq, value = item.partition("=")
        if ":" not in path:
            out.append(item)
        elif path.partition(":")[0].strip() == job:
            out.append(path.partition(":")[2].strip() + eq + value)
    return out

