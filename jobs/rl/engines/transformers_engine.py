"""The transformers `generate` rollout engine: the fallback where vLLM is not installed.

    engine = TransformersEngine(model_folder, seed=0)
    gens = engine.generate(prompt_ids, Sampling(n=8, max_new_tokens=64))

Tests: `pytest tests/test_rl_engines.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Generation, RolloutEngine, Sampling, check_tied, load_into_hf_model

if TYPE_CHECKING:
    import torch


class TransformersEngine(RolloutEngine):
    """`model.generate` on a plain transformers model: the fallback where vLLM is not installed.

    Prompts are left-padded into one batch; each prompt is repeated `n` times
    (`num_return_sequences`). Weights load in place, so tied embeddings stay tied.
    """

    name = "transformers"

    def __init__(self, model_path: str | Path, *, device: str | None = None, dtype: str | None = None,
                 batch_size: int = 64, seed: int | None = None, colocated: bool = False,
                 max_model_len: int | None = None) -> None:
        """`device`: the actor's GPU when Ray gave it one, else the CPU; `dtype`: float32 on CPU, the
        model's own on GPU; `max_model_len`: the longest prompt + completion asked for (checked)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        on_gpu = torch.cuda.is_available()
        device = device or ("cuda" if on_gpu else "cpu")
        dtype = dtype or ("auto" if on_gpu else "float32")
        if seed is not None:
            torch.manual_seed(seed)  # sampling draws from torch's generator
        self.device = device
        self._device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_path))
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path),
                                                          dtype=dtype if dtype == "auto" else getattr(torch, dtype))
        self.model.to(self._device).eval()
        self.batch_size, self.max_model_len = batch_size, max_model_len
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
        longest = max(len(p) for p in prompts) + sampling.max_new_tokens
        if self.max_model_len is not None and longest > self.max_model_len:
            raise ValueError(f"a prompt and its completion take up to {longest} tokens, more than "
                             f"max_model_len {self.max_model_len}")
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
            return_dict_in_generate=True, output_logits=sampling.logprobs, top_k=0,
        )
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        with torch.no_grad():
            res = self.model.generate(input_ids=ids.to(self._device), attention_mask=mask.to(self._device), **kwargs)
        new = res.sequences[:, width:].cpu()                               # (batch * n, steps)
        lp = None
        if sampling.logprobs:
            logits = torch.stack(res.logits, dim=1).float().cpu()          # (batch * n, steps, vocab), raw
            lp = torch.log_softmax(logits, dim=-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        stop_set = set(stops)
        gens = [Generation(prompt_token_ids=list(p)) for p in prompts]
        for row in range(new.shape[0]):
            toks = new[row].tolist()
            end = next((i + 1 for i, t in enumerate(toks) if t in stop_set), len(toks))
            g = gens[row // sampling.n]
            g.token_ids.append(toks[:end])
            if lp is not None:
                g.logprobs.append(lp[row, :end].tolist())
            g.texts.append(self.tokenizer.decode(toks[:end], skip_special_tokens=True))
        return gens

    def continuation_logprobs(self, prompt_token_ids: list[list[int]],
                              continuations: list[list[int]]) -> list[list[float]]:
        """One right-padded forward pass per prompt over prompt + each continuation."""
        import torch

        if any(len(c) == 0 for c in continuations) or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("every prompt and continuation needs at least one token")
        out: list[list[float]] = []
        for prompt in prompt_token_ids:
            rows = [list(prompt) + list(c) for c in continuations]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device)).logits
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            scores = []
            for i, c in enumerate(continuations):
                # the token at position t is predicted by the logits at t - 1
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c))
                scores.append(float(logp[i, positions, torch.tensor(c)].sum()))
            out.append(scores)
        return out

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        load_into_hf_model(self.model, named_tensors)
