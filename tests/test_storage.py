"""Storage that holds across pods: the same operations on a filesystem path and on object storage.

Object storage is a real S3 API (moto's server on loopback, the `s3` fixture) reached through s3fs,
as a job pod reaches S3 with credentials from a Secret.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from posttrain.jobs.run import outputs, storage
from posttrain.jobs.run.checkpoints import COMPLETE_MARKER, Checkpoints


def tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def remote_files(loc: storage.Location) -> dict[str, str]:
    fs = storage.filesystem(loc.remote)
    prefix = loc.remote.split("://", 1)[1] + "/"
    return {str(k)[len(prefix):]: fs.cat_file(k).decode() for k in fs.find(loc.remote)}


@pytest.fixture(params=["path", "s3"])
def place(request, tmp_path):
    """A fresh location of either kind."""
    if request.param == "path":
        return storage.resolve(str(tmp_path / "place"))
    s3 = request.getfixturevalue("s3")
    return storage.resolve(f"s3://{s3.bucket()}/runs/a")


def read_tree(loc: storage.Location) -> dict[str, str]:
    if loc.remote:
        return remote_files(loc)
    return {rel: (loc.local / rel).read_text() for rel in storage.files_below(loc.local)}


def test_publish_tree_gives_the_same_layout_on_every_rerun_and_drops_stale_files(place, tmp_path):
    dest = place.child("model")
    storage.publish_tree(tree(tmp_path / "v1", {"config.json": "1", "w/a.bin": "a1", "old.bin": "x"}), dest)
    storage.publish_tree(tree(tmp_path / "v2", {"config.json": "2", "w/a.bin": "a2"}), dest)
    storage.publish_tree(tree(tmp_path / "v3", {"config.json": "3", "w/a.bin": "a3"}), dest)
    # fsspec's recursive put nested a second upload under model/v2/...; the swap/upload does not
    assert read_tree(dest) == {"config.json": "3", "w/a.bin": "a3"}


def test_a_failed_publish_leaves_the_previous_result_whole(tmp_path):
    dest = storage.resolve(str(tmp_path / "out" / "model"))
    storage.publish_tree(tree(tmp_path / "v1", {"config.json": "1", "weights.bin": "w1"}), dest)
    broken = tree(tmp_path / "v2", {"config.json": "2"})
    (broken / "weights.bin").symlink_to(tmp_path / "missing")  # copying it fails half way
    with pytest.raises(Exception):
        storage.publish_tree(broken, dest)
    assert read_tree(dest) == {"config.json": "1", "weights.bin": "w1"}  # delete-then-copy lost this
    assert sorted(p.name for p in dest.local.parent.iterdir()) == ["model"], "no partial copy left behind"


def test_text_files_and_listing(place):
    assert storage.read_text(place.child("run.json")) is None and storage.list_names(place) == []
    storage.write_text(place.child("run.json"), "{}")
    storage.write_text(place.child("checkpoints", "checkpoint-2", "x"), "y")
    assert storage.read_text(place.child("run.json")) == "{}"
    assert storage.list_names(place) == ["checkpoints", "run.json"]
    storage.remove(place.child("checkpoints"))
    assert storage.list_names(place) == ["run.json"] and not storage.exists(place.child("checkpoints"))


def test_checkpoints_count_only_when_marked_and_rotate_after_the_newest_is_marked(place):
    ckpts = Checkpoints(place.child("checkpoints"))
    for step in (2, 4, 6):
        storage.write_text(ckpts.folder(step).child("shard-0"), str(step))
    ckpts.mark_complete(2)
    ckpts.mark_complete(4)
    assert ckpts.latest()[1] == 4 and ckpts.complete_steps() == [2, 4]  # 6 is still being written
    assert ckpts.rotate(keep=1) == [2]
    assert ckpts.steps() == [4, 6], "an unfinished newer checkpoint is never deleted"
    ckpts.mark_complete(6)
    assert ckpts.rotate(keep=1) == [4] and ckpts.latest()[0].uri.endswith("checkpoint-6")
    assert storage.exists(ckpts.folder(6).child(COMPLETE_MARKER))


def test_run_folder_reads_the_output_itself(place, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    folder = outputs.RunFolder(place)
    assert folder.prepare(overwrite=False) == "fresh"
    folder.pull()
    outputs.write_json(folder.path(outputs.RUN_FILE), {"job": "a"})
    folder.path(outputs.METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n')
    folder.push()
    assert outputs.RunFolder(place).inspect() == "resumable"  # a new pod sees it: no local cache needed
    outputs.write_json(folder.path(outputs.SUMMARY_FILE), {"status": "succeeded"})
    folder.push()
    storage.write_text(place.child("data", "train.jsonl"), '{"prompt": "p"}\n')  # a generate job's result
    other = outputs.RunFolder(place)
    with pytest.raises(outputs.OutputInUse, match="finished run"):
        other.prepare(overwrite=False)
    other.pull()
    assert outputs.read_metrics(other.path(outputs.METRICS_FILE)) == [{"step": 1, "loss": 2.0}]
    other.clear()
    assert other.inspect() == "fresh" and not storage.exists(place.child("data", "train.jsonl"))
    storage.write_text(place.child("notes.txt"), "mine")
    with pytest.raises(outputs.OutputInUse, match="not a posttrain run"):
        other.inspect()


def test_fetch_downloads_once_per_pod_and_leaves_weights_out_when_asked(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    src = storage.resolve(f"s3://{s3.bucket()}/models/m")
    storage.upload_tree(tree(tmp_path / "m", {"config.json": "{}", "tokenizer.json": "t",
                                              "model.safetensors": "w"}), src)
    light = storage.fetch(src, weights=False)
    assert sorted(p.name for p in light.iterdir()) == ["config.json", "tokenizer.json"]
    full = storage.fetch(src)
    assert sorted(p.name for p in full.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    stamp = (full / "config.json").stat().st_mtime_ns
    assert storage.fetch(src) == full and (full / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileNotFoundError, match="does not exist"):
        storage.fetch(storage.resolve(f"s3://{s3.bucket()}/nothing"))


def test_an_incomplete_last_metrics_line_does_not_block_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.5}\n{"step": 2, "loss": 1.2}\n{"step": 3, "lo')  # killed mid-append
    kept = outputs.restore_metrics(path, after_step=2, log_history=[])
    assert kept == [{"step": 1, "loss": 1.5}, {"step": 2, "loss": 1.2}]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        outputs.read_metrics(path)


def test_sft_leaves_rotation_to_the_marker_aware_checkpoints(job_dict, tmp_path):
    """HF's save_total_limit deletes old checkpoints inside the save, before our marker makes the new one
    count: with keep 1 a crash there left no complete checkpoint. Rotation is ours, after the mark."""
    from posttrain.api.load import parse_job
    from posttrain.jobs.algorithms import sft_worker as sft

    job_dict["spec"]["checkpoint"] = {"everySteps": 2, "keep": 1}
    spec = parse_job(job_dict).spec
    args = sft.sft_arguments(spec, {"checkpoint_local": str(tmp_path)}, world=1, has_eval=False)
    assert args["save_total_limit"] is None and args["save_steps"] == 2 and args["output_dir"] == str(tmp_path)
