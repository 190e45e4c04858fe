"""Rollout engines: one interface (`base.RolloutEngine`), chosen by name through one table.

    from posttrain.jobs.rl.engines import Sampling, make_engine
    engine = make_engine("auto", model_folder, seed=0)      # vLLM where importable, else transformers
    gens = engine.generate(prompt_ids, Sampling(n=8, max_new_tokens=64))
    engine.load_weights(named_tensors); engine.sleep(); engine.wake(); engine.close()

`ENGINES` maps each name of `roles.rollout.engine` to its class as a lazy "module:Class" entry, so
vLLM is imported only when a vLLM engine is built (`vllm_engine` is the only module that imports
it). A new engine is one module with a `RolloutEngine` subclass and one `ENGINES.add` line here;
the rollout actor never names an engine class. Tests: `pytest tests/test_rl_engines.py`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from posttrain.jobs.registry import Registry

from .base import EngineKind, Generation, RolloutEngine, Sampling, check_tied, load_into_hf_model

__all__ = ["ENGINES", "EngineKind", "Generation", "RolloutEngine", "Sampling", "check_tied", "load_into_hf_model",
           "make_engine", "resolve_engine", "vllm_available"]

ENGINES: Registry[Any] = Registry("rollout engine")
ENGINES.add("transformers", "posttrain.jobs.rl.engines.transformers_engine:TransformersEngine")
ENGINES.add("vllm", "posttrain.jobs.rl.engines.vllm_engine:VLLMEngine")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(kind: str) -> str:
    """The engine `kind` stands for: `auto` is vllm where importable, else transformers.

    >>> resolve_engine("transformers")
    'transformers'
    """
    if kind == "auto":
        return "vllm" if vllm_available() else "transformers"
    ENGINES.get(kind)  # ValueError naming the choices
    return kind


def make_engine(kind: str, model_path: str | Path, **kwargs: Any) -> RolloutEngine:
    """Build the rollout engine `kind` (`auto`, or a name in `ENGINES`) over a local model folder.

    `kwargs` go to the engine's constructor: `seed`, `colocated` (a learner shares the device) for every
    engine, and engine options (`device`, `dtype`; vLLM's `gpu_memory_utilization`, ...).
    """
    return ENGINES.load(resolve_engine(kind))(model_path, **kwargs)
