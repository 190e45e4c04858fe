"""Loading base models and tokenizers, and wrapping them in PEFT adapters.

`materialize(spec.model)` turns any model source into a local Hugging Face
folder once (GGUF files are dequantized and written as safetensors in the
cache; an adapter folder that posttrain wrote is merged into the base its
`posttrain.json` names), so every Ray worker loads the same plain folder.
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


def materialize(model: ModelSpec, *, base: Path | None = None, weights: bool = True,
                field: str = "spec.model.source") -> str:
    """A local folder (or hub id) that `from_pretrained` can load, on this pod.

    Every process that loads the model calls this itself: on a cluster each pod has its own
    filesystem, so a folder made on the head means nothing to a worker. Object storage is
    downloaded and a `.gguf` file dequantized once per pod (under a lock, into `$POSTTRAIN_CACHE`);
    paths and `pvc://` are used in place. `weights=False` is enough for a tokenizer or a config
    (object storage then skips the weight files). `field` is the spec field errors name (a teacher's is
    spec.teacher.source).
    """
    loc = storage.resolve(model.source, base=base)
    if loc.is_hub:
        return loc.hub_id  # type: ignore[return-value]
    try:
        path = storage.fetch(loc, weights=weights)  # a single object (a .gguf file) comes whole
    except FileNotFoundError:
        raise ModelSourceError(f"{field}: {loc.uri} does not exist") from None
    if not path.exists():
        raise ModelSourceError(f"{field}: {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelSourceError(f"{field}: {path} is a file but not .gguf; give a model folder or a .gguf file")
        dest = _gguf_cache_dir(path)
        return _once(dest, lambda: _convert_gguf(path, dest))
    if not (path / "config.json").exists():
        if (path / "adapter_config.json").exists():
            if not weights and (path / "tokenizer_config.json").exists():
                return str(path)  # its tokenizer is all that is asked for: no merge
            return _merged_adapter(path, model, base=base)
        raise ModelSourceError(f"{field}: {path} has no config.json; it is not a Hugging Face model folder")
    return str(path)


def config_folder(model: ModelSpec, *, base: Path | None = None, field: str = "spec.model.source") -> str:
    """A folder (or hub id) with the model's config.json, without weights where possible: an adapter folder's
    config is its base's (the one `posttrain.json` names; merging adds no layer), so `ptj://<job>` of a job
    that trained an adapter needs no merge to be checked."""
    path = materialize(model, base=base, weights=False, field=field)
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").exists() and (folder / "posttrain.json").exists():
        base_model = json.loads((folder / "posttrain.json").read_text()).get("base_model")
        if base_model:
            return config_folder(model.model_copy(update={"source": base_model, "tokenizer": None}), base=base,
                                 field=field)
    return path


# The Auto class that loads the base of a PEFT adapter, by the adapter's task type.
_TASK_MODELS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification"}


def _merged_adapter(path: Path, model: ModelSpec, *, base: Path | None) -> str:
    """An adapter folder (`adapter_config.json`, with posttrain's `posttrain.json` naming its base) as a plain
    model: the base, materialized itself (it may be another job's adapter), with the adapter merged in, written
    once per pod into the cache. This is what `ptj://<job>` of a job that trained an adapter loads."""
    provenance = json.loads((path / "posttrain.json").read_text()) if (path / "posttrain.json").exists() else {}
    config = json.loads((path / "adapter_config.json").read_text())
    refuse_bottleneck(path, config, where="spec.model.source")
    if not provenance.get("base_model"):
        raise ModelSourceError(f"spec.model.source: {path} is an adapter without posttrain.json naming its base "
                               "model; give the base model as the source (and train a new adapter on it)")
    task = config.get("task_type") or "CAUSAL_LM"
    if config.get("peft_type") != "LORA" or task not in _TASK_MODELS:
        raise ModelSourceError(f"spec.model.source: {path} is a {config.get('peft_type')} adapter ({task}); only "
                               "LoRA-family adapters of causal LMs or classifiers can be merged into their base to "
                               "train or serve on (train the source job with output.mergeAdapter or adapter lora)")
    base_spec = model.model_copy(update={"source": provenance["base_model"], "tokenizer": None})
    return merged_into(path, materialize(base_spec, base=base), task=task)


def merged_into(adapter: Path, base_folder: str, *, task: str = "CAUSAL_LM") -> str:
    """The base folder with the adapter merged into its weights, written once per pod into the cache (keyed by
    both and the adapter's files): a plain folder any engine loads (vLLM and transformers alike)."""
    files = sorted(p for p in adapter.iterdir() if p.is_file())
    stamp = ";".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    key = hashlib.sha256(f"{adapter.resolve()}|{base_folder}|{stamp}".encode()).hexdigest()[:16]
    dest = storage.cache_root() / "models" / f"merged-{adapter.parent.name}-{key}"
    return _once(dest, lambda: _merge(adapter, base_folder, dest, task=task))


def layer_dropped(folder: str, keep: Any) -> str:
    """The model in `folder` with only the decoder layers `model.keepLayers` keeps, written once per pod into the
    cache: what a rollout engine (vLLM or transformers) loads for a layer-dropped student, so that it generates
    with the student's layers before the first weight sync and receives tensors of the same names after it.
    The learner applies keepLayers itself when it loads (`load_for_training`)."""
    from posttrain.api.distill import KeepEvery

    wire = keep.model_dump() if isinstance(keep, KeepEvery) else list(keep)
    key = hashlib.sha256(f"{Path(folder).resolve() if Path(folder).exists() else folder}|{wire}".encode()).hexdigest()
    dest = storage.cache_root() / "models" / f"layers-{Path(folder).name}-{key[:16]}"
    return _once(dest, lambda: _drop_layers(folder, keep, dest))


def _drop_layers(folder: str, keep: Any, dest: Path) -> None:
    import transformers

    from posttrain.jobs.distill.student import keep_layers

    log.info("keeping decoder layers %s of %s (once per pod)", keep, folder)
    net = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    keep_layers(net, keep)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    net.save_pretrained(tmp)
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(tmp)
    tmp.rename(dest)


def _once(dest: Path, build: Any) -> str:
    """`dest` (a model folder in the cache), built by `build()` unless a complete one is there; under a lock, so
    the actors of one pod build it once."""
    with storage.file_lock(dest.with_suffix(".lock")):
        if not (dest / "config.json").exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            build()
    return str(dest)


def _merge(adapter: Path, base_folder: str, dest: Path, *, task: str) -> None:
    import peft
    import transformers

    log.info("merging the adapter %s into %s (once per pod)", adapter, base_folder)
    auto = getattr(transformers, _TASK_MODELS[task])
    net = auto.from_pretrained(base_folder, dtype="auto")
    merged = peft.PeftModel.from_pretrained(net, str(adapter)).merge_and_unload()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    # The adapter folder carries the tokenizer it was trained with; keep the base's where it has none.
    tokenizer_from = adapter if (adapter / "tokenizer_config.json").exists() else Path(base_folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
    (tmp / "posttrain.json").write_text(json.dumps({"kind": "merged-adapter", "adapter": str(adapter),
                                                    "base_model": base_folder}, indent=2) + "\n")
    tmp.rename(dest)


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


def master_weights(dtype: str, *, full_weights: bool, on_gpu: bool) -> tuple[str, str | None]:
    """(dtype to load the weights in, the half-precision compute dtype or None) for a `model.dtype`.

    Half precision trains with fp32 master weights: full fine-tuning loads fp32 and computes in half (pure
    bf16 AdamW rounds updates below 2^-8 of a weight to nothing); an adapter's frozen base loads in half
    (PEFT keeps the adapter's weights in fp32). The RL learner turns the compute dtype into an FSDP2
    mixed-precision policy, the Trainer-based algorithms into its bf16/fp16 autocast flags.

    >>> master_weights("auto", full_weights=True, on_gpu=True)
    ('float32', 'bfloat16')
    >>> master_weights("bfloat16", full_weights=False, on_gpu=False)
    ('bfloat16', 'bfloat16')
    """
    compute = ("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype
    if compute not in ("bfloat16", "float16"):
        return dtype, None
    return ("float32" if full_weights else dtype), compute


def load_tokenizer(source: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _peft_config(adapter: AdapterSpec, task_type: str = "CAUSAL_LM"):
    import peft

    t = adapter.type
    if t.is_lora_family():
        return peft.LoraConfig(
            task_type=task_type,
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


# A model's head -> (the transformers auto class, PEFT's task type). "score": one output per sequence (a reward model).
HEADS = {"causal": ("AutoModelForCausalLM", "CAUSAL_LM"), "score": ("AutoModelForSequenceClassification", "SEQ_CLS")}


def auto_class(head: str):
    import transformers

    return getattr(transformers, HEADS[head][0])


def load_for_training(source: str, model: ModelSpec, adapter: AdapterSpec, *, head: str = "causal") -> Any:
    """The model to train: full weights, or the base wrapped in its PEFT adapter.

    head "score" loads a sequence-classification model with one label (a new, randomly initialised
    `score` layer on the base; PEFT trains it in full beside the adapter)."""
    import torch

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
    if head == "score":
        kwargs["num_labels"] = 1
    net = auto_class(head).from_pretrained(source, **kwargs)
    if model.keep_layers is not None:
        from posttrain.jobs.distill.student import keep_layers

        keep_layers(net, model.keep_layers)  # a layer-dropped model, before any adapter wraps it
    if adapter.type is AdapterType.none:
        if model.gradient_checkpointing:
            net.gradient_checkpointing_enable()
        return net
    if adapter.type is AdapterType.bottleneck:
        from posttrain.jobs import bottleneck

        if model.gradient_checkpointing:
            net.gradient_checkpointing_enable()
            net.enable_input_require_grads()  # the base is frozen: checkpointed layers need an input with grad
        return bottleneck.add_adapters(net, bottleneck.BottleneckConfig.from_spec(
            adapter, hidden_size=bottleneck.hidden_size(net)))
    import peft

    if adapter.type is AdapterType.qlora:
        net = peft.prepare_model_for_kbit_training(net, use_gradient_checkpointing=model.gradient_checkpointing)
    elif model.gradient_checkpointing:
        net.gradient_checkpointing_enable()
        net.enable_input_require_grads()
    return peft.get_peft_model(net, _peft_config(adapter, HEADS[head][1]))


def provenance(*, kind: str, model: ModelSpec, base: str | Path | None, extra: dict[str, Any] | None = None) -> bytes:
    """`posttrain.json` of a written model or adapter: what it is and what it was trained from. The base is
    written as a URI that means the same on every pod and from any folder (a relative path made absolute),
    so that an adapter can be loaded with its base later (`ptj://<job>`, see `materialize`). `extra` adds
    what a reader of this model needs besides (a reward model's `reward_input`)."""
    source = model.source
    loc = storage.resolve(source, base=Path(base) if base else None)
    if loc.local is not None and not source.startswith(("pvc://", "file://")):
        source = str(loc.local.resolve())
    return (json.dumps({"kind": kind, "base_model": source, **(extra or {})}, indent=2) + "\n").encode()


def write_provenance(dest: Path, *, kind: str, model: ModelSpec, base: str | Path | None,
                     extra: dict[str, Any] | None = None) -> None:
    (dest / "posttrain.json").write_bytes(provenance(kind=kind, model=model, base=base, extra=extra))


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
    refuse_bottleneck(path, json.loads((path / "adapter_config.json").read_text()), where=where)
    return str(path)


def refuse_bottleneck(path: Path, config: dict[str, Any], *, where: str) -> None:
    """Every reader of an adapter folder here merges it into its base (to train on, or to serve with vLLM or
    transformers); a bottleneck adapter (`posttrain.jobs.bottleneck`) cannot be merged: say so, naming `where`."""
    if config.get("adapter_type") == "bottleneck":
        raise ModelSourceError(f"{where}: {path} is a bottleneck adapter, which cannot be folded into its base's "
                               "weights, so it cannot be a model source or be served by the rollout engines; load "
                               "it onto its base in your own code (posttrain.jobs.bottleneck.load), or train a LoRA "
                               "adapter (adapter.type lora) for this use")
