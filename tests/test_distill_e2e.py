"""`algorithm: distill` end to end on a local Ray: a tiny 4-layer teacher, a student made of every second of its
layers. Mode logits: the teacher's top-k cached in the output and reused on a rerun. Mode on_policy: the student
samples on a rollout actor, the teacher scores its tokens, the student's KL to the teacher falls.

    .venv/bin/python -m pytest -q tests/test_distill_e2e.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """4 layers, its head scaled so its distributions are sharp (a random model's are nearly uniform)."""
    import torch
    from transformers import AutoModelForCausalLM

    import tiny

    folder = tiny.make_model(tmp_path_factory.mktemp("teacher") / "teacher", layers=4, seed=5)
    net = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        net.lm_head.weight.mul_(12.0)
    net.save_pretrained(folder)
    return folder


@pytest.fixture
def workdir(tmp_path, teacher, tiny_train, cache_dir) -> Path:
    (tmp_path / "teacher").symlink_to(teacher)
    (tmp_path / "train.jsonl").symlink_to(tiny_train)
    return tmp_path


def distill_doc(**spec) -> dict:
    from support import jobs

    doc = jobs.document(
        "distill", model={"source": "teacher", "keepLayers": {"every": 2}}, teacher={"source": "teacher"},
        distill={"loss": "forward_kl", "temperature": 1.0, "alpha": 0.0, "topK": 8},
        data={"train": [{"source": "train.jsonl", "maxSamples": 48}], "evalFraction": 0.2},
        training={"maxSteps": 8, "learningRate": 1e-3, "globalBatchSize": 8, "microBatchSize": 4, "maxSeqLength": 64,
                  "lrScheduler": "constant"})
    doc["spec"].update(spec)
    return doc


def on_policy_doc(**spec) -> dict:
    """The student samples the same 8 prompts x 4 completions each step on the transformers engine (so the steps'
    KLs compare); the teacher scores them."""
    doc = distill_doc(distill={"mode": "on_policy", "loss": "forward_kl", "topK": 8},
                      rl={"groupSize": 4, "promptsPerStep": 8, "maxNewTokens": 8},
                      roles={"rollout": {"engine": "transformers"}},
                      training={"maxSteps": 6, "learningRate": 1e-3, "maxSeqLength": 64, "lrScheduler": "constant"})
    doc["spec"]["data"] = {"train": [{"source": "train.jsonl", "maxSamples": 8}]}
    doc["spec"].update(spec)
    return doc


def run_job(workdir: Path, doc: dict, *, out: str = "out", **opts):
    from posttrain.api.load import parse_job
    from posttrain.jobs import driver

    job = parse_job(doc, require_available=True)
    return driver.run(job, driver.RunOptions(output=str(workdir / out), base_dir=workdir, **opts))


def test_a_layer_dropped_student_learns_the_teacher_and_a_bottleneck_student_reuses_the_cache(workdir, ray_local):
    summary = run_job(workdir, distill_doc())
    out = workdir / "out"
    assert summary["status"] == "succeeded", summary.get("error")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "loss" in m]
    assert len(steps) == 8 and all("distill_loss" in m and "ce" in m for m in steps)
    assert steps[-1]["loss"] < steps[0]["loss"], [m["loss"] for m in steps]
    assert summary["eval_teacher_kl_after"] < summary["eval_teacher_kl_before"], summary
    assert summary["teacher"]["layers"] == 4
    cache = summary["teacher_cache"]
    assert cache["train"]["reused"] is False and cache["train"]["rows"] == summary["data"]["train_examples"]
    assert cache["eval"]["rows"] == summary["data"]["eval_examples"] > 0
    manifest = json.loads((out / "teacher-cache" / "train" / "manifest.json").read_text())
    assert manifest["topK"] == 8 and manifest["positions"] == cache["train"]["positions"] > 0
    # the student written is a standalone 2-layer model
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2

    # Another student with the same tokenizer reuses the teacher's scores (the cache is keyed by teacher, topK,
    # temperature and rows, not by the student): a separate 2-layer model with a bottleneck adapter.
    import tiny

    tiny.make_model(workdir / "other-student", layers=2, seed=11)
    doc = distill_doc(model={"source": "other-student"}, adapter={"type": "bottleneck", "reductionFactor": 4})
    doc["spec"]["distill"]["cache"] = str(out / "teacher-cache")
    doc["spec"]["training"]["learningRate"] = 1e-2
    again = run_job(workdir, doc, out="bneck")
    assert again["status"] == "succeeded", again.get("error")
    assert again["teacher_cache"]["train"]["reused"] is True and again["teacher_cache"]["eval"]["reused"] is True
    assert again["eval_teacher_kl_after"] < again["eval_teacher_kl_before"], again
    adapter = workdir / "bneck" / "adapter"
    assert json.loads((adapter / "posttrain.json").read_text())["kind"] == "adapter"
    assert not (workdir / "bneck" / "model").exists()



def test_the_cache_is_keyed_by_teacher_topk_temperature_and_rows(tmp_path):
    """A complete cache is read back only under its own key: another topK, temperature or data scores again
    (what the e2e's reuse relies on, without a third training run)."""
    import numpy as np

    from posttrain.api.load import parse_job
    from posttrain.jobs.distill.cache import TeacherCache, cache_key
    from posttrain.jobs.run import storage

    spec = parse_job(distill_doc(), require_available=True).spec
    rows = [([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1])]
    key = cache_key(spec, rows)
    others = [cache_key(parse_job(distill_doc(distill={"topK": 4}), require_available=True).spec, rows),
              cache_key(parse_job(distill_doc(distill={"temperature": 2.0}), require_available=True).spec, rows),
              cache_key(spec, rows[:1])]
    assert len({key, *others}) == 4
    cache = TeacherCache(storage.resolve(str(tmp_path / "cache")))
    scores = [(np.array([[1, 2]] * 2, dtype=np.int64), np.array([[-0.1, -2.0]] * 2, dtype=np.float32))]
    cache.write("train", key, scores, k=2)
    [(ids, logp)] = cache.read("train", key)
    assert ids.tolist() == [[1, 2]] * 2 and np.allclose(logp, [[-0.1, -2.0]] * 2)
    assert all(cache.read("train", other) is None for other in others)


def test_on_policy_a_layer_dropped_student_sampling_itself_moves_towards_the_teacher(workdir, ray_local):
    summary = run_job(workdir, on_policy_doc(), out="on-policy")
    out = workdir / "on-policy"
    assert summary["status"] == "succeeded", summary.get("error")
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "teacher_kl" in m]
    assert len(steps) == 6
    for m in steps:  # GRPO's line, with the teacher in place of the rewards
        assert not any(k.startswith("reward") for k in m), m
        assert m["distill_loss"] == pytest.approx(m["teacher_kl"], rel=1e-4)  # forward_kl: the loss is the KL
        assert m["response_length_mean"] > 0 and all(m[f"time_{t}"] > 0 for t in ("generate", "teacher", "train",
                                                                                     "sync"))
    kls = [m["teacher_kl"] for m in steps]
    assert summary["teacher_kl_last_steps_mean"] < 0.7 * summary["teacher_kl_first_steps_mean"], kls
    assert summary["first_teacher_kl"] == kls[0] and summary["teacher"]["layers"] == 4
    roles = summary["roles"]
    assert roles["teacher"]["actors"] == 1 and "reward" not in roles and roles["rollout"]["engine"] == "transformers"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2  # the student, published whole


@pytest.mark.parametrize("doc", [distill_doc, on_policy_doc], ids=["logits", "on_policy"])
def test_a_teacher_with_another_vocabulary_is_refused_before_training(workdir, teacher, tmp_path, doc):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match=r"spec.teacher.source: the teacher's vocabulary is not the student's "
                                         r"\(401 tokens vs 400; token '<extra-token>' is id 400"):
        run_job(workdir, doc(teacher={"source": str(other)}))
    assert not (workdir / "out").exists(), "refused before anything is written"


def test_a_teacher_that_cannot_be_loaded_names_its_field(workdir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"spec.teacher.source: .*empty has no config.json"):
        run_job(workdir, distill_doc(teacher={"source": str(tmp_path / "empty")}))
    with pytest.raises(ValueError, match=r"spec.teacher.source: .*missing does not exist"):
        run_job(workdir, distill_doc(teacher={"source": str(tmp_path / "missing")}))
