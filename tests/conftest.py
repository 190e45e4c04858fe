"""Shared fixtures. Tiers: unit (no Ray), then local-Ray runs with tiny models; `gpu` tests need CUDA."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("posttrain-cache")
    os.environ["POSTTRAIN_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight Llama (untied embeddings) with an offline-trained tokenizer."""
    import tiny

    return tiny.make_model(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory) -> Path:
    import tiny

    return tiny.write_jsonl(tmp_path_factory.mktemp("tiny-data") / "train.jsonl", tiny.arith_records(96))


BASE_JOB = {
    "apiVersion": "posttrain.dev/v1alpha1",
    "kind": "PostTrainingJob",
    "metadata": {"name": "tiny-sft"},
    "spec": {
        "algorithm": "sft",
        "model": {"source": "model"},
        "data": {"train": [{"source": "train.jsonl"}]},
        "training": {"maxSteps": 4, "learningRate": 0.01, "globalBatchSize": 8, "microBatchSize": 4,
                     "maxSeqLength": 64},
    },
}


@pytest.fixture
def job_dict():
    """A fresh copy of a minimal valid SFT job (as YAML would give it)."""
    return copy.deepcopy(BASE_JOB)
