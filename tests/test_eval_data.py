"""The evaluation task set (examples/eval/make_tasks.py): offline, seeded, answers that check out.

    .venv/bin/python -m pytest tests/test_eval_data.py -q
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tasks = _load("make_tasks", REPO / "examples" / "eval" / "make_tasks.py")
grpo_data = sys.modules["make_data"]  # the GRPO demo's maker, which the eval maker imports


def solve(text: str) -> int:
    """Recompute an arithmetic record's answer from its words alone."""
    start = int(re.search(r"has (\d+) ", text)[1])
    bags, per = map(int, re.search(r"buys (\d+) bags of (\d+) ", text).groups())
    away = int(re.search(r"gives (\d+) away", text)[1])
    more = re.search(r"finds (\d+) more", text)
    return start + bags * per - away + (int(more[1]) if more else 0)


def test_counting_is_the_grpo_demos_held_out_set_and_arith_checks_out(tmp_path):
    counting, arith = tasks.build(n=32, seed=0)
    _, held = grpo_data.build(n_train=grpo_data.N_TRAIN, n_eval=grpo_data.N_EVAL, seed=0)
    assert [r["prompt"] for r in counting] == [r["prompt"] for r in held[:32]]
    assert len(arith) == 32 and len({r["prompt"][0]["content"] for r in arith}) == 32
    for r in arith:
        assert r["task"] == "arith" and r["answer"] == solve(r["prompt"][0]["content"]) and r["answer"] > 0
    assert any("finds" in r["prompt"][0]["content"] for r in arith)  # some have a third step
    files = tasks.write(tmp_path, n=8, seed=0)
    lines = [json.loads(x) for x in files["tasks"].read_text().splitlines()]
    assert [r["task"] for r in lines] == ["counting"] * 8 + ["arith"] * 8
    assert tasks.build(n=8, seed=0) == tasks.build(n=8, seed=0) != tasks.build(n=8, seed=1)


def test_the_docstring_task_is_the_sft_demos_held_out_split_with_text_answers(tmp_path):
    records = tasks.docstrings(n=6, seed=0)
    maker = sys.modules["docstring_data"]
    _, held = maker.build(n_train=maker.N_TRAIN, n_eval=maker.N_EVAL, seed=0)
    assert [r["prompt"] for r in records] == [h["messages"][:2] for h in held[:6]]
    assert [r["answer"] for r in records] == [h["messages"][2]["content"] for h in held[:6]]
    assert all(r["task"] == "docstring" and r["prompt"][-1]["role"] == "user" and r["answer"] for r in records)
    files = tasks.write(tmp_path, n=4, seed=0)
    assert [json.loads(x)["answer"] for x in files["docstrings"].read_text().splitlines()] == \
        [r["answer"] for r in records[:4]]
