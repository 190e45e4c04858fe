"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"), our own.

Each adapter is down-projection -> nonlinearity -> up-projection, added back onto its input
(`h + up(act(down(h)))`). It sits on the output of a decoder layer's attention block and of its
feed-forward block (`placement: houlsby`), or of the feed-forward block only (`pfeiffer`, Pfeiffer et
al. 2021). The up-projection starts at zero, so a fresh adapter is an exact identity: the model's
outputs are the base model's until the first optimizer step. The base weights are frozen.

    net = AutoModelForCausalLM.from_pretrained(base)
    add_adapters(net, BottleneckConfig(hidden_size=net.config.hidden_size, reduction_factor=16))
    ... train ...
    save(net, "out/adapter")                       # adapter_config.json + adapter_model.safetensors
    net2 = load(AutoModelForCausalLM.from_pretrained(base), "out/adapter")
    with disabled(net):                            # the base model again (a DPO reference, a teacher)
        ...

Works on Hugging Face decoder models whose layers have `self_attn` and `mlp` (Llama, Qwen2, Mistral,
Gemma, SmolLM, ...), causal-LM and sequence-classification heads alike. The adapters cannot be folded
into the base weights (the nonlinearity), so a model with them is served by transformers only.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

ADAPTER_TYPE = "bottleneck"
CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
# placement -> (the decoder-layer block an adapter follows, the adapter's attribute on the layer suffix)
SITES = {"houlsby": (("self_attn", "attn"), ("mlp", "mlp")), "pfeiffer": (("mlp", "mlp"),)}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
_KEY = re.compile(r"layers\.(\d+)\.bottleneck_(attn|mlp)\.(down|up)\.(weight|bias)$")


class BottleneckError(ValueError):
    """A model or adapter folder that bottleneck adapters do not fit; the message says why and what to do."""


@dataclass(frozen=True)
class BottleneckConfig:
    hidden_size: int
    reduction_factor: int = 16
    non_linearity: str = "relu"
    placement: str = "houlsby"

    @property
    def bottleneck_size(self) -> int:
        return max(1, self.hidden_size // self.reduction_factor)

    def adapter_parameters(self) -> int:
        """Weights of one adapter: down (h x b + b) and up (b x h + h)."""
        h, b = self.hidden_size, self.bottleneck_size
        return 2 * h * b + b + h

    def to_json(self, *, num_layers: int) -> dict[str, Any]:
        return {"adapter_type": ADAPTER_TYPE, **asdict(self), "bottleneck_size": self.bottleneck_size,
                "num_layers": num_layers}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BottleneckConfig:
        return cls(hidden_size=int(doc["hidden_size"]), reduction_factor=int(doc["reduction_factor"]),
                   non_linearity=doc["non_linearity"], placement=doc["placement"])

    @classmethod
    def from_spec(cls, adapter: Any, *, hidden_size: int) -> BottleneckConfig:
        """From `spec.adapter` (an `api.spec.AdapterSpec` of type bottleneck)."""
        return cls(hidden_size=hidden_size, reduction_factor=adapter.reduction_factor,
                   non_linearity=adapter.non_linearity, placement=adapter.placement)


class Bottleneck(nn.Module):
    """`h + up(act(down(h)))` over the last dimension; its weights stay float32 under a half-precision base."""

    def __init__(self, config: BottleneckConfig) -> None:
        super().__init__()
        self.down = nn.Linear(config.hidden_size, config.bottleneck_size)
        self.act = ACTIVATIONS[config.non_linearity]()
        self.up = nn.Linear(config.bottleneck_size, config.hidden_size)
        nn.init.zeros_(self.up.weight)  # an exact identity at init (Houlsby's near-identity, made exact)
        nn.init.zeros_(self.up.bias)
        self.enabled = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return h
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)

    def after(self, module: nn.Module, args: Any, output: Any) -> Any:
        """Forward hook of the block it follows (attention blocks return a tuple: (output, weights, ...)).
        A bound method, so a deep copy of the model (a frozen reference) hooks the copied adapter."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers: the first ModuleList whose layers all have `self_attn` and `mlp`."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(
                hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in module):
            return module
    raise BottleneckError(f"adapter.type: bottleneck needs decoder layers with self_attn and mlp blocks (Llama, Qwen, "
                          f"Mistral style); {type(model).__name__} has none; use a LoRA type")


def hidden_size(model: nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def adapters(model: nn.Module) -> list[Bottleneck]:
    return [m for m in model.modules() if isinstance(m, Bottleneck)]


def add_adapters(model: nn.Module, config: BottleneckConfig) -> nn.Module:
    """Freeze every weight of `model` and insert fresh adapters after the blocks `config.placement` names, in
    place; returns the model. Its adapters are `layers[i].bottleneck_attn` / `layers[i].bottleneck_mlp`."""
    if adapters(model):
        raise BottleneckError("the model already has bottleneck adapters")
    if config.hidden_size != hidden_size(model):
        raise BottleneckError(f"the adapter is for hidden size {config.hidden_size}, the model has "
                              f"{hidden_size(model)}; load it onto the base model it was trained on")
    if config.placement not in SITES or config.non_linearity not in ACTIVATIONS:
        raise BottleneckError(f"placement {config.placement!r} / nonLinearity {config.non_linearity!r}: use one of "
                              f"{sorted(SITES)} / {sorted(ACTIVATIONS)}")
    model.requires_grad_(False)
    for layer in decoder_layers(model):
        device = next(layer.parameters()).device
        for block, name in SITES[config.placement]:
            adapter = Bottleneck(config).to(device=device, dtype=torch.float32)
            layer.add_module(f"bottleneck_{name}", adapter)
            getattr(layer, block).register_forward_hook(adapter.after)
    model.bottleneck_config = config
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The base model for the duration: every adapter passes its input through unchanged."""
    found = adapters(model)
    before = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield model
    finally:
        for a, was in zip(found, before):
            a.enabled = was


def adapter_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights of a model's state dict (any prefix: a bare model, a CausalLM, a gathered FSDP
    state), under names that do not depend on the head: `layers.<i>.bottleneck_<attn|mlp>.<down|up>.<p>`."""
    out = {}
    for key, value in state_dict.items():
        match = _KEY.search(key)
        if match:
            out[match.group(0)] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def save(model: nn.Module, folder: str | Path, *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter alone: `adapter_config.json` (ours: type, sizes, placement) and
    `adapter_model.safetensors`. `state_dict`: the model's full state when the caller gathered it (FSDP)."""
    from safetensors.torch import save_file

    config: BottleneckConfig | None = getattr(model, "bottleneck_config", None)
    if config is None:
        raise BottleneckError("the model has no bottleneck adapters to save")
    weights = adapter_state(state_dict if state_dict is not None else model.state_dict())
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = config.to_json(num_layers=len(decoder_layers(model)))
    (folder / CONFIG_NAME).write_text(json.dumps(doc, indent=2) + "\n")
    save_file(weights, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "adapter_type": ADAPTER_TYPE})
    return folder


def read_config(folder: str | Path) -> BottleneckConfig:
    path = Path(folder) / CONFIG_NAME
    doc = json.loads(path.read_text()) if path.is_file() else {}
    if doc.get("adapter_type") != ADAPTER_TYPE:
        raise BottleneckError(f"{folder} is not a bottleneck adapter folder ({CONFIG_NAME} with adapter_type "
                              f"{ADAPTER_TYPE})")
    return BottleneckConfig.from_json(doc)


def load(model: nn.Module, folder: str | Path, *, trainable: bool = False) -> nn.Module:
    """Insert the adapter saved in `folder` into `model` (its base), in place; returns the model. Every weight
    it does not hold, or one it holds that the model has no place for, is an error."""
    from safetensors.torch import load_file

    config = read_config(folder)
    add_adapters(model, config)
    saved = load_file(str(Path(folder) / WEIGHTS_NAME))
    own = adapter_state(model.state_dict())
    if set(saved) != set(own):
        raise BottleneckError(f"{folder}: its weights do not fit this model (missing {sorted(set(own) - set(saved))[:3]}, "
                              f"unexpected {sorted(set(saved) - set(own))[:3]}); load it onto the base it was "
                              "trained on")
    layers = decoder_layers(model)
    with torch.no_grad():
        for key, value in saved.items():
            i, site, proj, param = _KEY.match(key).groups()  # type: ignore[union-attr]
            target = getattr(getattr(getattr(layers[int(i)], f"bottleneck_{site}"), proj), param)
            target.copy_(value)
    for a in adapters(model):
        a.requires_grad_(trainable)
    return model
