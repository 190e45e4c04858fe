"""`model.keepLayers`: a student made of some of a tiny model's decoder layers, with their weights.

    .venv/bin/python -m pytest -q tests/test_distill_student.py
"""

from __future__ import annotations

import pytest
import torch

import tiny
from posttrain.api.distill import KeepEvery
from posttrain.api.spec import AdapterSpec, ModelSpec
from posttrain.jobs import models
from posttrain.jobs.distill.student import keep_layers


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    return tiny.make_model(tmp_path_factory.mktemp("four") / "model", layers=4, seed=3)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.mark.parametrize("keep,expected", [([0, 3], [0, 3]), (KeepEvery(every=2), [0, 2]), ([1], [1])])
def test_kept_layers_have_the_teachers_weights_and_the_model_runs(four_layers, keep, expected, tmp_path):
    teacher, student = load(four_layers), load(four_layers)
    assert keep_layers(student, keep) == expected
    assert student.config.num_hidden_layers == len(expected) == len(student.model.layers)
    for new, old in enumerate(expected):
        mine, theirs = student.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert student.model.layers[new].self_attn.layer_idx == new
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    if getattr(student.config, "layer_types", None) is not None:
        assert len(student.config.layer_types) == len(expected)
    ids = torch.tensor([[5, 6, 7, 8]])
    out = student(input_ids=ids)
    assert out.logits.shape == (1, 4, teacher.config.vocab_size) and torch.isfinite(out.logits).all()
    # generation with the KV cache indexes layers by layer_idx: must work with the renumbered layers
    generated = student.generate(input_ids=ids, max_new_tokens=3, do_sample=False, use_cache=True)
    assert generated.shape == (1, 7)
    student.save_pretrained(tmp_path / "saved")
    again = load(tmp_path / "saved")
    assert again.config.num_hidden_layers == len(expected)
    assert torch.allclose(again(input_ids=ids).logits, out.logits)


def test_keeping_every_layer_changes_nothing(four_layers):
    teacher, student = load(four_layers), load(four_layers)
    keep_layers(student, KeepEvery(every=1))
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


def test_an_index_past_the_last_layer_names_the_field(four_layers):
    with pytest.raises(ValueError, match=r"spec.model.keepLayers: layer 4 does not exist; the model has 4 decoder"):
        keep_layers(load(four_layers), [0, 4])


def test_load_for_training_drops_the_layers(four_layers):
    spec = ModelSpec(source=str(four_layers), keep_layers=[0, 2])
    net = models.load_for_training(str(four_layers), spec, AdapterSpec())
    assert net.config.num_hidden_layers == 2 and len(net.model.layers) == 2
    assert torch.equal(net.model.layers[1].mlp.up_proj.weight, load(four_layers).model.layers[2].mlp.up_proj.weight)


def test_a_rollout_engine_generates_with_the_students_layers(four_layers, tmp_path, monkeypatch):
    """Rollout engines load a folder: with keepLayers that folder is the layer-dropped student (written once per
    pod), so the engine samples what the student would and a weight sync's tensor names match its layers."""
    from posttrain.jobs.rl.engines import Sampling
    from posttrain.jobs.rl.workers.rollout import RolloutWorker

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    student = load(four_layers)
    keep_layers(student, [0, 3])
    wire = ModelSpec(source=str(four_layers), keep_layers=[0, 3]).wire()
    worker = RolloutWorker()
    worker.setup(wire, engine="transformers", threads=1)
    folder = models.layer_dropped(str(four_layers), [0, 3])  # the same cached folder, not a second one
    assert load(folder).config.num_hidden_layers == 2
    assert len(list((tmp_path / "cache" / "models").glob("layers-*[!.lock]"))) == 1
    ids = [5, 6, 7, 8]
    got = worker.generate([ids], Sampling(n=1, max_new_tokens=4, temperature=0.0))[0].token_ids[0]
    want = student.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, 4:].tolist()
    assert got[:len(want)] == want


def test_a_distill_jobs_evaluation_drops_layers_of_the_base_only():
    """spec.evaluation of a distill job compares the layer-dropped student before training ("base": keepLayers
    applied when its engine loads) with the written student (already those layers: applied again it would lose
    half of them)."""
    from posttrain.api.evaluation import EvalModel
    from posttrain.api.load import parse_job
    from posttrain.jobs.algorithms.evaluate import model_wire
    from support import jobs

    doc = jobs.document("distill", model={"source": "teacher", "keepLayers": {"every": 2}, "dtype": "float32"},
                        teacher={"source": "teacher"}, data={"train": [{"source": "train.jsonl"}]})
    spec = parse_job(doc, require_available=True).spec
    assert model_wire(spec, EvalModel(source="teacher", name="base"))["keepLayers"] == {"every": 2}
    trained = model_wire(spec, EvalModel(source="/out/model", name="trained"))
    assert "keepLayers" not in trained and trained["source"] == "/out/model" and trained["dtype"] == "float32"


def test_an_engine_gets_the_student_the_learner_trains(four_layers, cache_dir):
    """The rollout engines of on_policy load `models.layer_dropped`: the learner's student, once per pod."""
    layer_dropped_on_this_pod = models.layer_dropped
    spec = ModelSpec(source=str(four_layers), keepLayers=[1, 3])
    folder = layer_dropped_on_this_pod(str(four_layers), spec.keep_layers)
    assert str(cache_dir) in folder and layer_dropped_on_this_pod(str(four_layers), [1, 3]) == folder
    assert layer_dropped_on_this_pod(str(four_layers), KeepEvery(every=2)) != folder
    engine = load(folder)
    learner = models.load_for_training(str(four_layers), spec, AdapterSpec(type="none"))
    assert engine.config.num_hidden_layers == 2
    mine, theirs = engine.state_dict(), learner.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(folder).get_vocab() == AutoTokenizer.from_pretrained(four_layers).get_vocab()
