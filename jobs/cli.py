"""The `posttrain` command line.

    posttrain validate [--cluster] job.yaml [more.yaml ...]
    posttrain run job.yaml [more.yaml ...] [--output DIR] [--set training.maxSteps=5] [--metrics-port 8080] [--overwrite]

Several jobs (files, or documents of one file) run in the order their `ptj://<job>` references
need (see `posttrain.jobs.pipeline`).

`validate` needs only the API package; `run` imports the training stack
lazily, so `validate` works in the operator image too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from posttrain.api import runtime
from posttrain.api.cluster import cluster_errors
from posttrain.api import refs
from posttrain.api.load import InvalidJob, SpecError, parse_job, read_documents


def _print_errors(exc: InvalidJob) -> None:
    print(f"{exc.source or 'job'}: invalid", file=sys.stderr)
    for err in exc.errors:
        print(f"  - {err}", file=sys.stderr)


def cmd_validate(args: argparse.Namespace) -> int:
    bad = 0
    valid: list[tuple[str, Any]] = []
    for name in args.files:
        try:
            docs = read_documents(name)
        except InvalidJob as exc:
            _print_errors(exc)
            bad += 1
            continue
        for i, doc in enumerate(docs):
            where = name if len(docs) == 1 else f"{name}[{i}]"
            try:
                job = parse_job(doc, source=where, require_available=True)
                if args.cluster and (errors := cluster_errors(job)):
                    raise InvalidJob(errors, where)
                valid.append((where, job))
            except InvalidJob as exc:
                _print_errors(exc)
                bad += 1
    # References between the jobs given, per namespace. On a cluster (--cluster) a job that is not among
    # them may already exist there; locally (posttrain run) every one must be given.
    namespaces: dict[str | None, dict[str, dict[str, Any]]] = {}
    problems: dict[tuple[str | None, str], list[SpecError]] = {}
    for where, job in valid:
        specs = namespaces.setdefault(job.metadata.namespace, {})
        if job.metadata.name in specs:
            problems.setdefault((job.metadata.namespace, job.metadata.name), []).append(SpecError(
                "metadata.name", f"{job.metadata.name!r} names several of the jobs given; names must be unique"))
        specs[job.metadata.name] = job.spec.wire()
    for namespace, specs in namespaces.items():
        for job_name, path, message in refs.set_errors(specs, others_exist=args.cluster):
            problems.setdefault((namespace, job_name), []).append(SpecError(path, message))
    for where, job in valid:
        if found := problems.get((job.metadata.namespace, job.metadata.name)):
            _print_errors(InvalidJob(found, where))
            bad += 1
        else:
            print(f"{where}: ok ({job.spec.algorithm.value}, {job.metadata.name})")
    return 1 if bad else 0


class Display:
    """Progress while a job runs: a tqdm bar on a terminal, one line per logged step otherwise."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None
        self.tty = sys.stderr.isatty()

    def __call__(self, state: Any, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind in ("start", "resume"):
            word = f"resuming from step {event['step']}" if kind == "resume" else "starting"
            print(f"[{self.name}] {word}", file=sys.stderr, flush=True)
        elif kind == "eval_before":
            self._say(f"eval loss before training: {event['eval_loss']:.4f}")
        elif kind == "eval_after":
            self._say(f"eval loss after training: {event['eval_loss']:.4f}")
        elif kind == "checkpoint":
            self._say(f"checkpoint saved at step {event['step']}: {event['path']}")
        elif kind == "log" and "loss" in event:
            total = state.total_steps or 0
            if self.tty:
                if self.bar is None:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, initial=max(0, state.step - 1), desc=self.name, unit="step")
                self.bar.n = state.step
                extra = {"reward": f"{state.reward:.3f}"} if state.reward is not None else {}
                self.bar.set_postfix(loss=f"{state.loss:.4f}", **extra, tok_s=f"{state.tokens_per_second or 0:.0f}")
            else:
                tps = f" {state.tokens_per_second:.0f} tok/s" if state.tokens_per_second else ""
                reward = f" reward {state.reward:.3f}" if state.reward is not None else ""
                print(f"[{self.name}] step {state.step}/{total}{reward} loss {state.loss:.4f}{tps}",
                      file=sys.stderr, flush=True)
        elif kind == "saved":
            self._say(f"wrote {event['kind']} to {event['path']}")

    def _say(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(f"[{self.name}] {text}", file=sys.stderr)
        else:
            print(f"[{self.name}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_table(summary: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
        return "-" if v is None else str(v)

    artifact = summary.get("artifact") or {}
    rows = [
        ("status", summary.get("status")),
        ("algorithm / adapter", f"{summary.get('algorithm')} / {summary.get('adapter')}"),
        ("steps", f"{summary.get('steps')}/{summary.get('total_steps')}"
                  + (f" (resumed from {summary['resumed_from_step']})" if summary.get("resumed_from_step") else "")),
        ("train examples", (summary.get("data") or {}).get("train_examples")),
        ("loss first -> last", f"{fmt(summary.get('first_loss'))} -> {fmt(summary.get('last_loss'))}"),
    ]
    if summary.get("algorithm") == "generate":
        rows += [
            ("task", summary.get("task")),
            *((k.replace("_", " "), summary.get(k)) for k in ("pairs_written", "ties_dropped", "unjudged_prompts",
                                                                "unparseable_verdicts") if k in summary),
            *((f"role {name}", ", ".join(f"{k}={v}" for k, v in info.items() if k in
                                        ("actors", "engine", "judge", "mode", "verdict")))
              for name, info in (summary.get("roles") or {}).items()),
        ]
    elif "roles" in summary:  # grpo / ppo
        roles = summary.get("roles") or {}
        rows += [
            ("reward first -> last steps", f"{fmt(summary.get('reward_first_steps_mean'))} -> "
                                           f"{fmt(summary.get('reward_last_steps_mean'))}"),
            *((f"role {name}", ", ".join(f"{k}={v}" for k, v in info.items() if k in
                                        ("actors", "engine", "strategy", "method", "rewards", "placement")))
              for name, info in roles.items()),
            ("seconds/step, sync", f"{fmt(summary.get('seconds_per_step'))}, {fmt(summary.get('sync_seconds_mean'))}"),
            ("rollout tokens/s", fmt(summary.get("tokens_per_second"))),
        ]
    else:
        rows += [
            ("eval loss before -> after",
             f"{fmt(summary.get('eval_loss_before'))} -> {fmt(summary.get('eval_loss_after'))}"),
            *((f"eval {label} before -> after",
               f"{fmt(summary.get(f'eval_{key}_before'))} -> {fmt(summary.get(f'eval_{key}_after'))}")
              for key, label in (("rewards_accuracy", "preference accuracy"), ("rewards_margin", "reward margin"))
              if f"eval_{key}_before" in summary),  # dpo, kto, orpo, simpo, reward
            ("tokens/s", fmt(summary.get("tokens_per_second"))),
        ]
    rows += [
        ("wall seconds", fmt(summary.get("wall_seconds"))),
        ("written", f"{artifact.get('kind')}: {artifact.get('path')}" if artifact else "-"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 40)
    return "\n".join([line, *(f"{k.ljust(width)}  {fmt(v) if not isinstance(v, str) else v}" for k, v in rows), line])


def cmd_run(args: argparse.Namespace) -> int:
    from posttrain.jobs import pipeline

    try:
        entries = pipeline.load(args.files, args.set)
    except InvalidJob as exc:
        _print_errors(exc)
        return runtime.EXIT_BAD_INPUT
    from posttrain.jobs import driver

    driver.setup_logging(args.verbose)
    return pipeline.run_all(entries, output=args.output, run_one=lambda job, **kw: _run_one(job, args, **kw),
                            say=lambda text: print(text, file=sys.stderr, flush=True))


def _run_one(job: Any, args: argparse.Namespace, *, output: str | None, base_dir: Path, reuse: bool) -> int:
    from posttrain.jobs import driver, pipeline
    from posttrain.jobs.data import DataError
    from posttrain.jobs.models import ModelSourceError
    from posttrain.jobs.run.context import output_location
    from posttrain.jobs.run.outputs import OutputInUse

    display = Display(job.metadata.name)
    opts = driver.RunOptions(
        output=output,
        base_dir=base_dir,
        metrics_port=args.metrics_port,
        overwrite=args.overwrite,
        on_event=display,
    )
    if reuse and not args.overwrite and pipeline.finished_with_same_spec(job, loc := output_location(job, opts)):
        print(f"[{job.metadata.name}] already finished in {loc.uri} with the same spec; using that output",
              file=sys.stderr, flush=True)
        return runtime.EXIT_OK
    try:
        summary = driver.run(job, opts)
    except (DataError, ModelSourceError, OutputInUse, ValueError) as exc:
        display.close()
        print(f"error: {exc}", file=sys.stderr)
        return runtime.EXIT_BAD_INPUT
    except driver.RunFailed as exc:
        display.close()
        print(f"error: the run failed: {exc}\n(checkpoints written so far are kept; running the same command again "
              "resumes from the newest one, or starts over if there is none)", file=sys.stderr)
        return runtime.EXIT_FAILED
    display.close()
    print(summary_table(summary))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    return runtime.EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="LLM post-training jobs, locally or on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check PostTrainingJob files; lists every error with its field")
    v.add_argument("files", nargs="+")
    v.add_argument("--cluster", action="store_true",
                   help="also check what a cluster needs: shared output and checkpoint storage, no relative paths")
    v.set_defaults(func=cmd_validate)
    r = sub.add_parser("run", help="run PostTrainingJobs on an embedded Ray (several: in the order their ptj:// "
                                   "references need)")
    r.add_argument("files", nargs="+", metavar="file")
    r.add_argument("--output", "-o", help="output folder (default: spec.output.uri, else posttrain-output/<name>); "
                                          "with several jobs each writes to <output>/<job-name>")
    r.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field of every job, e.g. --set training.maxSteps=5 (repeatable)")
    r.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics and JSON /progress on this port")
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    r.add_argument("--json", action="store_true", help="also print summary.json")
    r.add_argument("--verbose", "-v", action="store_true")
    r.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
