"""Docstring-writing data from the Python standard library's own source, made offline.

    python examples/docstrings/make_data.py                  # writes demo-output/data/{train,eval}.jsonl
    python examples/docstrings/make_data.py --train 480 --eval 64 --seed 1 --out /tmp/data

Every function and method of the standard library (`sysconfig.get_paths()["stdlib"]`)
that has a usable docstring becomes one chat record in the `messages` format:
the user turn shows the function's source with its docstring cut out, the
assistant turn is the docstring's summary paragraph on one line. The split is
by module (a seeded hash of the module name), so a held-out function never
shares a file with a training one. The same Python version gives the same
files. `examples/docstrings/job.yaml` reads the files this writes; `demo.py`
calls `build` directly.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import random
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "demo-output" / "data"

SYSTEM = "You are a Python expert. You write concise, accurate docstrings."
INSTRUCTION = "Write a one-line docstring summary for this Python function.\n\n```python\n{code}\n```"

# Folders under the stdlib path that are not library code to learn from: test suites
# (some files there are deliberately broken), lib2to3 (its fixers and Python 2 test
# data), bundled wheels, demos, and installed third-party packages. config-* is skipped too.
SKIP_DIRS = {"test", "tests", "idle_test", "lib2to3", "ensurepip", "turtledemo", "site-packages", "dist-packages",
             "__pycache__"}

# Size limits keep each chat (system + instruction + code + summary) under about
# 256 tokens of SmolLM2's tokenizer, so training on 2 CPU cores stays fast.
MAX_CODE_CHARS = 480
MAX_CODE_LINES = 18
MIN_SUMMARY_CHARS, MAX_SUMMARY_CHARS = 20, 140
# job.yaml trains 30 steps x 8 sequences, so each training example is seen once.
N_TRAIN, N_EVAL = 240, 32


@dataclass(frozen=True)
class Example:
    module: str  # dotted module name, e.g. "json.decoder"
    name: str  # qualified name inside the module, e.g. "JSONDecoder.decode"
    code: str  # the function's source, dedented, docstring removed
    summary: str  # the docstring's summary paragraph on one line

    def record(self) -> dict:
        """The chat record `posttrain` trains on; module and function ride along for display and tests."""
        return {
            "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": INSTRUCTION.format(code=self.code)},
                {"role": "assistant", "content": self.summary},
            ],
            "module": self.module,
            "function": self.name,
        }


def prompt_code(record: dict) -> str:
    """The function source shown in a record's user turn (the inverse of INSTRUCTION)."""
    return record["messages"][1]["content"].split("```python\n", 1)[1].rsplit("\n```", 1)[0]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, path) of every library source file under `root`, sorted so runs agree."""
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(p.isidentifier() for p in parts):
            found.append((".".join(parts), path))
    return sorted(found)


def summary_of(docstring: str) -> str | None:
    """The first paragraph of a docstring on one line, or None when it is no plain sentence.

    >>> summary_of('''Return the sum of two numbers.
    ...
    ...     More detail here.''')
    'Return the sum of two numbers.'
    >>> summary_of("x") is None
    True
    """
    first = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    text = re.sub(r"\s+", " ", first).strip()
    if not (MIN_SUMMARY_CHARS <= len(text) <= MAX_SUMMARY_CHARS):
        return None
    # Plain sentences only: no doctests, reST fields or signatures-as-summary ("f(x) -> y").
    if not text[0].isupper() or not text.endswith(".") or ">>>" in text or text.startswith(":") or "->" in text:
        return None
    return text


def _without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function's source (decorators included) with its docstring lines removed, dedented."""
    doc = node.body[0]
    if len(node.body) < 2 or all(isinstance(s, ast.Pass) for s in node.body[1:]):
        return None  # nothing but the docstring: no code to describe
    # The docstring must own its lines, or cutting them would cut code too.
    if lines[doc.lineno - 1][: doc.col_offset].strip() or lines[doc.end_lineno - 1][doc.end_col_offset :].strip():
        return None
    if node.body[1].lineno <= doc.end_lineno:
        return None
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    kept = lines[start - 1 : doc.lineno - 1] + lines[doc.end_lineno : node.end_lineno]
    code = textwrap.dedent("\n".join(kept)).strip("\n")
    try:
        ast.parse(code)
    except SyntaxError:  # e.g. a continuation line that textwrap could not dedent
        return None
    return code


def functions(module: str, source: str) -> Iterator[Example]:
    """Every documented function and method of one module's source that fits the limits."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()

    def walk(body: list[ast.stmt], prefix: str) -> Iterator[Example]:
        for node in body:
            if isinstance(node, ast.ClassDef):
                yield from walk(node.body, f"{prefix}{node.name}.")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node, clean=False)
                summary = summary_of(docstring) if docstring else None
                code = _without_docstring(lines, node) if summary else None
                if (summary and code and len(code) <= MAX_CODE_CHARS and code.count("\n") < MAX_CODE_LINES
                        and summary.lower() not in code.lower()):  # a comment that repeats it would leak the answer
                    yield Example(module, f"{prefix}{node.name}", code, summary)
                yield from walk(node.body, f"{prefix}{node.name}.<locals>.")

    yield from walk(tree.body, "")


def is_held_out(module: str, *, seed: int, eval_fraction: float) -> bool:
    """Whether a module goes to the eval split: a seeded hash, so the split never depends on file order."""
    digest = hashlib.sha256(f"{seed}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def collect(root: Path | None = None) -> list[Example]:
    """All usable examples under `root` (the running Python's stdlib by default), each code text once."""
    seen: set[str] = set()
    out = []
    for module, path in stdlib_files(root or stdlib_root()):
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for ex in functions(module, source):
            if ex.code not in seen:  # a function copied between modules is kept once, at its first module
                seen.add(ex.code)
                out.append(ex)
    return out


def split(examples: list[Example], *, n_train: int, n_eval: int, seed: int = 0,
          eval_fraction: float = 0.15) -> tuple[list[Example], list[Example]]:
    """(train, eval): held-out modules go to eval, then each side is sampled with `seed`."""
    train_pool = [ex for ex in examples if not is_held_out(ex.module, seed=seed, eval_fraction=eval_fraction)]
    eval_pool = [ex for ex in examples if is_held_out(ex.module, seed=seed, eval_fraction=eval_fraction)]
    # A held-out summary word-for-word in train ("Return self==value.") measures recall, not writing.
    train_summaries = {ex.summary for ex in train_pool}
    eval_pool = [ex for ex in eval_pool if ex.summary not in train_summaries]
    rng = random.Random(seed)
    train = rng.sample(train_pool, min(n_train, len(train_pool)))
    held = rng.sample(eval_pool, min(n_eval, len(eval_pool)))
    return train, held


def build(*, n_train: int = N_TRAIN, n_eval: int = N_EVAL, seed: int = 0, eval_fraction: float = 0.15,
          root: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Train and eval records (chat `messages` plus `module` and `function`)."""
    train, held = split(collect(root), n_train=n_train, n_eval=n_eval, seed=seed, eval_fraction=eval_fraction)
    return [ex.record() for ex in train], [ex.record() for ex in held]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for train.jsonl and eval.jsonl")
    parser.add_argument("--train", type=int, default=N_TRAIN, help="training examples")
    parser.add_argument("--eval", type=int, default=N_EVAL, help="held-out examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train, held = build(n_train=args.train, n_eval=args.eval, seed=args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "eval.jsonl", held)
    print(f"wrote {len(train)} train and {len(held)} eval records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
