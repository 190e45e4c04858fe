"""Rewards: the built-ins, loading by name, combining, a reward model and an HTTP verifier.

Unit tier: no Ray, no network beyond 127.0.0.1, a tiny random model made on the fly.
Run: `.venv/bin/python -m pytest tests/test_rewards.py -q`.
"""

from __future__ import annotations

import doctest
import json
import math
import socket
import threading
import time
from contextlib import contextmanager
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tiny
from posttrain.jobs.rewards import (
    HttpVerifier,
    Reward,
    RewardError,
    RewardFunction,
    RewardModel,
    build_rewards,
    combine,
    load_reward,
)
from posttrain.jobs.rewards import builtin, scorers
from posttrain.jobs.rewards.builtin import docstring, exact_answer, length_penalty, step_count
from posttrain.jobs.rewards.builtin import format as format_reward

B = "posttrain.jobs.rewards.builtin"


def test_doctests_pass():
    result = doctest.testmod(builtin, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 10 and result.failed == 0
    result = doctest.testmod(scorers)
    assert result.attempted >= 2 and result.failed == 0


# --- exact_answer -------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, gold, expected", [
    ("<think>6*7</think><answer>42</answer>", 42, 1.0),
    ("The answer is 42.", "42", 1.0),
    ("<answer>-3.5</answer>", -3.5, 1.0),
    ("<answer>-3.5</answer>", 3.5, 0.0),
    ("so x = \u22127", -7, 1.0),                       # unicode minus sign
    ("\u0664\u0662", 42, 1.0),                         # Arabic-Indic digits
    ("\uff14\uff12 \u00e9l\u00e8ves", "42", 1.0),     # full-width digits, accented words
    ("total: 1,234 dollars", "#### 1234", 1.0),        # thousands comma; GSM8K-style gold
    ("12,3456", 3456, 1.0),                            # not a thousands comma
    ("<answer>1.5e3</answer>", 1500, 1.0),
    ("<answer>0.5</answer>", "1/2", 1.0),
    ("<answer>2.50</answer>", 2.5, 1.0),
    ("1000001", 1000000, 0.0),                         # tolerance is not relative to big numbers
    ("no number here", 3, 0.0),
    ("", 0, 0.0),
    ("<answer>7", 7, 1.0),                             # unclosed tag: fall back to the last number
    ("<answer>seven</answer> 7", 7, 0.0),              # a tag without a number is a wrong answer
    ("<answer>1</answer> then <answer>2</answer>", 2, 1.0),  # the last answer block counts
    ("10-3", 3, 1.0),                                  # a minus glued to a number is subtraction
    ("area is 5 m\u00b2", 5, 1.0),                    # superscripts are not numbers
])
def test_exact_answer(completion, gold, expected):
    assert exact_answer(["q"], [completion], answer=[gold]) == [expected]


@pytest.mark.parametrize("gold", [None, "n/a", float("nan"), True])
def test_exact_answer_without_a_gold_number_is_not_applicable(gold):
    assert exact_answer(["q"], ["42"], answer=[gold]) == [None]


def test_exact_answer_needs_one_answer_per_completion():
    with pytest.raises(ValueError):
        exact_answer(["q", "q"], ["1", "2"], answer=[1])


# --- format -------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("<think>a</think><answer>b</answer>", 1.0),
    ("  \n<think>\nstep\n</think>\n\n<answer> 5 </answer>\n ", 1.0),
    ("<think></think><answer>5</answer>", 1.0),        # an empty think block is allowed
    ("<think>\u00e9t\u00e9 \u2192 \u590f</think><answer>\u590f</answer>", 1.0),
    ("<answer>5</answer>", 0.0),
    ("<think>a</think>", 0.0),
    ("<think>a</think><answer></answer>", 0.0),
    ("<think>a<answer>5</answer></think><answer>5</answer>", 0.0),  # nested
    ("<think>a</think><answer>5</answer><answer>6</answer>", 0.0),  # repeated
    ("<think>a</think><answer>5", 0.0),                             # unclosed
    ("<THINK>a</THINK><ANSWER>5</ANSWER>", 0.0),
    ("Sure! <think>a</think><answer>5</answer>", 0.0),
    ("<answer>5</answer><think>a</think>", 0.0),
])
def test_format(completion, expected):
    assert format_reward(["q"], [completion]) == [expected]


# --- length_penalty -----------------------------------------------------------------------------

def test_length_penalty_is_zero_then_linear_then_capped():
    completions = ["x" * n for n in (0, 100, 101, 150, 200, 10_000)]
    assert length_penalty(["q"] * 6, completions, target=100, buffer=100) == [0.0, 0.0, -0.01, -0.5, -1.0, -1.0]


def test_length_penalty_units():
    bound = partial(length_penalty, target=1, buffer=2, length=lambda s: len(s.encode()))
    assert bound(["q"], ["\u00e9"]) == [-0.5]        # 2 bytes, 1 char
    assert length_penalty(["q"], ["\u00e9"], target=1, buffer=2) == [0.0]
    assert length_penalty(["q"], ["a b  c"], target=1, buffer=4, length="words") == [-0.5]


@pytest.mark.parametrize("kwargs", [{"buffer": 0}, {"target": -1}, {"length": "tokens"}])
def test_length_penalty_rejects_bad_parameters(kwargs):
    with pytest.raises(ValueError, match="length_penalty"):
        length_penalty(["q"], ["a"], **kwargs)


# --- docstring ----------------------------------------------------------------------------------

FUNC = "Write a docstring for this function.\n\n```python\ndef area(width, height):\n    return width * height\n```\n"


@pytest.mark.parametrize("completion, expected", [
    ("Compute an area.\n\nMultiplies width by height.", 1.0),
    ('"""Compute an area.\n\nArgs:\n    width: w.\n    height: h.\n"""', 1.0),
    ("```python\ndef area(width, height):\n    '''Area of a width by height box.'''\n    return 1\n```", 1.0),
    ("def area(width, height):\n    return width * height", 0.0),   # a function without a docstring
    ("Compute an area from its width.", 0.75),
    ("Compute\nan area from width and height.", 0.5),                 # no one-line summary
    ("A" * 101, 0.0),                                                 # too long for a summary; no params named
    ("   ", 0.0),
    ("", 0.0),
    ("Fl\u00e4che aus width \u00d7 height.", 1.0),
    ("widths and heights", 0.5),                                      # whole words only
])
def test_docstring_scores(completion, expected):
    assert docstring([FUNC], [completion]) == [pytest.approx(expected)]


def test_docstring_reads_multiline_signatures_and_every_kind_of_parameter():
    prompt = ("Document the method below.\n    async def fetch(self, url: str,\n            *urls,\n"
              "            timeout: float = 1.0, **options) -> bytes:\n        ...\nThanks!")
    assert builtin._function_params(prompt) == ["url", "urls", "timeout", "options"]
    doc = "Fetch pages.\n\nurl and urls are fetched with timeout and options."
    assert docstring([prompt], [doc]) == [1.0]
    assert docstring(["def f():\n    pass"], ["Do nothing."]) == [1.0]   # no parameters: the summary decides


@pytest.mark.parametrize("prompt", ["Write a poem.", "definitely not code", "def broken(:\n"])
def test_docstring_without_a_function_is_not_applicable(prompt):
    assert docstring([prompt], ["A docstring."]) == [None]


def test_step_count():
    assert step_count(["q"] * 2, ["<think>\n1\n2\n</think>", "<think>\n</think>"], target=4) == [0.5, 0.0]
    with pytest.raises(ValueError):
        step_count(["q"], ["x"], target=0)


# --- loading by name ----------------------------------------------------------------------------

def test_load_builtin_and_user_file(tmp_path):
    assert load_reward(f"{B}:exact_answer") is exact_answer
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(prompts, completions, **_):\n    return [float(c.isupper()) for c in completions]\n")
    assert load_reward(f"{path}:shout")(["q", "q"], ["YES", "no"]) == [1.0, 0.0]


@pytest.mark.parametrize("spec, message", [
    ("exact_answer", f"a built-in is named {B}:exact_answer"),
    ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
    ("posttrain.jobs.no_such:fn", "no module named 'posttrain.jobs.no_such'"),
    (f"{B}:exact_answr", "has no attribute 'exact_answr'; it has: "),
    (f"{B}:SUMMARY_MAX", "is a int, not a callable"),
    ("/nowhere/rewards.py:fn", "does not exist"),
    (":fn", "expected 'module:function'"),
])
def test_load_errors_name_the_spec(spec, message):
    with pytest.raises(RewardError, match="reward") as info:
        load_reward(spec)
    assert f"reward {spec!r}: " in str(info.value) and message in str(info.value)
    assert info.value.function == spec


def test_load_reports_a_failing_import_inside_the_module(tmp_path, monkeypatch):
    (tmp_path / "needs_dep.py").write_text("import not_installed_dep_xyz\n")
    (tmp_path / "crashes.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RewardError, match="importing 'needs_dep' failed: No module named 'not_installed_dep_xyz'"):
        load_reward("needs_dep:fn")
    with pytest.raises(RewardError, match="importing 'crashes' raised RuntimeError: boom"):
        load_reward("crashes:fn")
    with pytest.raises(RewardError, match="running .*crashes.py raised RuntimeError: boom"):
        load_reward(f"{tmp_path / 'crashes.py'}:fn")


def test_reward_function_specs():
    r = RewardFunction(f"{B}:length_penalty", weight=0.5, kwargs={"target": 1, "buffer": 1}).build()
    assert (r.label, r.weight, r.fn(["q"], ["abc"])) == ("length_penalty", 0.5, [-1.0])
    with pytest.raises(RewardError, match=r"kwargs \['targt'\] are not parameters of it; its parameters are "
                                          r"\['target', 'buffer', 'length'\]"):
        RewardFunction(f"{B}:length_penalty", kwargs={"targt": 1}).build()
    with pytest.raises(RewardError, match="weight must be a finite number"):
        RewardFunction(f"{B}:format", weight=float("nan"))
    verifier = RewardFunction("posttrain.jobs.rewards.scorers:HttpVerifier", kwargs={"url": "http://x:1/"}).build()
    assert isinstance(verifier.fn, HttpVerifier) and verifier.label == "HttpVerifier"
    with pytest.raises(RewardError, match="constructing it with kwargs .* raised RewardError: .*must start with http"):
        RewardFunction("posttrain.jobs.rewards.scorers:HttpVerifier", kwargs={"url": "ftp://x"}).build()
    with pytest.raises(RewardError, match="label 'format' is already used"):
        build_rewards([RewardFunction(f"{B}:format"), RewardFunction(f"{B}:format", weight=2)])
    both = build_rewards([RewardFunction(f"{B}:format"), RewardFunction(f"{B}:format", label="format2")])
    assert [r.label for r in both] == ["format", "format2"]


# --- combine ------------------------------------------------------------------------------------

def const(values):
    return lambda prompts, completions, **_: list(values)


def test_combine_weights_none_and_means():
    rewards = [Reward("a", const([1.0, None, 0.0, None]), 2.0),
               Reward("b", const([0.5, 1.0, None, None]), -1.0),
               Reward("c", const([1, 1, 1, None]), 0.0)]    # weight 0: logged, not trained on
    out = combine(rewards, ["p"] * 4, ["c"] * 4)
    assert out.rewards == [1.5, -1.0, 0.0, 0.0]
    assert out.unscored == 1
    assert out.means == {"a": 0.5, "b": 0.75, "c": 1.0}
    assert out.skipped == {"a": 0, "b": 0, "c": 0}
    assert out.per_function["c"] == [1.0, 1.0, 1.0, None]


def test_combine_process_rewards_sum_per_step_and_outcomes_land_on_the_last_step():
    rewards = [Reward("steps", const([[1.0, -1.0, 0.5], None, [2.0]]), 2.0),
               Reward("outcome", const([1.0, 0.5, None]), 1.0)]
    out = combine(rewards, ["p"] * 3, ["c"] * 3, process=True)
    assert out.steps == [[2.0, -2.0, 2.0], [0.5], [4.0]]
    assert out.rewards == [2.0, 0.5, 4.0]
    assert out.means == {"steps": pytest.approx(2.5 / 4), "outcome": 0.75}
    with pytest.raises(RewardError, match=r"returned \[1.0, -1.0, 0.5\] at index 0.*grpo_process"):
        combine(rewards, ["p"] * 3, ["c"] * 3)  # lists outside process mode
    disagree = rewards + [Reward("other", const([[1.0], None, None]))]
    with pytest.raises(RewardError, match=r"reward 'other': returned 1 step scores for sample 0, but 'steps' returned 3"):
        combine(disagree, ["p"] * 3, ["c"] * 3, process=True)


def test_equation_steps_scores_each_line():
    assert builtin.equation_steps(["q"] * 2, ["3 x 4 = 12\n12 - 2 = 9\nthe end", ""], wrong=-0.5) == [
        [1.0, -0.5, 0.0], None]
    assert builtin.reasoning_steps("a\n \nb\n") == ["a", "b"]


def test_combine_passes_fields_to_every_reward():
    rewards = build_rewards([RewardFunction(f"{B}:exact_answer"), RewardFunction(f"{B}:format", weight=0.5)])
    completions = ["<think>t</think><answer>4</answer>", "5"]
    out = combine(rewards, ["2+2", "2+3"], completions, fields={"answer": [4, "5"], "id": [1, 2]})
    assert out.rewards == [1.5, 1.0] and out.means == {"exact_answer": 1.0, "format": 0.5}
    with pytest.raises(RewardError, match="reward 'exact_answer': raised TypeError: .*keyword-only argument: 'answer'"):
        combine(rewards, ["2+2"], ["4"])   # the data set has no `answer` column


def _raises(prompts, completions, **_):
    raise KeyError("answer")


BAD = {
    "raises": (_raises, "raised KeyError: 'answer'", [None, None, None], 3),
    "nan": (const([1.0, float("nan"), 0.0]), "returned nan at index 1", [1.0, None, 0.0], 1),
    "inf": (const([float("-inf"), 1.0, 0.0]), "returned -inf at index 0", [None, 1.0, 0.0], 1),
    "string": (const(["1", 1.0, 0.0]), "returned '1' at index 0", [None, 1.0, 0.0], 1),
    "short": (const([1.0, 1.0]), "returned 2 values for 3 samples", [None, None, None], 3),
    "none": (lambda p, c, **_: None, "returned a NoneType", [None, None, None], 3),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_reward_raises_naming_it(case):
    fn, message, _, _ = BAD[case]
    rewards = [Reward("good", const([1.0, 1.0, 1.0])), Reward(f"bad_{case}", fn)]
    with pytest.raises(RewardError, match=f"reward 'bad_{case}': ") as info:
        combine(rewards, ["p"] * 3, ["c"] * 3)
    assert message in str(info.value) and info.value.function == f"bad_{case}"


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_reward_is_skipped_and_counted(case, caplog):
    fn, _, values, count = BAD[case]
    rewards = [Reward("good", const([1.0, 1.0, None])), Reward(f"bad_{case}", fn, 2.0)]
    out = combine(rewards, ["p"] * 3, ["c"] * 3, on_error="skip")
    assert out.per_function[f"bad_{case}"] == values
    assert out.skipped == {"good": 0, f"bad_{case}": count}
    assert out.rewards == [1.0 + 2 * (v or 0.0) for v in values[:2]] + [2 * (values[2] or 0.0)]
    assert out.unscored == (values[2] is None)
    assert f"bad_{case}" in caplog.text


def test_combine_checks_its_inputs():
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        combine([], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="field 'answer' has 1 values for 2 samples"):
        combine([], ["a", "b"], ["c", "d"], fields={"answer": [1]})
    with pytest.raises(ValueError, match="on_error"):
        combine([], [], [], on_error="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="labels must be unique"):
        combine([Reward("x", const([])), Reward("x", const([]))], [], [])
    assert combine([], ["a"], ["b"]).rewards == [0.0]


def test_combine_accepts_numpy_and_tensor_results():
    import numpy as np
    import torch

    rewards = [Reward("np", lambda p, c, **_: np.array([0.5, 1.0], dtype=np.float32)),
               Reward("pt", lambda p, c, **_: torch.tensor([1.0, 2.0]))]
    assert combine(rewards, ["p"] * 2, ["c"] * 2).rewards == [1.5, 3.0]


# --- reward model -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rm_folders(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("rm")
    tok = tiny.make_tokenizer(root / "tokenizer")  # trained once (about a second), saved with each model
    made = {}
    for name, labels in (("one", 1), ("two", 2)):
        folder = root / name
        tok.save_pretrained(folder)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          num_labels=labels, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                          bos_token_id=None)
        if labels == 2:
            cfg.id2label, cfg.label2id = {0: "bad", 1: "good"}, {"bad": 0, "good": 1}
        torch.manual_seed(0)
        LlamaForSequenceClassification(cfg).save_pretrained(folder)
        made[name] = folder
    return made


PROMPTS = ["add 2 + 3 =", "the answer is", "sum 10 + 20 =", "think"]
COMPLETIONS = [" 5", " 42 so the value is 42 then first step", " 30", ""]


def test_reward_model_scores_one_float_per_sample_deterministically(rm_folders):
    rm = RewardModel(rm_folders["one"], batch_size=3)
    scores = rm(PROMPTS, COMPLETIONS)
    assert len(scores) == 4 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert len(set(scores)) == 4
    assert rm(PROMPTS, COMPLETIONS) == scores
    single = RewardModel(rm_folders["one"], batch_size=1)(PROMPTS, COMPLETIONS)
    assert single == pytest.approx(scores, abs=1e-5)           # padding does not change a score
    assert rm(PROMPTS[::-1], COMPLETIONS[::-1]) == pytest.approx(scores[::-1], abs=1e-5)
    assert rm([], []) == []


def test_reward_model_labels_and_spec(rm_folders):
    logits = [RewardModel(rm_folders["two"], label=i)(PROMPTS, COMPLETIONS) for i in (0, 1)]
    assert RewardModel(rm_folders["two"], label="good")(PROMPTS, COMPLETIONS) == logits[1] != logits[0]
    with pytest.raises(RewardError, match=r"has 2 labels \['bad', 'good'\]; choose one with label="):
        RewardModel(rm_folders["two"])
    with pytest.raises(RewardError, match="label 'nice' is not one of"):
        RewardModel(rm_folders["two"], label="nice")
    with pytest.raises(RewardError, match="is not a folder"):
        RewardModel(rm_folders["one"] / "missing")
    spec = RewardFunction("posttrain.jobs.rewards.scorers:RewardModel", weight=0.1,
                          kwargs={"path": str(rm_folders["one"]), "chat": True}, label="rm")
    out = combine(build_rewards([spec]), PROMPTS, COMPLETIONS)
    assert len(out.rewards) == 4 and out.skipped == {"rm": 0}


def _trl_scores(folder, records, tmp_path) -> list[float]:
    """The model's score of each chosen answer tokenized as TRL's RewardTrainer tokenizes it for training
    (its own dataset preparation, run on `records`)."""
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(folder)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), max_length=None, dataset_num_proc=None, report_to=[],
                        use_cpu=True, bf16=False)
    ids = RewardTrainer._prepare_dataset(None, datasets.Dataset.from_list(records), tok, args, "train")["chosen_ids"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([x])).logits[0, 0].item() for x in ids]


def _trained_on(folder, tmp_path, name, record):
    """A copy of the reward model with the `posttrain.json` a reward job trained on `record`'s kind writes."""
    import shutil

    copy = shutil.copytree(folder, tmp_path / name)
    (copy / "posttrain.json").write_text(json.dumps({"kind": "merged-model", "base_model": "x",
                                                     scorers.REWARD_INPUT: scorers.reward_input(record)}))
    return copy


def test_reward_model_scores_text_pairs_as_the_reward_trainer_tokenized_them(rm_folders, tmp_path):
    records = [{"prompt": p, "chosen": c, "rejected": c + " no"} for p, c in zip(PROMPTS, COMPLETIONS)]
    folder = _trained_on(rm_folders["one"], tmp_path, "text", records[0])
    scores = RewardModel(folder, batch_size=3)(PROMPTS, COMPLETIONS)
    assert scores == pytest.approx(_trl_scores(folder, records, tmp_path), abs=1e-5)  # EOS appended, as in training
    # a model without posttrain's record scores the text as is (its training is unknown)
    assert RewardModel(rm_folders["one"])(PROMPTS, COMPLETIONS) != pytest.approx(scores, abs=1e-5)


def test_reward_model_scores_chat_pairs_as_the_reward_trainer_tokenized_them(rm_folders, tmp_path):
    from transformers import AutoTokenizer

    chats = [[{"role": "system", "content": "think"}, {"role": "user", "content": p}] for p in PROMPTS]
    records = [{"prompt": m, "chosen": [{"role": "assistant", "content": c}],
                "rejected": [{"role": "assistant", "content": c + " no"}]} for m, c in zip(chats, COMPLETIONS)]
    folder = _trained_on(rm_folders["one"], tmp_path, "chat", records[0])
    expected = _trl_scores(folder, records, tmp_path)
    tok = AutoTokenizer.from_pretrained(folder)
    # a grpo/ppo job passes chat prompts rendered by the template, with the generation prompt
    rendered = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in chats]
    rm = RewardModel(folder, batch_size=3)
    assert rm.chat and not rm.eos
    assert rm(rendered, COMPLETIONS) == pytest.approx(expected, abs=1e-5)
    # a plain prompt becomes the user's turn
    users = [{"prompt": [{"role": "user", "content": p}], "chosen": r["chosen"], "rejected": r["rejected"]}
             for p, r in zip(PROMPTS, records)]
    assert rm(PROMPTS, COMPLETIONS) == pytest.approx(_trl_scores(folder, users, tmp_path), abs=1e-5)


# --- HTTP verifier ------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        status, reply, delay = self.server.behave(len(self.server.requests), body)
        time.sleep(delay)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout test)
            pass

    def log_message(self, *args):
        pass


@contextmanager
def serve(behave):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.behave = [], behave
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/score", server
    finally:
        server.shutdown()
        server.server_close()


def by_length(n, body):
    return 200, {"rewards": [float(len(c)) for c in body["completions"]]}, 0


def test_http_verifier_posts_the_batch_with_fields():
    import numpy as np

    with serve(by_length) as (url, server):
        verifier = HttpVerifier(url, headers={"X-Token": "t"})
        assert verifier(["p1", "p2"], ["a", "bcd"], answer=[1, np.int64(2)]) == [1.0, 3.0]
    assert server.requests == [{"prompts": ["p1", "p2"], "completions": ["a", "bcd"], "answer": [1, 2]}]


def test_http_verifier_retries_until_the_server_recovers():
    def flaky(n, body):
        return (503, {"error": "warming up"}, 0) if n <= 2 else by_length(n, body)

    with serve(flaky) as (url, server):
        assert HttpVerifier(url, retries=2, backoff=0.01)(["p"], ["ab"]) == [2.0]
    assert len(server.requests) == 3


def test_http_verifier_gives_up_on_an_unreachable_port(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    delays: list[float] = []
    monkeypatch.setattr(scorers.time, "sleep", delays.append)
    with pytest.raises(RewardError, match=f"reward 'http_verifier': POST {url} failed after 3 attempt\\(s\\): "
                                          "cannot connect"):
        HttpVerifier(url, retries=2, backoff=0.5)(["p"], ["c"])
    assert delays == [0.5, 1.0]


def test_http_verifier_times_out_on_a_slow_server():
    with serve(lambda n, body: (200, {"rewards": [1.0]}, 3.0)) as (url, server):
        start = time.monotonic()
        with pytest.raises(RewardError, match=r"failed after 2 attempt\(s\): timed out after 0.2 s"):
            HttpVerifier(url, timeout=0.2, retries=1, backoff=0.0)(["p"], ["c"])
        assert time.monotonic() - start < 2.5  # two 0.2 s timeouts, not one 3 s reply (slack for a busy machine)
    assert len(server.requests) == 2


@pytest.mark.parametrize("status, reply, message", [
    (400, {"error": "bad"}, "HTTP 400"),
    (200, b"not json", "the reply is not JSON"),
    (200, {"scores": [1]}, 'the reply has no "rewards" list'),
])
def test_http_verifier_fails_at_once_on_a_client_error_or_bad_reply(status, reply, message):
    with serve(lambda n, body: (status, reply, 0)) as (url, server):
        with pytest.raises(RewardError, match=f"failed after 1 attempt\\(s\\): {message}"):
            HttpVerifier(url, retries=3, backoff=0.01)(["p"], ["c"])
    assert len(server.requests) == 1


def test_a_verifier_reply_of_the_wrong_length_is_caught_by_combine():
    with serve(lambda n, body: (200, {"rewards": [1.0, None, 0.5]}, 0)) as (url, _):
        rewards = [Reward("verify", HttpVerifier(url))]
        with pytest.raises(RewardError, match="reward 'verify': returned 3 values for 2 samples"):
            combine(rewards, ["p"] * 2, ["c"] * 2)
        out = combine(rewards, ["p"] * 3, ["c"] * 3)
    assert out.rewards == [1.0, 0.0, 0.5] and out.unscored == 1 and out.means == {"verify": 0.75}
