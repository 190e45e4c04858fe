"""Loading base models and tokenizers, and wrapping them in PEFT adapters.

`materialize(spec.model)` turns any model source into a local Hugging Face
folder once (GGUF files are dequantized and written as safetensors in the
cache), so every Ray worker loads the same plain folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from posttrain.api.spec import AdapterSpec, AdapterType, ModelSpec
from posttrain.jobs.run import storage

log = logging.getLogger(__name__)


class ModelSourceError(ValueError):
    """The model source cannot be used; the message names `spec.model.source`."""


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return storage.cache_root() / "models" / f"{path.stem}-{key}"


def _convert_gguf(path: Path, dest: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once per pod)", path.name, dest)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = model.config
    # A GGUF-loaded model carries a quantization config that blocks save_pretrained;
    # the weights are already dequantized, so rebuild a plain model around them.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(dest)


def materialize(model: ModelSpec, *, base: Path | None = None, weights: bool = True) -> str:
    """A local folder (or hub id) that `from_pretrained` can load, on this pod.

    Every process that loads the model calls this itself: on a cluster each pod has its own
    filesystem, so a folder made on the head means nothing to a worker. Object storage is
    downloaded and a `.gguf` file dequantized once per pod (under a lock, into `$POSTTRAIN_CACHE`);
    paths and `pvc://` are used in place. `weights=False` is enough for a tokenizer or a config
    (object storage then skips the weight files).
    """
    loc = storage.resolve(model.source, base=base)
    if loc.is_hub:
        return loc.hub_id  # type: ignore[return-value]
    try:
        path = storage.fetch(loc, weights=weights)  # a single object (a .gguf file) comes whole
    except FileNotFoundError:
        raise ModelSourceError(f"spec.model.source: {loc.uri} does not exist") from None
    if not path.exists():
        raise ModelSourceError(f"spec.model.source: {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"spec.model.source: {path} is a file but not .gguf; give a model folder or a .gguf file")
        dest = _gguf_cache_dir(path)
        with storage.file_lock(dest.with_suffix(".lock")):
            if not (dest / "config.json").exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                _convert_gguf(path, dest)
        return str(dest)
    if not (path / "config.json").exists():
        raise ModelSourceError(f"spec.model.source: {path} has no config.json; it is not a Hugging Face model folder")
    return str(path)


def model_on_this_pod(model: str | dict[str, Any] | ModelSpec, *, dtype: str | None = None,
                      base: str | Path | None = None) -> tuple[str, ModelSpec]:
    """The job's `spec.model` (wire form or model) or a local folder -> (a folder or hub id this process can
    load, the ModelSpec with every field the job set: trustRemoteCode, gradientCheckpointing, ...)."""
    if isinstance(model, ModelSpec):
        spec = model
    elif isinstance(model, dict):
        spec = ModelSpec.model_validate(model)
    else:
        spec = ModelSpec(source=str(model))
    if dtype is not None:
        spec = spec.model_copy(update={"dtype": dtype})
    return materialize(spec, base=Path(base) if base else None), spec


def hub_revision(model: ModelSpec) -> str | None:
    loc = storage.resolve(model.source)
    return loc.revision if loc.is_hub else None


def torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _peft_config(adapter: AdapterSpec):
    import peft

    t = adapter.type
    if t.is_lora_family():
        return peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=adapter.r,
            lora_alpha=adapter.alpha,
            lora_dropout=adapter.dropout,
            target_modules=adapter.target_modules,
            use_dora=t is AdapterType.dora,
            use_rslora=t is AdapterType.rslora,
        )
    if t is AdapterType.prefix:
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.num_virtual_tokens)
    if t is AdapterType.prompt:
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=adapter.num_virtual_tokens)
    raise ValueError(f"no PEFT config for adapter type {t.value}")


def load_for_training(source: str, model: ModelSpec, adapter: AdapterSpec) -> Any:
    """The model to train: full weights, or the base wrapped in its PEFT adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(model.dtype),
        "revision": hub_revision(model),
        "trust_remote_code": model.trust_remote_code,
    }
    if adapter.type is AdapterType.qlora:
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
        kwargs["dtype"] = compute
    net = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if adapter.type is AdapterType.none:
        if model.gradient_checkpointing:
            net.gradient_checkpointing_enable()
        return net
    import peft

    if adapter.type is AdapterType.qlora:
        net = peft.prepare_model_for_kbit_training(net, use_gradient_checkpointing=model.gradient_checkpointing)
    elif model.gradient_checkpointing:
        net.gradient_checkpointing_enable()
        net.enable_input_require_grads()
    return peft.get_peft_model(net, _peft_config(adapter))


def write_provenance(dest: Path, *, kind: str, base_model: str) -> None:
    """`posttrain.json` beside a written model: what it is and what it was trained from."""
    (dest / "posttrain.json").write_text(json.dumps({"kind": kind, "base_model": base_model}, indent=2) + "\n")


def adapter_on_this_pod(source: str, *, base: Path | None = None, where: str = "adapter") -> str:
    """A PEFT adapter folder (path, pvc://, object storage) as a local folder on this pod; `where` names the
    field in errors."""
    loc = storage.resolve(source, base=base)
    if loc.is_hub:
        raise ModelSourceError(f"{where}: {source}: give the adapter as a folder (path, pvc:// or object storage)")
    try:
        path = storage.fetch(loc)
    except FileNotFoundError:
        raise ModelSourceError(f"{where}: {loc.uri} does not exist") from None
    if not (path / "adapter_config.json").is_file():
        raise ModelSourceError(f"{where}: {path} has no adapter_config.json; it is not a PEFT adapter folder")
    return str(path)


def merged_on_this_pod(model_folder: str, adapter_folder: str) -> str:
    """`model_folder` with the adapter at `adapter_folder` merged into its weights, written once per pod into
    the cache (keyed by both paths and the adapter's files), with the base's tokenizer: a plain folder any
    engine loads (vLLM and transformers alike)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = Path(adapter_folder)
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(adapter.iterdir()) if p.is_file()]
    key = hashlib.sha256(json.dumps([model_folder, str(adapter.resolve()), stamp]).encode()).hexdigest()[:16]
    dest = storage.cache_root() / "merged" / f"{adapter.name}-{key}"
    with storage.file_lock(dest.with_suffix(".lock")):
        if not (dest / "config.json").exists():
            import peft

            log.info("merging adapter %s into %s at %s (once per pod)", adapter, model_folder, dest)
            net = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
            merged = peft.PeftModel.from_pretrained(net, str(adapter)).merge_and_unload()
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            merged.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(model_folder).save_pretrained(tmp)
            tmp.rename(dest)
    return str(dest)
