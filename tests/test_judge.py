"""The LLM judge (RLAIF): verdicts from probabilities and from replies, pairwise win rates, onError, bad input.

Unit tier: no Ray. A tiny random Llama is made into a deterministic judge by surgery: every layer's
attention and MLP output is zeroed, so the next token depends only on the last prompt token (the
same for every judge prompt: the end of the chat template), and the output row of one label is
pointed at that token's final hidden state, so the judge always prefers that label. Reply parsing
runs the real `Judge` over a scripted engine (a test double that answers from the prompt text).

    .venv/bin/python -m pytest tests/test_judge.py -q
"""

from __future__ import annotations

import math
import re

import pytest

import tiny
from support import jobs

torch = pytest.importorskip("torch")

from posttrain.api.load import InvalidJob, parse_job  # noqa: E402
from posttrain.jobs.rewards import RewardError, build_rewards, combine  # noqa: E402
from posttrain.jobs.rewards.judge import Judge  # noqa: E402
from posttrain.jobs.rewards.score import Reward  # noqa: E402
from posttrain.jobs.rl.engines import Generation, RolloutEngine  # noqa: E402


def biased_judge(folder, label: str):
    """A tiny model that answers `label` next after any judge prompt (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny.make_model(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        ids = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                      tokenize=False)
        enc = tok(ids, add_special_tokens=False, return_tensors="pt")
        h = model(**enc, output_hidden_states=True).hidden_states[-1][0, -1]
        target = tok(label, add_special_tokens=False)["input_ids"][0]
        model.lm_head.weight[target] += 60 * h / h.dot(h)  # that label's logit rises by 60 after this prompt
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prefers_a(tmp_path_factory):
    return biased_judge(tmp_path_factory.mktemp("judge-a") / "model", "A")


@pytest.fixture(scope="module")
def prefers_nine(tmp_path_factory):
    return biased_judge(tmp_path_factory.mktemp("judge-9") / "model", "9")


def make(folder, **spec):
    return Judge(folder, spec={"model": str(folder), "engine": "transformers", **spec}, where="spec.rewards[0].judge")


def test_pointwise_probabilities_read_the_expected_score(prefers_nine):
    judge = make(prefers_nine)
    scores = judge(["add 1 + 2 =", "add 5 + 5 ="], [" 3", " the answer is 10"])
    assert scores == pytest.approx([(9 - 1) / 9] * 2, abs=1e-3)


def test_pairwise_probabilities_follow_the_shown_order_and_swap_cancels_position_bias(prefers_a):
    prompts, completions = ["p"] * 3 + ["q"] * 2, ["one", "two", "three", "four", "five"]
    # Without swapping, this judge always prefers whichever completion is shown first (as A).
    assert make(prefers_a, mode="pairwise", swap=False)(prompts, completions) == pytest.approx(
        [1.0, 0.5, 0.0, 1.0, 0.0], abs=1e-3)
    assert make(prefers_a, mode="pairwise")(prompts, completions) == pytest.approx([0.5] * 5, abs=1e-3)


class ScriptedEngine(RolloutEngine):
    """Replies from the prompt's text: `reply(text) -> str` (a test double for a judge that reasons)."""

    name = "scripted"

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply = tokenizer, reply

    def generate(self, prompt_token_ids, sampling):
        return [Generation(prompt_token_ids=p, token_ids=[[1]], logprobs=[[0.0]],
                           texts=[self.reply(self.tokenizer.decode(p))]) for p in prompt_token_ids]

    def load_weights(self, named_tensors):
        raise NotImplementedError


def scripted(folder, reply, *, on_error="raise", **spec):
    judge = Judge(folder, spec={"model": str(folder), "engine": "transformers", "verdict": "reply", **spec},
                  where="spec.rewards[0].judge", on_error=on_error, label="judge")
    judge.engine = ScriptedEngine(judge.tokenizer, reply)
    return judge


def prefers_longer(text: str) -> str:
    a, b = re.search(r"Response A:\n(.*?)\n\nResponse B:\n(.*?)\n\n", text, re.S).groups()
    return "Answer: A" if len(a) > len(b) else "Answer: B"


def test_pairwise_replies_give_each_completion_its_win_rate_in_its_group(prefers_a):
    judge = scripted(prefers_a, prefers_longer, mode="pairwise")
    rates = judge(["p"] * 3 + ["q"] * 2, ["aa", "a", "aaa", "bb", "b"])
    assert rates == pytest.approx([0.5, 0.0, 1.0, 1.0, 0.0])
    ranking = judge.rank("p", ["aa", "a", "aaa"])
    assert [v.reply for v in ranking.pairs[(0, 1)]] == ["Answer: A", "Answer: B"]  # both orders, as shown


def test_pointwise_replies_are_parsed_and_normalised(prefers_a):
    judge = scripted(prefers_a, lambda text: "Score: 7" if "good" in text else "I give it 1/10",
                     parse=r"(\d+)")
    assert judge(["p", "p"], ["good", "bad"]) == pytest.approx([6 / 9, 0.0])


def test_an_unparseable_reply_with_raise_fails_naming_the_field_and_showing_the_reply(prefers_a):
    judge = scripted(prefers_a, lambda text: "I cannot decide " + "x" * 500)
    rewards = [Reward("judge", judge)]
    with pytest.raises(RewardError) as err:
        combine(rewards, ["p"], ["c"])
    message = str(err.value)
    assert message.startswith("reward 'judge': spec.rewards[0].judge: no verdict (a score from 1 to 10)")
    assert "I cannot decide xxx" in message and "..." in message and len(message) < 600
    assert "onError: skip" in message


def test_out_of_scale_scores_and_unparseable_replies_are_counted_with_skip(prefers_a):
    judge = scripted(prefers_a, lambda text: "Score: 42" if "big" in text else ("Score: 10" if "top" in text
                                                                                 else "hmm"), on_error="skip")
    batch = combine([Reward("judge", judge)], ["p"] * 3, ["big", "top", "meh"], on_error="skip")
    assert batch.per_function["judge"] == [None, 1.0, None]
    assert batch.skipped == {"judge": 2} and batch.rewards == [0.0, 1.0, 0.0] and batch.unscored == 2


def test_a_pairwise_judge_needs_groups(prefers_a):
    judge = scripted(prefers_a, prefers_longer, mode="pairwise")
    with pytest.raises(RewardError, match=r"spec.rewards\[0\].judge: a pairwise judge .* rl.groupSize >= 2"):
        judge(["p", "q"], ["a", "b"])


def test_the_judge_reward_builds_from_a_spec_with_its_field_in_errors(prefers_nine):
    from posttrain.api.rl import RewardSpec
    from posttrain.jobs.rl.workers.scorer import reward_function

    spec = RewardSpec.model_validate({"judge": {"model": str(prefers_nine), "engine": "transformers"},
                                      "weight": 0.5, "onError": "skip"})
    [reward] = build_rewards([reward_function(spec, where="spec.rewards[2]")])
    assert (reward.label, reward.weight) == ("judge", 0.5)
    assert reward.fn.where == "spec.rewards[2].judge" and reward.fn.on_error == "skip"
    assert reward.fn(["p"], ["c"]) == pytest.approx([8 / 9], abs=1e-3)


# ---- bad input: clear errors naming the field, before anything runs ----------------------------

GENERATE = {"task": "preference_pairs", "candidates": 2, "judge": {"model": "judge", "mode": "pairwise"}}


def generate_doc(**generate):
    doc = jobs.document("generate", generate={**GENERATE, **generate})
    del doc["spec"]["training"]["maxSteps"]  # generate trains nothing: no steps to set
    return doc


def errors(doc) -> list[tuple[str, str]]:
    with pytest.raises(InvalidJob) as err:
        parse_job(doc)
    return [(e.path, e.message) for e in err.value.errors]


@pytest.mark.parametrize("generate, path, text", [
    ({"task": "pairs"}, "spec.generate.task",
     "unknown task 'pairs'; choose one of instructions, preference_pairs, traces"),
    ({"candidates": 1}, "spec.generate.candidates", "must be at least 2"),
    ({"judge": None}, "spec.generate.judge", "task preference_pairs needs a judge"),
    ({"judge": {"model": "j", "mode": "pairwise", "template": "Is {a} better? {prompt}"}},
     "spec.generate.judge.template", "a pairwise judge template must contain {b}"),
    ({"judge": {"model": "j", "template": "Rate {completion} for {prompt} {style}"}},
     "spec.generate.judge.template", "unknown placeholders ['style']"),
    ({"judge": {"model": "j", "parse": "Score: \\d+"}}, "spec.generate.judge.parse", "needs a group"),
    ({"judge": {"model": "j", "scaleMin": 5, "scaleMax": 5}}, "spec.generate.judge.scaleMax", "must exceed"),
])
def test_bad_generate_sections_name_the_field(generate, path, text):
    [(got, message)] = errors(generate_doc(**generate))
    assert got == path and text in message, (got, message)


def test_generate_refuses_training_sections_and_needs_its_own():
    doc = generate_doc()
    doc["spec"]["roles"] = {"learner": {"replicas": 1}}
    assert errors(doc) == [("spec.roles.learner", "generate trains nothing; it runs on roles.rollout and "
                                                  "roles.reward")]
    doc = generate_doc()
    del doc["spec"]["generate"]
    assert errors(doc)[0][0] == "spec.generate"
    doc = jobs.document("sft", generate=GENERATE)
    assert errors(doc) == [("spec.generate", "is for algorithm generate, not sft")]


def test_a_judge_reward_template_missing_a_placeholder_names_the_field():
    doc = jobs.document("grpo", rewards=[{"judge": {"model": "j", "template": "Rate {prompt}"}}])
    assert errors(doc) == [("spec.rewards[0].judge.template", "a pointwise judge template must contain {completion}")]


def test_a_judge_reward_refuses_function_kwargs():
    doc = jobs.document("grpo", rewards=[{"judge": {"model": "j"}, "kwargs": {"scale": 5}}])
    assert errors(doc) == [("spec.rewards[0].kwargs", "are for reward functions; a judge takes its settings "
                                                       "inside judge: {...}")]


def test_generate_without_training_section_validates_and_sft_still_needs_steps():
    job = parse_job(generate_doc(), require_available=True)
    assert job.spec.generate.candidates == 2 and job.spec.training.max_steps is None
    doc = jobs.document("sft")
    del doc["spec"]["training"]
    assert errors(doc) == [("spec.training.maxSteps", "set maxSteps or epochs (for example maxSteps: 100)")]


def test_vllm_and_transformers_judges_agree(tmp_path):
    """The judge runs on vLLM where installed (auto): its probabilities match the transformers fallback's."""
    pytest.importorskip("vllm")
    folder = tiny.make_model(tmp_path / "model", hidden=128)  # vLLM's CPU attention needs head size >= 32
    prompts, completions = ["p", "p", "q", "q"], ["one", "two", "three", "four"]
    on_vllm = Judge(folder, spec={"model": str(folder), "engine": "vllm", "mode": "pairwise", "swap": False},
                    where="w")
    try:
        assert on_vllm.engine.name == "vllm"
        got = on_vllm(prompts, completions)
    finally:
        on_vllm.close()
    expected = make(folder, mode="pairwise", swap=False)(prompts, completions)
    assert got == pytest.approx(expected, abs=1e-3)
    assert len(set(round(v, 3) for v in expected)) > 1  # a random judge: not all 0.5


def test_the_readme_shows_the_default_templates():
    from pathlib import Path

    from posttrain.api.judge import DEFAULT_PAIRWISE_TEMPLATE, DEFAULT_POINTWISE_TEMPLATE

    readme = [line.strip() for line in (Path(__file__).parent.parent / "README.md").read_text().splitlines()]
    for template in (DEFAULT_POINTWISE_TEMPLATE, DEFAULT_PAIRWISE_TEMPLATE):
        lines = [line.strip() for line in template.splitlines()]
        start = readme.index(lines[0])
        assert readme[start:start + len(lines)] == lines


def test_the_run_summary_table_shows_a_generate_jobs_counts():
    from posttrain.jobs.cli import summary_table

    table = summary_table({"status": "succeeded", "algorithm": "generate", "task": "preference_pairs",
                           "pairs_written": 7, "ties_dropped": 2, "unjudged_prompts": 0, "unparseable_verdicts": 1,
                           "roles": {"reward": {"actors": 1, "judge": "judge", "mode": "pairwise"}},
                           "artifact": {"kind": "dataset", "path": "out/data/train.jsonl"}})
    assert "pairs written" in table and " 7" in table and "unparseable verdicts  1" in table
    assert "dataset: out/data/train.jsonl" in table and "mode=pairwise" in table


def test_a_resolved_generate_spec_validates_again():
    """What the operator writes into the ConfigMap (defaults filled in) is what the driver validates."""
    job = parse_job(generate_doc())
    again = parse_job({"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
                       "metadata": {"name": "again"}, "spec": job.spec.wire()})
    assert again.spec == job.spec
    doc = generate_doc()
    doc["spec"]["roles"] = {"trainer": {"replicas": 2}}
    assert errors(doc)[0][0] == "spec.roles.trainer"
    doc = generate_doc()
    doc["spec"]["adapter"] = {"type": "lora"}
    assert errors(doc)[0][0] == "spec.adapter.type"


def test_without_a_chat_template_the_labels_carry_the_prompts_trailing_space(prefers_nine):
    judge = make(prefers_nine, chat=False)
    text = judge.template.format(prompt="add 1 + 2 =", completion=" 3", min=1, max=10)
    assert text.endswith("Score: ")
    ids = judge._encode(text, for_labels=True)
    assert judge.tokenizer.decode(ids + judge.label_ids[6]).endswith("Reply with the score only.\nScore: 7")
    assert not judge.tokenizer.decode(ids).endswith(" ")
    chat = make(prefers_nine)  # through the chat template the answer starts a fresh assistant turn
    assert chat.tokenizer.decode(chat.label_ids[6]) == "7"


@pytest.mark.parametrize("algorithm", ["generate", "grpo"])
def test_a_missing_judge_model_fails_before_anything_is_written(tmp_path, tiny_model, algorithm):
    from posttrain.jobs import driver

    tiny.write_jsonl(tmp_path / "train.jsonl", tiny.arith_records(4))
    if algorithm == "generate":
        doc, field = generate_doc(judge={"model": "no-such-judge"}, maxNewTokens=8), "spec.generate.judge.model"
    else:
        doc, field = jobs.document("grpo", rewards=[{"judge": {"model": "no-such-judge"}}]), "spec.rewards[0].judge.model"
    doc["spec"]["model"] = {"source": str(tiny_model)}
    with pytest.raises(ValueError, match=rf"^{re.escape(field)}: .*no-such-judge does not exist"):
        driver.run(parse_job(doc, require_available=True),
                   driver.RunOptions(output=str(tmp_path / "out"), base_dir=tmp_path))
    assert not (tmp_path / "out").exists()
