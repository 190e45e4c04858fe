"""A killed run resumes from its last complete checkpoint; bad input fails loudly and writes nothing.

These drive the real `posttrain` command in a subprocess, as a user would.
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

from posttrain.jobs.cli import main as cli_main

POSTTRAIN = [sys.executable, "-m", "posttrain.jobs.cli"]


@pytest.fixture
def workdir(tmp_path, tiny_model, tiny_train, cache_dir) -> Path:
    (tmp_path / "model").symlink_to(tiny_model)
    (tmp_path / "train.jsonl").symlink_to(tiny_train)
    return tmp_path


def write_job(workdir: Path, doc: dict, name: str = "job.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(doc))
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_killed_run_resumes_from_last_checkpoint_and_ends_with_the_same_steps(workdir, job_dict):
    spec = job_dict["spec"]
    spec["adapter"] = {"type": "lora", "r": 8, "alpha": 16}
    spec["training"].update({"maxSteps": 40, "learningRate": 5e-3})
    spec["checkpoint"] = {"everySteps": 3, "keep": 2}
    job = write_job(workdir, job_dict)
    out = workdir / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    proc = subprocess.Popen([*POSTTRAIN, "run", str(job), "--output", str(out)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    marker = out / "checkpoints" / "checkpoint-6" / ".posttrain-complete"
    deadline = time.time() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint-6 within 300 s"
        time.sleep(0.1)
    # Kill the whole session (driver, raylet, workers) at once, as a lost pod or laptop would.
    subprocess.run(["pkill", "-KILL", "-s", str(proc.pid)], check=False)
    proc.wait()
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout.strip():
        assert time.time() < deadline, "processes of the killed run are still alive"
        time.sleep(0.2)

    from posttrain.jobs.run import storage
    from posttrain.jobs.run.checkpoints import Checkpoints

    path, step = Checkpoints(storage.resolve(str(out / "checkpoints"))).latest()
    assert step >= 6 and step % 3 == 0
    assert step < 40, "the run finished before it could be killed; make it longer"
    assert not (out / "summary.json").exists() or json.loads((out / "summary.json").read_text())["status"] != "succeeded"

    again = subprocess.run([*POSTTRAIN, "run", str(job), "--output", str(out)], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from step {step}" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded"
    assert summary["resumed_from_step"] == step
    assert summary["steps"] == 40
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 41)), "every step logged exactly once across both runs"
    assert summary["first_loss"] == lines[0]["loss"]
    kept = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept == ["checkpoint-39", "checkpoint-40"], "keep: 2 keeps the two newest"


BAD_INPUTS = [
    # (change to the spec, exit code, text the error must contain)
    (lambda s: s["data"]["train"][0].update(source="missing.jsonl"), 2, "spec.data.train[0].source"),
    (lambda s: s["training"].update(maxStep=3), 2, "spec.training.maxStep"),
    (lambda s: s.update(adapter={"type": "lorra"}), 2, "spec.adapter.type"),
    (lambda s: s["model"].update(source="no-such-model"), 2, "spec.model.source"),
    (lambda s: s.update(algorithm="distill", teacher={"source": "model"}), 2, "not available in this version"),
]


@pytest.mark.parametrize("change,code,text", BAD_INPUTS, ids=["missing-data", "unknown-field", "unknown-adapter",
                                                              "missing-model", "unavailable-algorithm"])
def test_bad_input_fails_naming_the_field_and_leaves_the_output_alone(change, code, text, workdir, job_dict, capsys,
                                                                     unshipped):
    out = workdir / "out"
    out.mkdir()
    (out / "run.json").write_text('{"job": "tiny-sft"}\n')
    (out / "summary.json").write_text('{"status": "failed"}\n')
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (out / "checkpoints" / "checkpoint-1" / ".posttrain-complete").write_text("1\n")
    before = snapshot(out)

    change(job_dict["spec"])
    rc = cli_main(["run", str(write_job(workdir, job_dict)), "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == code
    assert text in err
    assert snapshot(out) == before


def test_a_folder_that_is_not_a_run_is_refused(workdir, job_dict, capsys):
    out = workdir / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    rc = cli_main(["run", str(write_job(workdir, job_dict)), "--output", str(out)])
    assert rc == 2
    assert "not a posttrain run" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
