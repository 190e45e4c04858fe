"""The `posttrain` command line.

    posttrain validate [--cluster] job.yaml [more.yaml ...]
    posttrain run job.yaml [more.yaml ...] [--output DIR] [--set training.maxSteps=5] [--metrics-port 8080] [--overwrite]

Several jobs (files, or documents of one file) run in the order their `ptj://<job>` references
need (see `posttrain.jobs.pipeline`).
    posttrain eval --model SRC [--model NAME=SRC::ADAPTER]... --data FILE [--method NAME]... [--samples 1,4,16]

`validate` needs only the API package; `run` imports the training stack
lazily, so `validate` works in the operator image too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from posttrain.api import runtime
from posttrain.api.cluster import cluster_errors
from posttrain.api import refs
from posttrain.api.load import InvalidJob, SpecError, parse_job, read_documents


NAMED = re.compile(r"^([A-Za-z0-9_.-]+)=(.+)$")  # `posttrain eval --model base=path/to/model`


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
        elif kind == "evaluated" or (kind == "log" and "method" in event):
            where = f"step {event['step']}/{state.total_steps} " if kind == "log" else ""
            self._say(f"{where}{event['model']}: {event['method']} score {event['score']:.3f}")
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


# the counts a generate job's table shows, those of its task (preference_pairs, traces, instructions)
GENERATE_ROWS = ("pairs_written", "ties_dropped", "unjudged_prompts", "unparseable_verdicts",
                 "traces", "kept", "keep_rate", "wrong", "no_answer", "generated", "duplicate", "near_duplicate",
                 "similar_to_seed", "empty")


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
            *((k.replace("_", " "), summary.get(k)) for k in GENERATE_ROWS if k in summary),
            *((f"role {name}", ", ".join(f"{k}={v}" for k, v in info.items() if k in
                                        ("actors", "engine", "judge", "mode", "verdict")))
              for name, info in (summary.get("roles") or {}).items()),
        ]
    elif summary.get("algorithm") == "evaluate":
        rows += [(f"{model}: {key}", f"{score:.3f}") for model, scores in (summary.get("evaluation") or {}).items()
                 for key, score in scores.items()]
    elif "roles" in summary:  # grpo / ppo / distill on_policy
        roles = summary.get("roles") or {}
        figure = "teacher_kl" if "teacher_kl_first_steps_mean" in summary else "reward"
        rows += [
            (f"{figure.replace('_', ' ')} first -> last steps", f"{fmt(summary.get(f'{figure}_first_steps_mean'))} -> "
                                                                f"{fmt(summary.get(f'{figure}_last_steps_mean'))}"),
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
    rows += [(f"eval {key}: base -> trained", f"{fmt(before)} -> {fmt(after)}")
             for key, (before, after) in (summary.get("evaluation_before_after") or {}).items()]
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
    return execute(entries, args)


def eval_document(args: argparse.Namespace) -> dict[str, Any]:
    """The `algorithm: evaluate` job `posttrain eval` runs: records {prompt, answer} from --data, every
    --model (`SRC`, `SRC::ADAPTER_FOLDER`, optionally `NAME=` in front) compared side by side."""
    models = []
    for i, text in enumerate(args.model):
        named = NAMED.match(text)
        name, rest = (named[1], named[2]) if named else (None, text)
        source, _, adapter = rest.partition("::")
        models.append({"source": source, **({"adapter": adapter} if adapter else {}),
                       "name": name or f"model-{i}"})
    evaluation: dict[str, Any] = {"models": models, "methods": args.method or ["direct"],
                                  "maxNewTokens": args.max_new_tokens, "seed": args.seed,
                                  "answer": {"extract": args.extract}}
    if args.samples:
        try:
            evaluation["samples"] = [int(n) for n in args.samples.split(",")]
        except ValueError:
            evaluation["samples"] = args.samples  # the API names the field and what it expects
    for key, value in (("temperature", args.temperature), ("maxPrompts", args.max_prompts)):
        if value is not None:
            evaluation[key] = value
    spec: dict[str, Any] = {
        "algorithm": "evaluate", "model": {"source": models[0]["source"] if models else ""},
        "data": {"train": [{"source": args.data}]}, "evaluation": evaluation,
    }
    if args.reward:
        spec["rewards"] = [{"function": f} for f in args.reward]
    if args.engine:
        spec["roles"] = {"rollout": {"engine": args.engine}}
    return {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob", "metadata": {"name": args.name},
            "spec": spec}


def cmd_eval(args: argparse.Namespace) -> int:
    from posttrain.api.load import SpecError, apply_overrides
    from posttrain.jobs.pipeline import for_job

    try:
        overrides = for_job(args.set, args.name)
        if len(overrides) < len(args.set):
            raise InvalidJob([SpecError("--set", f"a JOB: prefix other than this job's name {args.name!r}")])
        job = parse_job(apply_overrides(eval_document(args), overrides), source="posttrain eval",
                        require_available=True)
    except InvalidJob as exc:
        _print_errors(exc)
        return runtime.EXIT_BAD_INPUT
    if args.output is None:
        args.output = f"posttrain-output/{args.name}"
    from posttrain.jobs import pipeline

    return execute([pipeline.Entry(job, "posttrain eval", Path.cwd())], args)


def execute(entries: list[Any], args: argparse.Namespace) -> int:
    """Run the jobs on an embedded Ray with the progress display, in dependency order; the exit code (0, 1
    failed, 2 bad input)."""
    from posttrain.jobs import driver, pipeline

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
        progress_linger=args.progress_linger,
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


def run_options(parser: argparse.ArgumentParser, *, example: str) -> None:
    """The options of every command that runs a job (run, eval)."""
    parser.add_argument("--set", action="append", default=[], metavar="[JOB:]PATH=VALUE",
                        help=f"override a spec field, e.g. --set {example} (repeatable; JOB: sets only the job "
                        "of that metadata.name)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics and JSON /progress on this port")
    parser.add_argument("--progress-linger", type=float, default=30.0, metavar="SECONDS",
                        help="with --metrics-port: at the end, wait up to this long for a poller of /progress (the "
                        "operator) to read the final phase and figures (default 30; only when one is polling)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in the output folder")
    parser.add_argument("--json", action="store_true", help="also print summary.json")
    parser.add_argument("--verbose", "-v", action="store_true")


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
    run_options(r, example="training.maxSteps=5")
    r.set_defaults(func=cmd_run)
    e = sub.add_parser("eval", help="evaluate models side by side with test-time scaling methods (algorithm evaluate)")
    e.add_argument("--model", action="append", required=True, metavar="[NAME=]SRC[::ADAPTER]",
                   help="a model (same forms as spec.model.source), optionally with a PEFT adapter folder (repeatable)")
    e.add_argument("--data", required=True, help="records {prompt, answer} (.jsonl, .json, .parquet, .csv, ...)")
    e.add_argument("--method", action="append", metavar="NAME",
                   help="direct (default), cot, self_consistency, best_of_n, refine (repeatable)")
    e.add_argument("--samples", help="N values of self_consistency / best_of_n, e.g. 1,2,4,8,16")
    e.add_argument("--extract", default="last_number",
                   help="answer extraction: last_number, answer_tag, full, or module:function (regex: --set)")
    e.add_argument("--reward", action="append", metavar="MODULE:FUNCTION", help="best_of_n's reward (repeatable)")
    e.add_argument("--max-new-tokens", type=int, default=256)
    e.add_argument("--temperature", type=float)
    e.add_argument("--max-prompts", type=int)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--engine", choices=["auto", "vllm", "transformers"])
    e.add_argument("--name", default="eval", help="the job's name (default eval)")
    e.add_argument("--output", "-o", help="output folder (default posttrain-output/<name>)")
    run_options(e, example="evaluation.refineRounds=3")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
