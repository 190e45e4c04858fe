"""generate's traces and instructions tasks, exactly: a scripted generator stands in for the rollout actors.

    .venv/bin/python -m pytest tests/test_generate_tasks.py -q

The tasks get a fake `Sampler` whose replies are written out here, so the verifier filter's keep rate,
the dedup verdicts and the diversity numbers are checked against hand-computed values; the fields of
`spec.generate` are checked with their paths. The runs on tiny models are in test_generate_e2e.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from support import jobs

from posttrain.api.load import InvalidJob, parse_job
from posttrain.jobs.algorithms import textstats
from posttrain.jobs.algorithms.generate_instructions import Instructions, clean_instruction
from posttrain.jobs.algorithms.generate_traces import Traces
from posttrain.jobs.data import Prompt
from posttrain.jobs.rl.engines import Generation


def generate_doc(**generate):
    doc = jobs.document("generate", generate=generate)
    del doc["spec"]["training"]["maxSteps"]
    return doc


def errors(doc) -> list[tuple[str, str]]:
    with pytest.raises(InvalidJob) as err:
        parse_job(doc)
    return [(e.path, e.message) for e in err.value.errors]


class ScriptedSampler:
    """Replies from `script(prompt) -> list of texts`; records every call's prompts and sampling."""

    def __init__(self, script):
        self.script, self.calls = script, []

    def sampling(self, **settings):
        return settings

    def texts(self, prompts, sampling, seed):
        self.calls.append((prompts, sampling))
        return [Generation(prompt_token_ids=[], texts=list(self.script(p))) for p in prompts]


def task(cls, **generate):
    job = parse_job(generate_doc(**generate))
    return cls(SimpleNamespace(spec=job.spec, base_dir=None))


def prompt(raw, **fields) -> Prompt:
    return Prompt(ids=[], text=str(raw), fields=fields, raw=raw)


# ---- traces ------------------------------------------------------------------------------------

TRACES = {  # the question's number -> its 4 scripted traces
    "1": ["1 + 1 = 2.\nSo the answer is 2.", "It is 3.", "I am not sure.", "1 + 1 = 2.\nSo the answer is 2."],
    "2": ["2 + 2 = 5.", "2 * 2 = 4", "so 4.", "2 + 2 = 4.\nAnswer: 4"],
    "3": ["3 + 3 = 6", "six"],
}


def script_traces(asked):
    return TRACES[asked.split("?")[0].split()[-1]]


def test_the_verifier_keeps_matching_answers_up_to_keep_per_prompt_and_reports_the_keep_rate():
    traces = task(Traces, task="traces", keepPerPrompt=2, candidates=4, temperature=0.8)
    prompts = [prompt("what is 1?", answer=2), prompt("what is 2?", answer="4"), prompt("what is 3?")]
    sampler = ScriptedSampler(script_traces)
    records, line = traces.batch(prompts, sampler, 0)
    [(asked, sampling)] = sampler.calls
    assert asked[0] == "what is 1?\nThink step by step, then give the final answer as a number on the last line."
    assert sampling == {"n": 4, "max_new_tokens": 256, "temperature": 0.8, "top_p": 1.0}
    # prompt 1: kept once (its repeat is not kept twice), one wrong, one without a number
    # prompt 2: wrong, then three correct of which two are kept (keepPerPrompt 2)
    # prompt 3: no answer field -> unverified and kept; "six" has no number
    assert records == [
        {"prompt": "what is 1?", "reasoning": "1 + 1 = 2.", "answer": "2", "verified": True},
        {"prompt": "what is 2?", "reasoning": "2 * 2 = 4", "answer": "4", "verified": True},
        {"prompt": "what is 2?", "reasoning": "so 4.", "answer": "4", "verified": True},
        {"prompt": "what is 3?", "reasoning": "3 + 3 = 6", "answer": "6", "verified": False},
    ]
    assert line == {"traces": 10, "kept": 4, "correct": 5, "wrong": 2, "no_answer": 2, "unverified": 1,
                    "keep_rate": 0.4}
    summary = traces.summary()
    assert summary["repeats"] == 1 and summary["over_limit"] == 1 and summary["keep_rate"] == 0.4
    assert traces.manifest()["verification"].startswith("partial:")


def test_without_verify_every_trace_with_an_answer_is_kept_and_the_manifest_says_so():
    traces = task(Traces, task="traces", verify=False, candidates=4)
    records, line = traces.batch([prompt("what is 2?", answer=4)], ScriptedSampler(script_traces), 0)
    assert [r["answer"] for r in records] == ["5"] and line["kept"] == 1  # keepPerPrompt 1: the first one
    assert line["unverified"] == 4 and line["wrong"] == 0
    assert traces.manifest()["verification"] == "off (verify: false): every trace with an answer is kept"


def test_a_chat_prompt_gets_the_template_in_its_last_user_turn_and_is_written_as_given():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is 3?"}]
    traces = task(Traces, task="traces", candidates=2, traceTemplate="Q: {prompt}")
    sampler = ScriptedSampler(lambda asked: TRACES["3"])
    records, _ = traces.batch([prompt(chat, answer=6)], sampler, 0)
    assert sampler.calls[0][0] == [[chat[0], {"role": "user", "content": "Q: what is 3?"}]]
    assert records == [{"prompt": chat, "reasoning": "3 + 3 = 6", "answer": "6", "verified": True}]


def test_a_verifier_that_rejects_everything_fails_with_the_count():
    traces = task(Traces, task="traces", candidates=4)
    records, line = traces.batch([prompt("what is 1?", answer=7), prompt("what is 2?", answer=7)],
                                 ScriptedSampler(script_traces), 0)
    assert records == [] and line["keep_rate"] == 0.0
    with pytest.raises(ValueError, match=r"^spec.generate: 0 of 8 traces kept: 7 wrong answers, 1 with no answer "
                                         r"read by answer.extract last_number; nothing was written"):
        traces.finish(records)


def test_cot_records_are_what_sft_reads_with_format_cot(tmp_path):
    """The written fields need no mapping: data.build renders the cot template from them."""
    import tiny
    from posttrain.jobs import data as data_mod

    records, _ = task(Traces, task="traces", candidates=4, keepPerPrompt=2).batch(
        [prompt("what is 2?", answer=4)], ScriptedSampler(script_traces), 0)
    tiny.write_jsonl(tmp_path / "train.jsonl", records)
    tok = tiny.make_tokenizer(tmp_path / "tok")
    spec = parse_job(jobs.document("sft", data={"train": [{"source": str(tmp_path / "train.jsonl"),
                                                           "format": "cot"}]})).spec
    train, _, stats = data_mod.build(spec.data, tok, seed=0, max_len=128)
    assert stats.train_examples == 2
    completions = {tok.decode([t for t in row["labels"] if t != -100]) for row in train}
    assert completions == {"<think>\n2 * 2 = 4\n</think>\n<answer>4</answer><|im_end|>",
                           "<think>\nso 4.\n</think>\n<answer>4</answer><|im_end|>"}


# ---- instructions ------------------------------------------------------------------------------

SEEDS = [prompt("Name three colours.", completion="red, green, blue"), prompt("Add 2 and 3.", completion="5")]
REPLIES = [
    "Instruction: Write a haiku about rain.\nOutput: drops",  # new
    "name three colours!",                                    # duplicate of a seed (normalised)
    "Name three bright colours.",                             # ROUGE-L 0.857 with a seed
    "   ",                                                    # empty
    "Write a short haiku about rain.",                        # ROUGE-L 0.909 with the first: near duplicate
    "List two animals.",                                      # new, but its answer is empty
]
OUTPUTS = {"Write a haiku about rain.": "Rain taps the roof", "List two animals.": ""}


def script_instructions():
    """Request 1 gets the first three replies, request 2 the rest; an instruction gets its OUTPUTS entry."""
    replies = [REPLIES[:3], REPLIES[3:]]

    def script(asked):
        text = asked[0]["content"]
        return [OUTPUTS[text]] if text in OUTPUTS else replies.pop(0)

    return script


def test_instructions_are_deduplicated_against_seeds_and_each_other_then_answered():
    ins = task(Instructions, task="instructions", requests=2, seedsPerRequest=1, candidates=3, maxSimilarity=0.7)
    units = ins.units(SEEDS)
    assert units == [0, 1]
    sampler = ScriptedSampler(lambda asked: [])
    requests = [ins.request(u) for u in units]
    assert {r.split("\n\n")[1] for r in requests} == {"Instruction: Name three colours.\nOutput: red, green, blue",
                                                       "Instruction: Add 2 and 3.\nOutput: 5"}
    # the seed each request shows depends only on the seed and the request: the same again
    assert [ins.request(u) for u in units] == requests
    sampler.script = script_instructions()
    records, line = ins.batch(units, sampler, 0)
    assert records == [{"prompt": "Write a haiku about rain.", "completion": "Rain taps the roof"}]
    assert line == {"generated": 6, "empty": 1, "duplicate": 1, "similar_to_seed": 1, "near_duplicate": 1,
                    "empty_outputs": 1, "kept": 1}
    ask, answer = sampler.calls
    assert ask[0][0][0]["role"] == "user" and ask[1] == {"n": 3, "max_new_tokens": 256, "temperature": 1.0,
                                                         "top_p": 1.0}
    assert [p[0]["content"] for p in answer[0]] == ["Write a haiku about rain.", "List two animals."]
    assert OUTPUTS["List two animals."] == ""  # answered with nothing: dropped, counted in empty_outputs
    assert answer[1]["n"] == 1
    assert ins.summary()["seeds"] == 2


def test_an_instructions_job_that_keeps_nothing_fails_with_the_count():
    ins = task(Instructions, task="instructions", requests=1, candidates=2)
    ins.units(SEEDS)
    records, _ = ins.batch([0], ScriptedSampler(lambda asked: ["Name three colours.", ""]), 0)
    with pytest.raises(ValueError, match=r"^spec.generate: 0 of 2 generated instructions kept: 1 empty, "
                                         r"1 duplicate; nothing was written"):
        ins.finish(records)


def test_instruction_replies_are_cleaned_to_the_instruction():
    assert clean_instruction("Task 4: Sort these numbers.\n\nOutput: 1 2 3") == "Sort these numbers."
    assert clean_instruction("- Translate 'cat' to French.\nAnswer: chat") == "Translate 'cat' to French."
    assert clean_instruction("New instruction: Explain gravity\nin one sentence.") == \
        "Explain gravity\nin one sentence."
    assert clean_instruction("Output: nothing") == ""


def test_rouge_l_dedup_and_diversity_on_a_hand_computed_set():
    # LCS("write a short haiku about rain", "write a haiku about rain") = 5: P 5/6, R 5/5, F = 10/11
    assert textstats.rouge_l(textstats.words("Write a short haiku about rain."),
                             textstats.words("Write a haiku about rain")) == pytest.approx(10 / 11, abs=1e-6)
    pool = textstats.Dedup(max_similarity=0.9, seeds=["Write a haiku about rain"])
    assert pool.check("Write a short haiku about rain.") == "similar_to_seed"  # 0.909 > 0.9
    assert pool.check("Write a long, sad haiku about rain.") == "new"  # LCS 5: P 5/7, R 5/5 -> 0.833
    assert pool.check("WRITE a long sad haiku about rain") == "duplicate"
    assert pool.check("Write a long, sad haiku about the rain.") == "near_duplicate"  # LCS 7: P 7/8, R 7/7 -> 0.933
    report = textstats.diversity(["the cat sat", "the cat ran away", "a dog"])
    # words: the cat sat | the cat ran away | a dog -> 9 unigrams, 7 distinct; 6 bigrams, 5 distinct
    assert report == {"distinct_1": pytest.approx(7 / 9, abs=1e-6), "distinct_2": pytest.approx(5 / 6, abs=1e-6),
                      "length_words": {"min": 2, "median": 3, "max": 4, "stdev": 1.0}}
    assert textstats.diversity([]) == {"distinct_1": None, "distinct_2": None,
                                       "length_words": {"min": None, "median": None, "max": None, "stdev": None}}


# ---- the fields of spec.generate ---------------------------------------------------------------

@pytest.mark.parametrize("generate, path, text", [
    ({"task": "traces", "judge": {"model": "j"}}, "spec.generate.judge", "is read by task preference_pairs, not "
     "traces; remove it"),
    ({"task": "traces", "requests": 8}, "spec.generate.requests", "is read by task instructions, not traces"),
    ({"task": "instructions", "keepPerPrompt": 2}, "spec.generate.keepPerPrompt", "is read by task traces"),
    ({"task": "instructions", "minMargin": 0.2}, "spec.generate.minMargin", "is read by task preference_pairs"),
    ({"task": "preference_pairs", "judge": {"model": "j"}, "verify": False}, "spec.generate.verify",
     "is read by task traces, not preference_pairs"),
    ({"task": "traces", "traceTemplate": "Solve it."}, "spec.generate.traceTemplate",
     "the trace template must contain {prompt}"),
    ({"task": "traces", "traceTemplate": "{prompt} {style}"}, "spec.generate.traceTemplate",
     "unknown placeholders ['style']"),
    ({"task": "traces", "keepPerPrompt": 5}, "spec.generate.keepPerPrompt", "cannot exceed candidates (4)"),
    ({"task": "traces", "answer": {"metric": "chrf"}}, "spec.generate.answer.metric", "use match"),
    ({"task": "traces", "answer": {"extract": "regex"}}, "spec.generate.answer.pattern", "needs a pattern"),
    ({"task": "traces", "candidates": 0}, "spec.generate.candidates", "must be at least 1"),
    ({"task": "instructions", "instructionTemplate": "Write a task."}, "spec.generate.instructionTemplate",
     "must contain {examples}"),
    ({"task": "instructions", "outputTemplate": "{prompt}"}, "spec.generate.outputTemplate",
     "must contain {instruction}"),
    ({"task": "instructions", "maxSimilarity": 0}, "spec.generate.maxSimilarity", "greater than 0"),
    ({"task": "instructions", "seedsPerRequest": 0}, "spec.generate.seedsPerRequest", "greater than or equal to 1"),
])
def test_bad_task_fields_name_the_field_and_the_fix(generate, path, text):
    [(got, message)] = errors(generate_doc(**generate))
    assert got == path and text in message, (got, message)


@pytest.mark.parametrize("generate", [{"task": "traces", "keepPerPrompt": 2, "verify": False},
                                      {"task": "instructions", "requests": 4, "chat": False}])
def test_a_resolved_traces_or_instructions_spec_validates_again_and_has_no_reward_role(generate):
    job = parse_job(generate_doc(**generate))
    again = parse_job({"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
                       "metadata": {"name": "again"}, "spec": job.spec.wire()})
    assert again.spec == job.spec
    assert job.spec.ray_roles() == ("rollout",)
    doc = generate_doc(**generate)
    doc["spec"]["roles"] = {"reward": {"replicas": 1}}
    assert errors(doc) == [("spec.roles.reward", f"task {generate['task']} has no judge and runs on "
                                                 "roles.rollout only; remove roles.reward")]


# ---- the chain-of-thought distillation example --------------------------------------------------

def test_the_distill_cot_example_pairs_a_verified_traces_job_with_a_cot_student(tmp_path):
    import importlib.util

    from support import REPO

    folder = REPO / "examples" / "distill-cot"
    spec = importlib.util.spec_from_file_location("distill_cot_make_data", folder / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    train, heldout = make_data.build(n_train=40, n_heldout=20, seed=3)
    assert (len(train), len(heldout)) == (40, 20)
    assert not {r["prompt"][0]["content"] for r in train} & {r["prompt"][0]["content"] for r in heldout}
    assert all(isinstance(r["answer"], int) and r["answer"] >= 0 for r in train + heldout)
    assert make_data.build(n_train=40, n_heldout=20, seed=3) == (train, heldout)

    from posttrain.api.load import load_job

    traces, student = load_job(folder / "traces.yaml").spec, load_job(folder / "sft.yaml").spec
    assert traces.generate.task == "traces" and traces.generate.verify and traces.generate.keep_per_prompt == 2
    assert traces.data.train[0].source.endswith("demo-output/distill-cot/train.jsonl")
    assert student.data.train[0].source == "ptj://cot-traces" and student.data.train[0].format == "cot"
    assert student.evaluation.data.endswith("demo-output/distill-cot/heldout.jsonl")


def test_the_readme_shows_the_default_templates():
    from support import REPO

    from posttrain.api.generate import DEFAULT_INSTRUCTION, DEFAULT_TRACE

    readme = [line.strip() for line in (REPO / "README.md").read_text().splitlines()]
    for template in (DEFAULT_TRACE, DEFAULT_INSTRUCTION):
        lines = [line.strip() for line in template.splitlines()]
        assert any(readme[i:i + len(lines)] == lines for i in range(len(readme))), template


def test_an_extractor_that_does_not_import_names_the_generate_field():
    with pytest.raises(ValueError, match=r"^spec.generate.answer.extract: "):
        task(Traces, task="traces", answer={"extract": "no_such_module_x:fn"})
