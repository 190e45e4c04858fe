"""A layer-dropped student (`model.keepLayers`): the teacher's architecture with some of its decoder layers.

    net = AutoModelForCausalLM.from_pretrained(source)
    keep_layers(net, [0, 2, 4])          # in place: the kept layers, their weights, config and layer_idx fixed

The kept layers keep their weights (embeddings, final norm and head too); the config's `num_hidden_layers` (and
`layer_types`, where the model has one) shrink to match, and every module's `layer_idx` is renumbered
0..n-1, because the KV cache indexes its per-layer entries by it. `models.load_for_training` calls this
(keepLayers trains the whole model, no adapter), so the saved model loads again with plain `from_pretrained`.

An inference engine (vLLM, transformers; the rollout actors of `distill.mode: on_policy`) cannot drop layers
itself: `models.layer_dropped(folder, keep)` writes the student once per pod into the cache, a plain model
folder with the tokenizer, whose weights are the learner's before its first step.
"""

from __future__ import annotations

from typing import Any

from posttrain.api.distill import KeepEvery, keep_indices

FIELD = "spec.model.keepLayers"


def decoder_layers(net: Any) -> tuple[Any, Any, str]:
    """(the ModuleList of decoder layers, the module holding it, its attribute name) of a causal LM:
    `model.layers` (Llama, Qwen, Mistral, Gemma, ...), `transformer.h` (GPT-2 style) or `gpt_neox.layers`."""
    import torch

    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    for owner_name, attr in (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers")):
        owner = getattr(base, owner_name, None)
        layers = getattr(owner, attr, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers, owner, attr
    raise ValueError(f"{FIELD}: cannot find the decoder layers of {type(base).__name__} (looked for model.layers and "
                     "transformer.h); remove keepLayers for this model")


def keep_layers(net: Any, keep: list[int] | KeepEvery) -> list[int]:
    """Keep only the chosen decoder layers of `net` (in place); returns their indices in the original model.
    ValueError naming spec.model.keepLayers when an index does not exist."""
    import torch

    layers, owner, attr = decoder_layers(net)
    config = net.config
    indices = keep_indices(keep, len(layers))
    kept = torch.nn.ModuleList([layers[i] for i in indices])
    setattr(owner, attr, kept)
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for cfg in {id(c): c for c in (config, getattr(config, "text_config", None)) if c is not None}.values():
        if hasattr(cfg, "num_hidden_layers"):
            cfg.num_hidden_layers = len(indices)
        if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == len(layers):
            cfg.layer_types = [cfg.layer_types[i] for i in indices]
    return indices
