"""Jobs whose model, data, checkpoints and output all live in object storage (S3 through s3fs).

    pytest -m slow tests/test_object_storage_e2e.py

The S3 API is moto's server on loopback (`s3` fixture); its address and credentials are in the
environment before Ray starts, so every worker reaches it the way a pod given them by a Secret
would. Nothing in these runs reads a local copy of the output: a rerun finds its checkpoints,
metrics and "finished" state in the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import tiny
from support import jobs
from posttrain.api.load import parse_job
from posttrain.jobs import driver
from posttrain.jobs.run import storage

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def bucket(s3, tmp_path_factory) -> str:
    """A bucket holding a tiny model and its data, uploaded the way a user would."""
    root = tmp_path_factory.mktemp("s3-src")
    name = s3.bucket("store")
    storage.upload_tree(tiny.make_model(root / "model"), storage.resolve(f"s3://{name}/models/tiny"))
    data = tiny.write_jsonl(root / "data" / "train.jsonl", tiny.arith_records(64))
    storage.upload_tree(data.parent, storage.resolve(f"s3://{name}/data"))
    return name


@pytest.fixture(scope="module")
def ray_after_s3(s3, ray_local):
    """The shared local Ray, started after the S3 settings are in the environment (its workers inherit them)."""
    yield


def s3_json(uri: str) -> dict:
    return json.loads(storage.read_text(storage.resolve(uri)) or "null")


def s3_names(uri: str) -> list[str]:
    return storage.list_names(storage.resolve(uri))


def download(uri: str, dest: Path) -> Path:
    return storage.download_tree(storage.resolve(uri), dest)


def test_sft_killed_mid_run_resumes_from_checkpoints_in_the_bucket(bucket, tmp_path, cache_dir):
    out = f"s3://{bucket}/runs/sft"
    doc = {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob", "metadata": {"name": "s3-sft"},
           "spec": {"algorithm": "sft", "model": {"source": f"s3://{bucket}/models/tiny"},
                    "adapter": {"type": "lora", "r": 8, "alpha": 16},
                    "data": {"train": [{"source": f"s3://{bucket}/data/train.jsonl"}]},
                    "training": {"maxSteps": 30, "learningRate": 5e-3, "globalBatchSize": 8, "microBatchSize": 4,
                                 "maxSeqLength": 64},
                    "checkpoint": {"everySteps": 3, "keep": 1}, "output": {"uri": out}}}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "posttrain.jobs.cli", "run", str(job)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = f"{out}/checkpoints"
    deadline = time.time() + 300
    while not storage.exists(storage.resolve(f"{ckpts}/checkpoint-6/.posttrain-complete")):
        assert proc.poll() is None, "the run ended before checkpoint-6"
        assert time.time() < deadline, "no checkpoint-6 in the bucket within 300 s"
        time.sleep(0.2)
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
    proc.wait()
    assert (s3_json(f"{out}/summary.json") or {}).get("status") != "succeeded"

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = s3_json(f"{out}/summary.json")
    assert summary["status"] == "succeeded" and summary["steps"] == 30
    assert summary["resumed_from_step"] >= 6 and summary["resumed_from_step"] % 3 == 0
    assert summary["artifact"]["path"] == f"{out}/adapter"
    steps = [json.loads(line)["step"] for line in storage.read_text(storage.resolve(f"{out}/metrics.jsonl")).splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 30 and steps[0] == 1, steps
    assert s3_names(ckpts) == ["checkpoint-30"], "keep: 1 leaves only the newest, complete checkpoint"
    # prepared-data: the tokenized rows the driver wrote once for the Ray Train workers to read
    assert sorted(s3_names(out)) == ["adapter", "checkpoints", "metrics.jsonl", "prepared-data", "run.json",
                                     "summary.json"]
    adapter = download(f"{out}/adapter", tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "posttrain.json"} <= \
        {p.name for p in adapter.iterdir()}

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 2 and "holds a finished run" in rerun.stderr  # read from the bucket, not a cache


def test_grpo_fails_mid_run_and_resumes_from_the_bucket_writing_the_adapter_there(bucket, tmp_path, ray_after_s3,
                                                                                cache_dir):
    jobs.copy_rewards(tmp_path)
    (tmp_path / "FAIL_AT").write_text("3")
    out = f"s3://{bucket}/runs/grpo"
    doc = {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob", "metadata": {"name": "s3-grpo"},
           "spec": {"algorithm": "grpo", "model": {"source": f"s3://{bucket}/models/tiny"},
                    "adapter": {"type": "lora", "r": 8, "alpha": 16},
                    "data": {"train": [{"source": f"s3://{bucket}/data/train.jsonl"}]},
                    "training": {"maxSteps": 4, "learningRate": 0.02, "lrScheduler": "constant", "maxSeqLength": 64},
                    "rl": {"groupSize": 4, "promptsPerStep": 4, "maxNewTokens": 8},
                    "roles": {"rollout": {"engine": "transformers"}},
                    "rewards": [{"function": "rl_rewards.py:flaky"}],
                    "checkpoint": {"everySteps": 2}, "output": {"uri": out}}}
    job = parse_job(doc, require_available=True)
    with pytest.raises(driver.RunFailed, match="verifier crashed"):
        driver.run(job, driver.RunOptions(base_dir=tmp_path))
    assert s3_json(f"{out}/summary.json")["status"] == "failed"
    assert s3_names(f"{out}/checkpoints") == ["checkpoint-2"]
    assert {".posttrain-complete", "driver.json", "learner"} <= set(s3_names(f"{out}/checkpoints/checkpoint-2"))
    assert any(n.endswith(".distcp") for n in s3_names(f"{out}/checkpoints/checkpoint-2/learner"))

    (tmp_path / "FAIL_AT").unlink()
    summary = driver.run(job, driver.RunOptions(base_dir=tmp_path))
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4
    assert s3_json(f"{out}/summary.json")["status"] == "succeeded"
    lines = storage.read_text(storage.resolve(f"{out}/metrics.jsonl")).splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    adapter = download(f"{out}/adapter", tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json"} <= \
        {p.name for p in adapter.iterdir()}
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(download(f"s3://{bucket}/models/tiny", tmp_path / "base"))
    PeftModel.from_pretrained(base, str(adapter))  # loads as written
