"""Bottleneck (Houlsby) adapters: the module on tiny models, the API rules, and sft/dpo end to end.

    .venv/bin/python -m pytest tests/test_bottleneck.py -q              # all (the e2e runs start Ray)
    .venv/bin/python -m pytest tests/test_bottleneck.py -q -m "not slow"
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny
from posttrain.api.load import InvalidJob, parse_job
from posttrain.jobs import bottleneck, models
from support import jobs


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> Path:
    return tiny.make_model(tmp_path_factory.mktemp("bneck") / "model", layers=3, hidden=64)


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _ids(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok(["add 4 + 5 = the answer is 9", "add 1 + 1 ="], return_tensors="pt", padding=True)


def _logits(net, ids) -> torch.Tensor:
    with torch.no_grad():
        return net(**ids).logits


def _with_adapters(folder: Path, **settings):
    net = _load(folder)
    return bottleneck.add_adapters(net, bottleneck.BottleneckConfig(hidden_size=64, **settings))


def _train_step(net, ids, *, lr: float = 0.05) -> None:
    """One AdamW step on the language-model loss (moves every adapter weight off its initial value)."""
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    net(**ids, labels=ids["input_ids"]).loss.backward()
    opt.step()
    net.eval()


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("non_linearity", ["relu", "gelu", "silu", "tanh"])
def test_fresh_adapters_leave_the_logits_exactly_unchanged(base_folder, placement, non_linearity):
    ids = _ids(base_folder)
    expected = _logits(_load(base_folder), ids)
    net = _with_adapters(base_folder, placement=placement, non_linearity=non_linearity)
    assert torch.equal(_logits(net, ids), expected)


@pytest.mark.parametrize(("placement", "per_layer"), [("houlsby", 2), ("pfeiffer", 1)])
def test_placement_inserts_one_adapter_per_block_and_only_they_train(base_folder, placement, per_layer):
    net = _with_adapters(base_folder, reduction_factor=8, placement=placement)
    found = bottleneck.adapters(net)
    assert len(found) == 3 * per_layer  # 3 decoder layers
    sites = {name.rsplit(".", 1)[-1] for name, m in net.named_modules() if isinstance(m, bottleneck.Bottleneck)}
    assert sites == ({"bottleneck_attn", "bottleneck_mlp"} if placement == "houlsby" else {"bottleneck_mlp"})
    h, b = 64, 64 // 8
    assert bottleneck.trainable_parameters(net) == 3 * per_layer * (2 * h * b + b + h)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(".bottleneck_" in n for n in trainable)

    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _train_step(net, _ids(base_folder))
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters() if ".bottleneck_" not in n)
    assert any(not torch.equal(p, before[n]) for n, p in net.named_parameters() if ".bottleneck_" in n)


def test_bottleneck_size_is_at_least_one():
    assert bottleneck.BottleneckConfig(hidden_size=64, reduction_factor=1000).bottleneck_size == 1
    assert bottleneck.BottleneckConfig(hidden_size=576, reduction_factor=16).bottleneck_size == 36


def test_save_load_round_trip_after_a_training_step(base_folder, tmp_path):
    ids = _ids(base_folder)
    net = _with_adapters(base_folder, reduction_factor=4, non_linearity="gelu", placement="houlsby")
    _train_step(net, ids)
    trained = _logits(net, ids)
    assert not torch.allclose(trained, _logits(_load(base_folder), ids), atol=1e-4), "the step changed nothing"

    folder = bottleneck.save(net, tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config == {"adapter_type": "bottleneck", "hidden_size": 64, "reduction_factor": 4, "non_linearity": "gelu",
                      "placement": "houlsby", "bottleneck_size": 16, "num_layers": 3}
    from safetensors.torch import load_file

    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert len(saved) == 3 * 2 * 4 and sum(v.numel() for v in saved.values()) == bottleneck.trainable_parameters(net)

    again = bottleneck.load(_load(base_folder), folder)
    torch.testing.assert_close(_logits(again, ids), trained, atol=0, rtol=0)
    assert bottleneck.trainable_parameters(again) == 0  # loaded for inference unless trainable=True
    with bottleneck.disabled(again):  # the base model again: what a DPO reference or a teacher sees
        assert torch.equal(_logits(again, ids), _logits(_load(base_folder), ids))
    torch.testing.assert_close(_logits(again, ids), trained, atol=0, rtol=0)


def test_deep_copy_keeps_its_own_adapters(base_folder):
    """A frozen copy (what a trainer makes for a reference) must not follow the original's adapters."""
    import copy

    ids = _ids(base_folder)
    net = _with_adapters(base_folder)
    frozen = copy.deepcopy(net)
    _train_step(net, ids)
    assert torch.equal(_logits(frozen, ids), _logits(_load(base_folder), ids))
    assert not torch.allclose(_logits(net, ids), _logits(frozen, ids), atol=1e-4)


def test_loading_onto_another_base_is_refused(base_folder, tmp_path):
    folder = bottleneck.save(_with_adapters(base_folder), tmp_path / "adapter")
    other = tiny.make_model(tmp_path / "wide", hidden=32, layers=3)
    with pytest.raises(bottleneck.BottleneckError, match="hidden size 64, the model has 32"):
        bottleneck.load(_load(other), folder)
    two_layers = tiny.make_model(tmp_path / "short", hidden=64, layers=2)
    with pytest.raises(bottleneck.BottleneckError, match="do not fit this model"):
        bottleneck.load(_load(two_layers), folder)


def test_a_bottleneck_folder_is_refused_where_adapters_are_merged(base_folder, tmp_path):
    folder = bottleneck.save(_with_adapters(base_folder), tmp_path / "adapter")
    (folder / "posttrain.json").write_text(json.dumps({"kind": "adapter", "base_model": str(base_folder)}))
    with pytest.raises(models.ModelSourceError, match="spec.evaluation.models\\[0\\].adapter: .* bottleneck adapter"):
        models.adapter_on_this_pod(str(folder), where="spec.evaluation.models[0].adapter")
    from posttrain.api.spec import ModelSpec

    with pytest.raises(models.ModelSourceError, match="spec.model.source: .* cannot be folded"):
        models.materialize(ModelSpec(source=str(folder)))


# --- the API ------------------------------------------------------------------------------------------------

BNECK = {"type": "bottleneck", "reductionFactor": 8}


def _paths(doc) -> list[tuple[str, str]]:
    with pytest.raises(InvalidJob) as info:
        parse_job(doc)
    return [(e.path, e.message) for e in info.value.errors]


def test_a_bottleneck_spec_round_trips_with_its_defaults():
    job = parse_job(jobs.document("sft", adapter={"type": "bottleneck"}))
    a = job.spec.adapter
    assert (a.reduction_factor, a.non_linearity, a.placement) == (16, "relu", "houlsby")
    assert parse_job(job.model_dump(by_alias=True, mode="json")).spec.adapter == a  # a dumped spec (every default written) validates again
    assert parse_job(jobs.document("dpo", adapter=BNECK)).spec.adapter.reduction_factor == 8


@pytest.mark.parametrize(("changes", "path", "words"), [
    ({"adapter": {"type": "lora", "reductionFactor": 8}}, "spec.adapter.reductionFactor", "does not apply to a lora"),
    ({"adapter": {"type": "none", "placement": "pfeiffer"}}, "spec.adapter.placement", "use type bottleneck"),
    ({"adapter": {"type": "qlora", "nonLinearity": "gelu"}}, "spec.adapter.nonLinearity", "does not apply"),
    ({"adapter": {"type": "bottleneck", "r": 4}}, "spec.adapter.r", "does not apply to a bottleneck"),
    ({"adapter": {"type": "bottleneck", "targetModules": ["q_proj"]}}, "spec.adapter.targetModules", "bottleneck"),
    ({"adapter": {"type": "bottleneck", "numVirtualTokens": 4}}, "spec.adapter.numVirtualTokens", "bottleneck"),
    ({"adapter": {"type": "bottleneck", "reductionFactor": 0}}, "spec.adapter.reductionFactor", "greater than 0"),
    ({"adapter": {"type": "bottleneck", "nonLinearity": "swish"}}, "spec.adapter.nonLinearity", "'relu'"),
    ({"adapter": {"type": "bottleneck", "placement": "parallel"}}, "spec.adapter.placement", "'houlsby'"),
    ({"adapter": BNECK, "output": {"mergeAdapter": True}}, "spec.output.mergeAdapter", "cannot be folded"),
])
def test_bad_bottleneck_settings_name_the_field(changes, path, words):
    errors = _paths(jobs.document("sft", **changes))
    assert [p for p, _ in errors] == [path], errors
    assert words in errors[0][1], errors


@pytest.mark.parametrize(("algorithm", "extra", "path", "words"), [
    ("reward", {}, "spec.adapter.type", "whole scoring model"),
    ("grpo", {}, "spec.adapter.type", "rollout engines"),
    ("ppo", {}, "spec.adapter.type", "use lora, rslora or none for ppo"),
    ("sft", {"evaluation": {"methods": ["direct"]}, "data": {"train": [{"source": "t.jsonl"}],
                                                            "eval": {"source": "e.jsonl"}}},
     "spec.evaluation", "cannot be folded"),
])
def test_uses_that_need_a_merged_adapter_are_refused(algorithm, extra, path, words):
    errors = _paths(jobs.document(algorithm, adapter=BNECK, **extra))
    assert [p for p, _ in errors] == [path], errors
    assert words in errors[0][1], errors


# --- end to end: sft and dpo on a local Ray ------------------------------------------------------------------


def _run(workdir: Path, doc: dict, out: str) -> dict:
    from posttrain.jobs import driver

    return driver.run(parse_job(doc, require_available=True),
                      driver.RunOptions(output=str(workdir / out), base_dir=workdir))


@pytest.mark.slow
def test_sft_with_a_bottleneck_adapter_writes_it_and_lowers_the_eval_loss(workdir, ray_local):
    doc = jobs.document("sft", adapter={"type": "bottleneck", "reductionFactor": 4},
                        model={"source": "model", "gradientCheckpointing": True},
                        data={"train": [{"source": "train.jsonl"}], "evalFraction": 0.2},
                        training={"maxSteps": 8, "learningRate": 0.01, "globalBatchSize": 8, "microBatchSize": 4,
                                  "maxSeqLength": 64})
    summary = _run(workdir, doc, "out")
    assert summary["status"] == "succeeded" and summary["artifact"]["kind"] == "adapter"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    written = workdir / "out" / "adapter"
    assert sorted(p.name for p in written.iterdir() if not p.name.startswith("tokenizer")) == [
        "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "posttrain.json"]
    assert json.loads((written / "posttrain.json").read_text())["kind"] == "adapter"
    net = bottleneck.load(_load(workdir / "model"), written)
    ids = _ids(workdir / "model")
    assert not torch.allclose(_logits(net, ids), _logits(_load(workdir / "model"), ids), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["dpo", "kto"])
def test_preference_training_with_a_bottleneck_adapter_learns_the_preference(algorithm, workdir, ray_local):
    if algorithm == "dpo":
        tiny.write_jsonl(workdir / "data.jsonl", tiny.pair_records(48))
    else:
        tiny.write_jsonl(workdir / "data.jsonl", tiny.unpaired_records(24))
    doc = jobs.document(algorithm, adapter={"type": "bottleneck", "reductionFactor": 4},
                        data={"train": [{"source": "data.jsonl"}], "evalFraction": 0.25},
                        preference={"beta": 0.5},
                        training={"maxSteps": 8, "learningRate": 0.02, "globalBatchSize": 8, "microBatchSize": 4,
                                  "maxSeqLength": 64})
    summary = _run(workdir, doc, f"out-{algorithm}")
    assert summary["status"] == "succeeded" and summary["artifact"]["kind"] == "adapter"
    # before training the policy equals its reference (a fresh adapter is an identity): every reward is 0
    assert summary["eval_rewards_margin_before"] == 0.0
    assert summary["eval_rewards_margin_after"] > 0.3 and summary["eval_loss_after"] < summary["eval_loss_before"]
    if algorithm == "dpo":
        assert summary["eval_loss_before"] == pytest.approx(0.6931, abs=1e-3)
    assert (workdir / f"out-{algorithm}" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["simpo"])  # orpo takes the same path (no reference model); not run again
def test_reference_free_preference_training_with_a_bottleneck_adapter(algorithm, workdir, ray_local):
    tiny.write_jsonl(workdir / "pairs.jsonl", tiny.pair_records(48))
    doc = jobs.document(algorithm, adapter={"type": "bottleneck", "reductionFactor": 4},
                        data={"train": [{"source": "pairs.jsonl"}], "evalFraction": 0.25},
                        training={"maxSteps": 6, "learningRate": 0.02, "globalBatchSize": 8, "microBatchSize": 4,
                                  "maxSeqLength": 64})
    summary = _run(workdir, doc, f"out-{algorithm}")
    assert summary["status"] == "succeeded" and summary["artifact"]["kind"] == "adapter"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (workdir / f"out-{algorithm}" / "adapter" / "adapter_model.safetensors").is_file()
