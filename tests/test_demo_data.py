"""The demos' data makers (examples/grpo/make_data.py, examples/docstrings/make_data.py): pure, no model, no Ray.

    .venv/bin/python -m pytest tests/test_demo_data.py
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_make_data():
    # examples/ is not a package; load the file the way demo.py does, by path.
    path = REPO / "examples" / "docstrings" / "make_data.py"
    spec = importlib.util.spec_from_file_location("docstrings_make_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


md = _load_make_data()

SOURCE = '''
import os

class Box:
    @property
    def size(self):
        """Return the number of items in the box.

        Longer explanation that is not part of the summary.
        """
        return len(self.items)

def only_doc():
    """Does nothing at all, and says so."""

def lower():
    """not a sentence"""
    return 1

def inline(): "Return one, on the same line as the def."; return 1
'''


@pytest.fixture(scope="module")
def examples():
    return md.collect()  # the whole standard library, parsed once for this module (a few seconds)


@pytest.fixture(scope="module")
def made(examples):
    train, held = md.split(examples, n_train=200, n_eval=40, seed=0)
    return [ex.record() for ex in train], [ex.record() for ex in held]


def test_records_are_chat_messages(made):
    train, held = made
    assert len(train) == 200 and len(held) == 40
    for record in train + held:
        msgs = record["messages"]
        assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)
        assert set(record) == {"messages", "module", "function"}


def test_held_out_split_shares_no_module_function_or_summary_with_train(made):
    train, held = made
    assert {r["module"] for r in train}.isdisjoint({r["module"] for r in held})
    key = lambda r: (r["module"], r["function"])  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in held})
    code = lambda r: r["messages"][1]["content"]  # noqa: E731
    assert {code(r) for r in train}.isdisjoint({code(r) for r in held})
    answer = lambda r: r["messages"][2]["content"]  # noqa: E731
    assert {answer(r) for r in train}.isdisjoint({answer(r) for r in held})


def test_the_docstring_is_not_in_the_prompt(made):
    train, held = made
    for record in train + held:
        prompt = record["messages"][1]["content"]
        assert record["messages"][2]["content"] not in prompt
        code = md.prompt_code(record)
        fn = ast.parse(code).body[0]  # the prompt's code is valid Python, one function
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(fn) is None
        assert len(code) <= md.MAX_CODE_CHARS


def test_functions_cuts_the_docstring_and_skips_unusable_ones():
    found = list(md.functions("pkg.box", SOURCE))
    assert [(ex.module, ex.name) for ex in found] == [("pkg.box", "Box.size")]
    ex = found[0]
    assert ex.summary == "Return the number of items in the box."
    assert ex.code == "@property\ndef size(self):\n    return len(self.items)"
    assert "Longer explanation" not in ex.code


def test_build_is_deterministic_and_seeded(examples, made):
    assert md.build(n_train=200, n_eval=40, seed=0) == made  # a second full pass gives the same records
    other_train, other_held = md.split(examples, n_train=200, n_eval=40, seed=1)
    assert [ex.record() for ex in other_train] != made[0]
    assert {ex.module for ex in other_train}.isdisjoint({ex.module for ex in other_held})


def test_summary_of_keeps_plain_first_paragraphs():
    assert md.summary_of("Return x.\n\n    Details.") is None  # shorter than MIN_SUMMARY_CHARS
    joined = md.summary_of("Return the  first\n    item of a sequence.\n\nMore.")
    assert joined == "Return the first item of a sequence."
    assert md.summary_of(">>> f(1) returns the value one.") is None
    assert md.summary_of("f(x) -> y, the mapped value of x.") is None
    assert md.summary_of("Return a value but no full stop") is None


# ---- examples/grpo/make_data.py: the GRPO demo's questions ----------------------------------------------

def _load_grpo_make_data(demo: str = "grpo"):
    """examples/<demo>/make_data.py as a module (examples/ is not a package)."""
    path = REPO / "examples" / demo / "make_data.py"
    spec = importlib.util.spec_from_file_location(f"{demo}_make_data", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


grpo = _load_grpo_make_data()


def _solve(text: str) -> int:
    """Answer a question independently of the generator: parse the sentence back."""
    m = re.fullmatch(r"(\w+) has (\d+) (\w+) and (\d+) (\w+)\. How many (\w+) does (\w+) have\?", text)
    assert m, text
    name, first, thing1, second, thing2, asked, name_again = m.groups()
    assert name == name_again and thing1 != thing2 and asked in (thing1, thing2)
    return int(first) if asked == thing1 else int(second)


def test_grpo_questions_have_correct_exact_answers():
    train, held = grpo.build(n_train=300, n_eval=50, seed=0)
    assert len(train) == 300 and len(held) == 50
    for record in train + held:
        assert set(record) == {"prompt", "answer"}
        assert [m["role"] for m in record["prompt"]] == ["system", "user"]
        assert record["prompt"][0]["content"] == grpo.SYSTEM
        assert isinstance(record["answer"], int) and grpo.LOW <= record["answer"] <= grpo.HIGH
        assert _solve(grpo.question(record)) == record["answer"]


def test_grpo_questions_are_distinct_and_ask_both_counts():
    train, held = grpo.build(n_train=300, n_eval=50, seed=0)
    texts = [grpo.question(r) for r in train + held]
    assert len(set(texts)) == len(texts)  # no question twice, so none is shared by train and eval
    first = sum(r["answer"] == int(grpo.question(r).split()[2]) for r in train)
    assert 0.35 < first / len(train) < 0.65  # "say the first number" is no shortcut


def test_grpo_build_is_deterministic_and_seeded(tmp_path):
    assert grpo.build(n_train=40, n_eval=8, seed=3) == grpo.build(n_train=40, n_eval=8, seed=3)
    assert grpo.build(n_train=40, n_eval=8, seed=3) != grpo.build(n_train=40, n_eval=8, seed=4)
    assert grpo.main(["--out", str(tmp_path), "--train", "40", "--eval", "8", "--seed", "3"]) == 0
    written = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert written == grpo.build(n_train=40, n_eval=8, seed=3)[0]
    assert len((tmp_path / "eval.jsonl").read_text().splitlines()) == 8


def test_grpo_the_reward_scores_the_answer_field():
    from posttrain.jobs.rewards.builtin import exact_answer

    record = grpo.build(n_train=1, n_eval=0, seed=0)[0][0]
    answer = record["answer"]
    completions = [str(answer), f"{grpo.question(record).split()[0]} has {answer}.", str(answer + 1)]
    assert exact_answer([], completions, answer=[answer] * 3) == [1.0, 1.0, 0.0]


def test_grpo_job_reads_what_make_data_writes():
    from posttrain.api.load import load_job

    path = REPO / "examples" / "grpo" / "job.yaml"
    job = load_job(str(path))  # validates, and grpo must be runnable in this version
    assert job.spec.algorithm.value == "grpo" and job.spec.roles.rollout.engine == "vllm"
    source = (path.parent / job.spec.data.train[0].source).resolve()
    assert source == grpo.DEFAULT_OUT / "train.jsonl"
    assert [r.function for r in job.spec.rewards] == ["posttrain.jobs.rewards.builtin:exact_answer"]
    # every training prompt is new: the run never sees a question twice
    assert job.spec.training.max_steps * job.spec.rl.prompts_per_step <= grpo.N_TRAIN


# ---- examples/preference/make_data.py: preference pairs over the GRPO demo's questions -----------------

pref = _load_grpo_make_data("preference")


def test_preference_pairs_choose_the_right_count_and_reject_a_wrong_one(tmp_path):
    train, held = pref.build(n_train=64, n_eval=16, seed=3)
    assert (train, held) == pref.build(n_train=64, n_eval=16, seed=3)  # same seed, same pairs
    questions, _ = grpo.build(n_train=64, n_eval=16, seed=3)
    assert [p["prompt"] for p in train] == [q["prompt"] for q in questions]
    others = 0
    for p in train + held:
        text = p["prompt"][-1]["content"]
        assert p["chosen"] == str(_solve(text)) and p["rejected"] != p["chosen"]
        others += p["rejected"] in re.findall(r"\d+", text)
    assert 0.3 < others / len(train + held) < 0.7  # about half reject with the sentence's other count
    assert pref.main(["--out", str(tmp_path), "--train", "8", "--eval", "2"]) == 0
    kto = [json.loads(line) for line in (tmp_path / "kto.jsonl").read_text().splitlines()]
    assert len(kto) == 16 and [r["label"] for r in kto[:2]] == [True, False]


@pytest.mark.parametrize("name", ["dpo-lora", "kto", "reward-model"])
def test_preference_examples_read_what_make_data_writes(name):
    from posttrain.api.load import load_job

    path = REPO / "examples" / f"{name}.yaml"
    job = load_job(str(path))
    source = (path.parent / job.spec.data.train[0].source).resolve()
    assert source.parent == pref.DEFAULT_OUT and source.name in ("pairs.jsonl", "kto.jsonl")
