"""RLAIF end to end on tiny models, on one local Ray: GRPO with judge rewards, and a generate job's pairs.

    .venv/bin/python -m pytest tests/test_rlaif_e2e.py -q

One GRPO run carries three judges at once (pointwise by probabilities, pairwise by probabilities,
and a reply judge whose replies never match its `parse`, with onError skip), so the run shows each
logged, the pairwise win rates averaging 0.5 per group, and the unreadable replies counted. The
generate run writes judge-labelled pairs that read back as preference data.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from support import jobs

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from posttrain.api.load import parse_job  # noqa: E402
from posttrain.jobs import driver  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rlaif")
    tiny.make_model(root / "model")
    tiny.make_model(root / "judge", seed=1)
    tiny.write_jsonl(root / "train.jsonl", tiny.arith_records(12))
    return root


run = jobs.run_local


def lines(root: Path, out: str, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (root / out / name).read_text().splitlines()]


JUDGE = {"model": "judge", "engine": "transformers"}


def test_grpo_with_pointwise_pairwise_and_unreadable_judges(workdir, ray_local):
    doc = jobs.document("grpo", name="rlaif-grpo", rewards=[
        {"judge": JUDGE, "name": "quality"},
        {"judge": {**JUDGE, "mode": "pairwise"}, "name": "preference", "weight": 0.5},
        {"judge": {**JUDGE, "verdict": "reply", "parse": "VERDICT=(\\d+)", "maxNewTokens": 4}, "name": "unread",
         "onError": "skip", "weight": 0.0},
    ])
    doc["spec"]["training"]["maxSteps"] = 2
    # 3 prompts x 3 samples on 2 reward actors: the batch is split by prompt (6 + 3), never inside a group
    doc["spec"]["rl"] = {"groupSize": 3, "promptsPerStep": 3, "maxNewTokens": 6}
    doc["spec"]["roles"] = {"rollout": {"engine": "transformers"}, "reward": {"replicas": 2}}
    summary = run(doc, workdir, "grpo")
    assert summary["status"] == "succeeded"
    assert summary["roles"]["reward"]["rewards"] == ["quality", "preference", "unread"]
    assert summary["roles"]["reward"]["actors"] == 2
    metrics = lines(workdir, "grpo")
    assert len(metrics) == 2
    for m in metrics:
        assert 0.0 < m["reward_quality"] < 1.0
        # every group's win rates average 0.5 (each comparison gives p to one side and 1 - p to the other)
        assert m["reward_preference"] == pytest.approx(0.5, abs=1e-4)
        assert m["reward_skipped"] == 9 and m["reward_unscored"] == 0  # no reply matched; nothing else skipped
        assert m.get("reward_unread") is None


def test_generate_writes_judge_labelled_pairs_a_preference_job_reads(workdir, ray_local, s3, tmp_path):
    """Written to object storage (the driver publishes the data set; the actors never touch the bucket)."""
    from posttrain.jobs.run import storage

    doc = jobs.document("generate", name="pairs", generate={
        "task": "preference_pairs", "candidates": 3, "maxNewTokens": 6, "promptsPerBatch": 4,
        "judge": {**JUDGE, "mode": "pairwise"}})
    doc["spec"]["roles"] = {"rollout": {"engine": "transformers"}}
    doc["spec"]["training"] = {"seed": 3, "maxSeqLength": 64}
    out = f"s3://{s3.bucket()}/runs/pairs"
    summary = driver.run(parse_job(doc, require_available=True), driver.RunOptions(output=out, base_dir=workdir))
    assert summary["status"] == "succeeded"
    assert summary["artifact"] == {"kind": "dataset", "path": f"{out}/data/train.jsonl", "records": summary["records"],
                                   "manifest": f"{out}/data/manifest.json"}
    manifest = json.loads(storage.read_text(storage.resolve(f"{out}/data/manifest.json")))
    assert manifest["task"] == "preference_pairs" and manifest["records"] == summary["records"]
    assert manifest["judge"]["mode"] == "pairwise" and manifest["counts"]["pairs_written"] == summary["records"]
    text = storage.read_text(storage.resolve(f"{out}/data/train.jsonl"))
    records = [json.loads(line) for line in text.splitlines()]
    assert summary["pairs_written"] == len(records) == summary["records"]
    assert summary["pairs_written"] + summary["ties_dropped"] + summary["unjudged_prompts"] == 12
    assert summary["unparseable_verdicts"] == 0 and len(records) >= 6
    prompts = {r["prompt"] for r in tiny.arith_records(12)}
    for r in records:
        assert {"prompt", "chosen", "rejected"} <= set(r)
        assert all(isinstance(r[k], str) for k in ("prompt", "chosen", "rejected"))
        assert r["prompt"] in prompts and r["chosen"] != r["rejected"]
        assert r["chosen_score"] > r["rejected_score"] and 0 <= r["judge_preference"] <= 1
    # the file is preference data as a data loader reads it
    from datasets import load_dataset

    (tmp_path / "train.jsonl").write_text(text)
    ds = load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="train")
    assert ds.num_rows == len(records) and {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    metrics = [json.loads(line) for line in storage.read_text(storage.resolve(f"{out}/metrics.jsonl")).splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and sum(m["pairs"] for m in metrics) == len(records)
    assert summary["roles"]["reward"]["mode"] == "pairwise"
