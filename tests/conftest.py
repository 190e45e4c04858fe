"""Shared fixtures. Tiers: unit (no Ray), then local-Ray runs with tiny models; `gpu` tests need CUDA."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "support"))  # kubeemu, tiny, clusterbox, ...: see support/__init__
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for a test module: 8 logical CPUs (roles hold one each; threads are set per actor)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    yield
    ray.shutdown()


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


@pytest.fixture
def workdir(tmp_path, tiny_model, tiny_train, cache_dir) -> Path:
    """A job's folder: `model` (the tiny model) and `train.jsonl` beside it, the paths SFT_SPEC names.
    (Some modules still define their own copy, which overrides this one.)"""
    (tmp_path / "model").symlink_to(tiny_model)
    (tmp_path / "train.jsonl").symlink_to(tiny_train)
    return tmp_path


@pytest.fixture
def unshipped(monkeypatch) -> str:
    """Every algorithm name ships now; this makes `distill` one this version does not run (the list the
    loader checks), so the refusal of an unavailable algorithm stays tested. Returns the name."""
    from posttrain.api import load
    from posttrain.api.spec import AVAILABLE_ALGORITHMS

    monkeypatch.setattr(load, "AVAILABLE_ALGORITHMS", AVAILABLE_ALGORITHMS - {"distill"})
    return "distill"


@pytest.fixture
def job_dict():
    """A fresh copy of a minimal valid SFT job (as YAML would give it)."""
    from support.jobs import BASE_JOB

    return copy.deepcopy(BASE_JOB)


class S3:
    """An S3 API (moto's server) on loopback; `bucket()` makes a fresh bucket, `env` reaches it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        self._count = 0

    def bucket(self, prefix: str = "ptj") -> str:
        import boto3

        self._count += 1
        name = f"{prefix}-{self._count}"
        boto3.client("s3", endpoint_url=self.url).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3() -> S3:
    """One S3 server for the session (moto's, in its own process: its Flask app must not share a process
    with vLLM, which walks every loaded module's globals); its address and credentials go into the
    environment, where s3fs in this process and in every Ray worker started after it finds them, as in a
    pod given them by a Secret."""
    import socket
    import subprocess
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    store = S3(f"http://127.0.0.1:{port}")
    saved = {k: os.environ.get(k) for k in store.env}
    os.environ.update(store.env)
    yield store
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.terminate()
    server.wait(timeout=30)
