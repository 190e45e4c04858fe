"""The contract between operator and driver: the ConfigMap's job.json runs with `python -m posttrain.jobs`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from posttrain.api.load import parse_job
from posttrain.operator import builders, vocab


@pytest.mark.slow
def test_the_rayjob_entrypoint_runs_the_configmaps_spec(tmp_path, tiny_model, tiny_train, job_dict, cache_dir):
    job_dict["metadata"]["namespace"] = "ml"
    job_dict["spec"]["model"]["source"] = str(tiny_model)
    job_dict["spec"]["data"]["train"][0]["source"] = f"file://{tiny_train}"
    job_dict["spec"]["adapter"] = {"type": "lora"}
    job_dict["spec"]["training"]["maxSteps"] = 2
    configmap = builders.build_configmap(parse_job(job_dict), owner_uid="u")
    spec_file = tmp_path / vocab.SPEC_FILE
    spec_file.write_text(configmap["data"][vocab.SPEC_FILE])
    out = tmp_path / "out"

    result = subprocess.run([sys.executable, "-m", "posttrain.jobs", "--spec", str(spec_file), "--metrics-port", "0",
                             "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 2 and summary["job"] == "tiny-sft"
    assert (out / "adapter" / "adapter_config.json").exists()


def test_the_entrypoint_rejects_a_bad_spec_with_exit_code_2(tmp_path):
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps({"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
                                     "metadata": {"name": "x"}, "spec": {"algorithm": "sft"}}))
    result = subprocess.run([sys.executable, "-m", "posttrain.jobs", "--spec", str(spec_file)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "spec.model: required field is missing" in result.stderr
