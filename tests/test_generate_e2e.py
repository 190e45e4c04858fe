"""generate's traces and instructions tasks on a tiny model, on one local Ray (transformers engine).

    .venv/bin/python -m pytest tests/test_generate_e2e.py -q

`posttrain run traces.yaml sft.yaml` writes verified traces and trains a student on `ptj://traces` with
`format: cot`; a verifier that can read no answer fails the job with the count and writes no data set;
an instructions job writes deduplicated {prompt, completion} records with its diversity report. The
exact mechanics (keep rate, dedup, diversity numbers) are in test_generate_tasks.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tiny
from support import jobs

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from posttrain.jobs import cli  # noqa: E402
from posttrain.jobs.algorithms import textstats  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gen")
    tiny.make_model(root / "model")
    records = [{"prompt": r["prompt"], "answer": int(r["completion"].split()[-1]) if i % 2 else None}
               for i, r in enumerate(tiny.arith_records(8))]
    tiny.write_jsonl(root / "questions.jsonl", records)  # every second record has no answer: kept unverified
    tiny.write_jsonl(root / "seeds.jsonl", tiny.arith_records(6))
    return root


def generate_doc(name: str, source: str, **generate) -> dict:
    doc = jobs.document("generate", name=name, data={"train": [{"source": source}]},
                        generate={"maxNewTokens": 8, "promptsPerBatch": 4, **generate})
    doc["spec"]["roles"] = {"rollout": {"engine": "transformers"}}
    doc["spec"]["training"] = {"seed": 0, "maxSeqLength": 96}
    return doc


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_traces_then_sft_on_ptj_with_format_cot(root, ray_local):
    traces = generate_doc("traces", "questions.jsonl", task="traces", candidates=2, keepPerPrompt=2,
                          traceTemplate="{prompt}", answer={"extract": "full"})
    student = jobs.document("sft", name="student", data={"train": [{"source": "ptj://traces", "format": "cot"}]},
                            training={**jobs.SFT_SPEC["training"], "maxSteps": 2})
    (root / "traces.yaml").write_text(yaml.safe_dump(traces))
    (root / "sft.yaml").write_text(yaml.safe_dump(student))
    out = root / "out"
    assert cli.main(["run", str(root / "sft.yaml"), str(root / "traces.yaml"), "--output", str(out)]) == 0

    summary = json.loads((out / "traces" / "summary.json").read_text())
    records = read(out / "traces" / "data" / "train.jsonl")
    assert summary["status"] == "succeeded" and summary["records"] == summary["kept"] == len(records) > 0
    assert summary["traces"] == 16 and summary["prompts"] == 8
    # a trace read whole ("full") never equals a number: the answered records' traces are all rejected
    assert summary["wrong"] + summary["no_answer"] >= 8 and summary["correct"] == 0
    assert summary["keep_rate"] == round(len(records) / 16, 6)
    unanswered = {r["prompt"] for i, r in enumerate(tiny.arith_records(8)) if i % 2 == 0}
    assert all(r["prompt"] in unanswered and r["verified"] is False for r in records)
    assert all(set(r) == {"prompt", "reasoning", "answer", "verified"} for r in records)
    metrics = read(out / "traces" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and sum(m["kept"] for m in metrics) == len(records)

    manifest = json.loads((out / "traces" / "data" / "manifest.json").read_text())
    assert manifest["task"] == "traces" and manifest["records"] == len(records) and manifest["format"] == "cot"
    assert manifest["model"]["source"] == "model" and manifest["templates"] == {"traceTemplate": "{prompt}"}
    assert manifest["sampling"] == {"candidates": 2, "maxNewTokens": 8, "temperature": 1.0, "topP": 1.0, "seed": 0,
                                    "promptsPerBatch": 4}
    assert manifest["verification"].startswith("partial:") and manifest["keep_rate"] == summary["keep_rate"]
    assert manifest["counts"]["kept"] == len(records) and manifest["created"].endswith("Z")

    sft = json.loads((out / "student" / "summary.json").read_text())
    run = json.loads((out / "student" / "run.json").read_text())
    assert sft["status"] == "succeeded" and sft["steps"] == 2
    assert run["spec"]["data"]["train"][0]["source"] == str(out / "traces" / "data" / "train.jsonl")
    assert sft["data"]["train_examples"] == len(records)


def test_a_verifier_that_reads_no_answer_fails_with_the_count_and_writes_no_data(root, ray_local):
    doc = generate_doc("reject", "questions.jsonl", task="traces", candidates=2,
                       answer={"extract": "regex", "pattern": "NEVER(\\d+)"})
    from posttrain.jobs.run.context import RunFailed

    with pytest.raises(RunFailed, match=r"^ValueError: spec.generate: 0 of 16 traces kept: 16 with no answer read by "
                                         r"answer.extract regex; nothing was written"):
        jobs.run_local(doc, root, "reject")
    summary = json.loads((root / "reject" / "summary.json").read_text())
    assert summary["status"] == "failed" and "0 of 16 traces kept" in summary["error"]
    assert summary["traces"] == 16 and summary["kept"] == 0
    assert not (root / "reject" / "data").exists()


def test_instructions_are_new_deduplicated_and_reported(root, ray_local):
    doc = generate_doc("instructions", "seeds.jsonl", task="instructions", requests=6, candidates=2,
                       seedsPerRequest=2, instructionTemplate="{examples}\n\nInstruction:", maxSimilarity=0.5)
    doc["spec"]["training"]["maxSeqLength"] = 256
    summary = jobs.run_local(doc, root, "instructions")
    assert summary["status"] == "succeeded", summary.get("error")
    records = read(root / "instructions" / "data" / "train.jsonl")
    assert summary["kept"] == len(records) > 0 and summary["generated"] == 12 and summary["seeds"] == 6
    dropped = sum(summary[k] for k in ("empty", "duplicate", "similar_to_seed", "near_duplicate", "empty_outputs"))
    assert dropped + summary["kept"] == 12 and summary["requests_too_long"] == 0
    assert all(set(r) == {"prompt", "completion"} and r["prompt"] and r["completion"] for r in records)
    seeds = [r["prompt"] for r in tiny.arith_records(6)]
    for i, r in enumerate(records):  # nothing kept is close to a seed or to another kept instruction
        w = textstats.words(r["prompt"])
        assert all(textstats.rouge_l(w, textstats.words(s)) <= 0.5 for s in seeds)
        assert all(textstats.rouge_l(w, textstats.words(o["prompt"])) <= 0.5 for o in records[:i])
    manifest = json.loads((root / "instructions" / "data" / "manifest.json").read_text())
    assert manifest["diversity"] == summary["diversity"] == {
        "instructions": textstats.diversity([r["prompt"] for r in records]),
        "outputs": textstats.diversity([r["completion"] for r in records])}
    assert manifest["format"] == "prompt_completion" and manifest["seeds"] == 6
    assert manifest["templates"]["instructionTemplate"] == "{examples}\n\nInstruction:"
