"""Evaluation's pure parts with a scripted model: extraction, votes and their ties, intervals, every method's
mechanics, the report files. No Ray, no torch.

    .venv/bin/python -m pytest tests/test_eval_methods.py -q
"""

from __future__ import annotations

import json

import pytest

from posttrain.api.evaluation import AnswerSpec, EvaluationSpec
from posttrain.jobs.evaluation import answers, report, stats
from posttrain.jobs.evaluation.methods import Completion, Item, Task, fill, run_method


class Scripted:
    """A fake model: `script(prompt_text, k)` gives the k-th sample of a prompt; every call is recorded."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def __call__(self, prompts, *, n, greedy, seed):
        self.calls.append({"prompts": prompts, "n": n, "greedy": greedy, "seed": seed})
        out = []
        for p in prompts:
            text = p if isinstance(p, str) else p[-1]["content"]
            out.append([Completion(self.script(text, k), tokens=len(self.script(text, k).split())) for k in range(n)])
        return out


def task_for(model, *, reward=None, **spec):
    ev = EvaluationSpec.model_validate(spec)
    score = answers.scorer(ev.answer)
    return Task(spec=ev, generate=model, extract=answers.extractor(ev.answer),
                score=lambda items, texts, ans: [score(a, it.reference) for it, a in zip(items, ans)], reward=reward)


ITEMS = [Item(prompt="q1", reference=7), Item(prompt="q2", reference=3), Item(prompt="q3", reference=5)]


# ---- extraction and scoring ---------------------------------------------------------------------------

def test_extractors_read_the_answer_or_say_none():
    assert answers.last_number("3 apples and 1,204 pears.") == "1204"
    assert answers.last_number("-2.5 then 4.") == "4"
    assert answers.last_number("no digits") is None
    assert answers.answer_tag("<answer>a</answer> x <answer> 12 </answer>") == "12"
    assert answers.regex_extractor(r"Answer: (\w+)")("Answer: x ... Answer: y") == "y"
    assert answers.regex_extractor(r"\d+")("a 1 b 22") == "22"  # no group: the whole (last) match
    full = answers.extractor(AnswerSpec(extract="full"))
    assert full("  hi ") == "hi" and full("   ") is None


def test_a_user_extractor_is_imported_before_anything_runs(tmp_path):
    (tmp_path / "ext.py").write_text("def pick(text):\n    return text.split('=')[-1] if '=' in text else None\n")
    extract = answers.extractor(AnswerSpec(extract="ext.py:pick"), base_dir=tmp_path)
    assert extract("x = 4") == " 4" and extract("nothing") is None
    with pytest.raises(ValueError, match=r"spec.evaluation.answer.extract: .*no module named 'nosuch'"):
        answers.extractor(AnswerSpec(extract="nosuch:fn"))


def test_match_numeric_tolerance_and_text_metrics():
    assert answers.score_match("7.0", 7) == 1.0 and answers.score_match("7.2", 7) == 0.0
    assert answers.score_match("7.2", 7, tolerance=0.25) == 1.0
    assert answers.score_match("Paris.", "paris") == 1.0 and answers.score_match(None, 7) == 0.0
    assert answers.text_score("the cat sat on the mat", "the cat sat on the mat", "bleu") == pytest.approx(1.0)
    partial = answers.text_score("the cat sat", "the cat sat on the mat", "chrf")
    assert 0.0 < partial < 1.0 and answers.text_score(None, "x", "chrf") == 0.0


# ---- votes and intervals ------------------------------------------------------------------------------

def test_majority_vote_ties_go_to_the_answer_sampled_first():
    assert stats.majority_vote(["8", "7", "7", "8"]) == ("8", 2)
    assert stats.majority_vote(["7", "8", "8", "7"]) == ("7", 2)
    assert stats.majority_vote([None, "3", None, "4", "4"]) == ("4", 2)
    assert stats.majority_vote([None, None]) == (None, 0)
    # '7', '7.0' and '7.' are one answer for the vote
    keys = [answers.vote_key(a) for a in ("7", "7.0", "8", "7.")]
    assert stats.majority_vote(keys) == ("7", 3)


def test_wilson_and_bootstrap_intervals():
    lo, hi = stats.wilson(45, 64)
    # by hand: p = 45/64, z^2 = 3.8415; centre (p + z^2/128) / (1 + z^2/64) = 0.6916, half-width 0.1093 (0.8009 after rounding)
    assert (round(lo, 4), round(hi, 4)) == (0.5823, 0.8009)
    assert stats.wilson(0, 10)[1] == pytest.approx(stats.Z95 ** 2 / (10 + stats.Z95 ** 2))  # 0 of n: z^2/(n+z^2)
    assert stats.wilson(0, 20)[0] == 0.0 and stats.wilson(20, 20)[1] == pytest.approx(1.0)
    assert stats.ci95([1.0, 0.0, 1.0, 1.0]) == stats.wilson(3, 4)
    lo, hi = stats.ci95([0.2, 0.4, 0.6, 0.8], seed=1)  # not 0/1: bootstrap of the mean
    assert 0.2 <= lo < 0.5 < hi <= 0.8 and stats.ci95([0.2, 0.4, 0.6, 0.8], seed=1) == (lo, hi)


# ---- methods with a scripted model --------------------------------------------------------------------

def test_direct_is_one_greedy_answer_and_failures_are_counted():
    model = Scripted(lambda q, k: {"q1": "it is 7", "q2": "no idea", "q3": "4"}[q])
    res = run_method("direct", task_for(model), ITEMS)
    (row,) = res.rows
    assert row["scores"] == [1.0, 0.0, 0.0] and row["extraction_failures"] == 1 and row["unanswered"] == 1
    assert row["tokens"] == 3 + 2 + 1 and row["n"] == row["generations"] == 1
    assert model.calls == [{"prompts": ["q1", "q2", "q3"], "n": 1, "greedy": True, "seed": 0}]
    assert res.samples[1]["answer"] is None and res.samples[0]["samples"][0]["text"] == "it is 7"


def test_cot_fills_the_template_also_inside_a_chat():
    model = Scripted(lambda q, k: "so 7")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"}]
    res = run_method("cot", task_for(model, cotTemplate="Q: {prompt} Think."), [Item(prompt=chat, reference=7)])
    assert res.rows[0]["scores"] == [1.0]
    sent = model.calls[0]["prompts"][0]
    assert sent[0] == chat[0] and sent[1]["content"] == "Q: q1 Think." and chat[1]["content"] == "q1"
    assert fill("x", "{prompt}!") == "x!"


# q1's samples: 8, 7, 7, 8 (a tie at N=4 goes to 8, sampled first), 7, 7 ...; q2: no answer ever; q3: 5, 6, 6
SAMPLES = {"q1": ["8", "7", "7", "8", "7", "7", "7", "7"], "q2": ["x"] * 8, "q3": ["5", "6", "6", "6", "5", "5", "5", "5"]}


def test_self_consistency_votes_over_prefixes_of_one_sample_set():
    model = Scripted(lambda q, k: SAMPLES[q][k])
    res = run_method("self_consistency", task_for(model, samples=[1, 2, 4, 8], sampleWith="direct"), ITEMS)
    assert len(model.calls) == 1 and model.calls[0]["n"] == 8 and model.calls[0]["greedy"] is False
    by_n = {r["n"]: r for r in res.rows}
    assert by_n[1]["scores"] == [0.0, 0.0, 1.0]  # 8 | none | 5
    assert by_n[2]["scores"] == [0.0, 0.0, 1.0]  # 8,7 tie -> 8 (first) | none | 5,6 tie -> 5
    assert by_n[4]["scores"] == [0.0, 0.0, 0.0]  # 8,7,7,8 tie -> 8 | none | 6 wins 3-1
    assert by_n[8]["scores"] == [1.0, 0.0, 1.0]  # 7 wins 6-2 | none | 5 wins 5-3
    assert [by_n[n]["extraction_failures"] for n in (1, 2, 4, 8)] == [1, 2, 4, 8]  # q2's samples
    assert [by_n[n]["unanswered"] for n in (1, 2, 4, 8)] == [1, 1, 1, 1]
    assert [by_n[n]["tokens"] for n in (1, 2, 4, 8)] == [3, 6, 12, 24]
    assert res.samples[0]["votes"] == {"1": 1, "2": 1, "4": 2, "8": 6}
    assert res.samples[0]["picks"]["4"] == {"sample": 0, "answer": "8", "score": 0.0}
    assert res.samples[1]["picks"]["8"]["sample"] is None


def test_best_of_n_picks_by_reward_from_the_same_samples():
    model = Scripted(lambda q, k: SAMPLES[q][k])
    # the reward prefers larger numbers, so it is wrong on q1 once an 8 is there
    reward = lambda items, texts: [float(t) if t.isdigit() else -1.0 for t in texts]  # noqa: E731
    task = task_for(model, samples=[1, 2, 4], sampleWith="direct", methods=["self_consistency", "best_of_n"],
                    reward=reward)
    sc = run_method("self_consistency", task, ITEMS)
    bon = run_method("best_of_n", task, ITEMS)
    assert len(model.calls) == 1  # one sample set for both methods
    by_n = {r["n"]: r for r in bon.rows}
    assert by_n[1]["scores"] == [0.0, 0.0, 1.0] and by_n[4]["scores"] == [0.0, 0.0, 0.0]  # q3: 6 > 5
    assert bon.samples[2]["picks"]["2"]["answer"] == "6" and bon.samples[0]["rewards"][:2] == [8.0, 7.0]
    assert sc.rows[0]["tokens"] == bon.rows[0]["tokens"]


def test_refine_runs_rounds_of_critique_and_revision():
    def script(text, k):
        if text.startswith("CRIT"):
            return "the sum is wrong"
        if text.startswith("REV"):
            return "fixed: 7" if "the sum is wrong" in text and "answer 6" in text else "still 9"
        return "answer 6" if text == "q1" else "answer 5"

    model = Scripted(script)
    task = task_for(model, methods=["refine"], refineRounds=2,
                    critiqueTemplate="CRIT {prompt} {answer}", reviseTemplate="REV {prompt} {answer} {critique}")
    res = run_method("refine", task, ITEMS[:1] + ITEMS[2:])
    assert [r["n"] for r in res.rows] == [0, 1, 2] and [r["generations"] for r in res.rows] == [1, 3, 5]
    assert [r["scores"] for r in res.rows] == [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]  # round 2 revises 'fixed: 7'
    assert len(model.calls) == 1 + 2 * 2 and all(c["greedy"] for c in model.calls)
    assert model.calls[1]["prompts"][0] == "CRIT q1 answer 6"
    assert res.rows[2]["tokens"] > res.rows[1]["tokens"] > res.rows[0]["tokens"]
    rounds = res.samples[0]["rounds"]
    assert [r["answer"] for r in rounds] == ["6", "7", "9"] and rounds[1]["critique"] == "the sum is wrong"


def test_refine_with_verifier_feedback_revises_on_the_rewards_score():
    def script(text, k):
        if text.startswith("REV"):
            return "then 7" if "scored this answer 0.00" in text else "keep 5"
        return "answer 6" if text == "q1" else "answer 5"

    model = Scripted(script)
    reward = lambda items, texts: [float(answers.last_number(t) == str(it.reference)) for it, t in zip(items, texts)]  # noqa: E731
    task = task_for(model, methods=["refine"], refineRounds=1, refineFeedback="rewards",
                    reviseTemplate="REV {prompt} {answer} {critique}", reward=reward)
    res = run_method("refine", task, ITEMS[:1] + ITEMS[2:])
    assert [r["scores"] for r in res.rows] == [[0.0, 1.0], [1.0, 1.0]]
    assert [r["generations"] for r in res.rows] == [1, 2] and len(model.calls) == 2  # no critique generated
    assert res.samples[0]["rounds"][1]["critique"].startswith("A verifier scored this answer 0.00")


# ---- the spec's bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ({"methods": ["direct", "beam"]}, r"methods\[1\]: unknown method 'beam'"),
    ({"samples": [1, 0]}, r"samples\[1\]: N = 0"),
    ({"samples": [4, 2]}, r"samples: \[4, 2\] must be increasing"),
    ({"answer": {"extract": "regex"}}, r"pattern: extract regex needs a pattern"),
    ({"answer": {"extract": "lastnum"}}, r"extract: unknown extractor 'lastnum'"),
    ({"cotTemplate": "think"}, r"cotTemplate: the cot template must contain \{prompt\}"),
])
def test_bad_evaluation_specs_name_the_field(spec, message):
    with pytest.raises(ValueError, match=message):
        EvaluationSpec.model_validate(spec)


# ---- the report -------------------------------------------------------------------------------------

def test_report_rows_table_and_plots(tmp_path):
    model = Scripted(lambda q, k: SAMPLES[q][k])
    task = task_for(model, samples=[1, 2, 4, 8], sampleWith="direct")
    rows = [report.result_row("m", r) for r in run_method("self_consistency", task, ITEMS).rows]
    rows += [report.result_row("m", r) for r in run_method("direct", task, ITEMS).rows]
    assert rows[3]["score"] == pytest.approx(2 / 3) and rows[3]["ci95"] == [round(x, 6) for x in stats.wilson(2, 3)]
    doc = {"job": "t", "prompts": 3, "metric": "match", "results": rows}
    doc["plots"] = report.plot_scaling(doc, tmp_path)
    for name in report.PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.report_markdown(doc)
    assert "| m | self_consistency N=8 | 8 | 0.667 |" in md and "| m | direct | 1 |" in md
    assert "![accuracy_vs_samples](accuracy_vs_samples.png)" in md
    json.dumps(doc)  # eval.json is plain JSON
