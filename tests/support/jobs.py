"""One factory for PostTrainingJob documents and the adapter settings tests use.

    doc = jobs.document("sft", model="model", training={"maxSteps": 4})   # a dict, as YAML gives it
    job = jobs.rl_job(model_path, adapter=jobs.LORA, rl={"ppoEpochs": 2})  # a validated grpo job
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

FULL = {"type": "none"}
LORA = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}

SFT_SPEC = {
    "algorithm": "sft",
    "model": {"source": "model"},
    "data": {"train": [{"source": "train.jsonl"}]},
    "training": {"maxSteps": 4, "learningRate": 0.01, "globalBatchSize": 8, "microBatchSize": 4, "maxSeqLength": 64},
}
RL_SPEC = {
    "algorithm": "grpo",
    "model": {"source": "model"},
    "data": {"train": [{"source": "train.jsonl"}]},
    "training": {"maxSteps": 10, "learningRate": 0.02, "lrScheduler": "constant", "maxSeqLength": 64, "seed": 0},
    "rl": {"groupSize": 8, "promptsPerStep": 4, "maxNewTokens": 8},
    "roles": {"rollout": {"engine": "transformers"}},
    "rewards": [{"function": "posttrain.jobs.rewards.builtin:length_penalty"}],
}


def document(algorithm: str = "sft", *, name: str | None = None, **spec: Any) -> dict[str, Any]:
    """A job document: the algorithm's small defaults, with top-level spec sections replaced by `spec`."""
    base = copy.deepcopy(RL_SPEC if algorithm in ("grpo", "ppo") else SFT_SPEC)
    base["algorithm"] = algorithm
    for key, value in spec.items():
        base[key] = value
    return {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
            "metadata": {"name": name or f"tiny-{algorithm}"}, "spec": base}


def rl_job(model_path: str, *, algorithm: str = "grpo", adapter: dict | None = None, rl: dict | None = None,
           training: dict | None = None, model: dict | None = None):
    """A validated grpo/ppo job over a local model folder (what a learner or critic `setup` takes)."""
    from posttrain.api.load import parse_job

    doc = document(algorithm, model={"source": str(model_path), **(model or {})}, adapter=adapter or FULL)
    doc["spec"]["rl"] = {**doc["spec"]["rl"], **(rl or {})}
    doc["spec"]["training"] = {**doc["spec"]["training"], **(training or {})}
    return parse_job(doc)


CLAIMS = ("data", "models")  # the ReadWriteMany claims `cluster_document` names


def cluster_document(name: str = "tiny-sft", **spec: Any) -> dict[str, Any]:
    """An SFT job a cluster accepts: a hub model, data and output on shared claims (see CLAIMS)."""
    doc = document("sft", name=name, **spec)
    doc["spec"].setdefault("model", {})
    doc["spec"]["model"] = spec.get("model", {"source": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"})
    doc["spec"]["data"] = spec.get("data", {"train": [{"source": "pvc://data/train.jsonl"}]})
    doc["spec"]["output"] = spec.get("output", {"uri": f"pvc://models/{name}"})
    return doc


BASE_JOB = document("sft", name="tiny-sft")  # the minimal valid SFT job; copy it before changing it


def copy_rewards(folder: Path) -> Path:
    """Put the tests' reward functions (`support/rl_rewards.py`) in `folder`, as a user's `rl_rewards.py`."""
    return Path(shutil.copy(Path(__file__).with_name("rl_rewards.py"), folder / "rl_rewards.py"))


def pvc_document(name: str, **spec: Any) -> dict[str, Any]:
    """A LoRA SFT job for a cluster whose claims `models` (a tiny model), `data` and `out` exist."""
    fields = {"model": {"source": "pvc://models/tiny"}, "adapter": {"type": "lora"},
              "data": {"train": [{"source": "pvc://data/train.jsonl"}]}, "training": {"maxSteps": 4},
              "output": {"uri": f"pvc://out/{name}"}}
    doc = document("sft", name=name, **(fields | spec))
    doc["metadata"]["namespace"] = "default"
    return doc


def run_local(doc: dict[str, Any], root: Path, out: str, **opts: Any) -> dict[str, Any]:
    """Run a job document through the driver (embedded Ray), relative paths from `root`, output `root/out`."""
    from posttrain.api.load import parse_job
    from posttrain.jobs import driver

    job = parse_job(doc, require_available=True)
    return driver.run(job, driver.RunOptions(output=str(root / out), base_dir=root, **opts))
