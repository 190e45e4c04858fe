"""SFT data reaches the Ray Train workers through the run's output, not inside their config
(`posttrain.jobs.algorithms.prepared`).

    .venv/bin/python -m pytest tests/test_sft_prepared.py -q
"""

from __future__ import annotations

import pickle

import pytest

datasets = pytest.importorskip("datasets")

from posttrain.jobs.algorithms import prepared  # noqa: E402
from posttrain.jobs.run import storage  # noqa: E402


def rows(n: int) -> dict:
    return {"input_ids": [[i % 50 + 3] * (64 + i % 7) for i in range(n)],
            "labels": [[-100] * 8 + [i % 50 + 3] * (56 + i % 7) for i in range(n)]}


def test_config_carries_addresses_and_workers_read_the_same_rows(tmp_path):
    train, evaluation = datasets.Dataset.from_dict(rows(3000)), datasets.Dataset.from_dict(rows(40))
    cfg = {"spec": {"algorithm": "sft"}, "train": train, "eval": evaluation, "output": str(tmp_path / "out")}
    rows_size = len(pickle.dumps(cfg))

    sent = prepared.publish(storage.resolve(str(tmp_path / "out")), cfg)

    assert sent["train"] == str(tmp_path / "out" / "prepared-data" / "train")
    assert all(not isinstance(v, datasets.Dataset) for v in sent.values())
    assert len(pickle.dumps(sent)) < 1000 < rows_size  # what Ray ships to each worker: no rows
    got = prepared.load(sent["train"], staging=tmp_path / "staging")
    assert got.column_names == ["input_ids", "labels"] and got[:] == train[:]
    assert prepared.load(sent["eval"], staging=tmp_path / "staging")[:] == evaluation[:]
    assert not (tmp_path / "staging").exists()  # a path is read where it is, not copied


def test_no_eval_split_stays_none(tmp_path):
    sent = prepared.publish(storage.resolve(str(tmp_path)), {"train": datasets.Dataset.from_dict(rows(3)),
                                                             "eval": None})
    assert sent["eval"] is None and prepared.load(None, staging=tmp_path) is None


def test_object_storage_output_is_downloaded_by_each_worker(s3, tmp_path):
    out = storage.resolve(f"s3://{s3.bucket()}/runs/a")
    train = datasets.Dataset.from_dict(rows(20))
    sent = prepared.publish(out, {"train": train, "eval": None})
    assert sent["train"] == f"{out.remote}/prepared-data/train"
    for rank in (0, 1):  # each worker its own copy, as pods do
        assert prepared.load(sent["train"], staging=tmp_path / f"rank-{rank}")[:] == train[:]
