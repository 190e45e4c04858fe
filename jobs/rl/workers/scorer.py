"""The reward worker: one Ray actor scoring completions with the job's rewards.

    Reward = ray.remote(num_cpus=1)(RewardWorker)
    s = Reward.remote()
    ray.get(s.setup.remote([spec.wire() for spec in job.spec.rewards], base_dir="."))
    batch = ray.get(s.score.remote(prompts, completions, fields))   # a RewardBatch

Functions (`module:function`, `file.py:function`), reward models and LLM judges (materialised on this
pod; a judge runs on a vLLM or transformers engine here), and HTTP verifiers, combined by weight (`posttrain.jobs.rewards`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import ActorBase


class RewardWorker(ActorBase):
    """Scores completions with the job's rewards (functions, reward models, HTTP verifiers)."""

    def setup(self, reward_specs: list[dict[str, Any]], *, base_dir: str | None = None) -> list[str]:
        from posttrain.api.rl import RewardSpec
        from posttrain.jobs.rewards.score import build_rewards

        # Relative `file.py:fn` and reward-model paths resolve against `base_dir` (the spec's folder, locally).
        # Never chdir there: on a cluster that folder is the spec's ConfigMap mount, which only the head has.
        specs = [RewardSpec.model_validate(s) for s in reward_specs]
        self.on_error = "skip" if any(s.on_error == "skip" for s in specs) else "raise"
        self.rewards = build_rewards([reward_function(s, base_dir, where=f"spec.rewards[{i}]")
                                      for i, s in enumerate(specs)])
        return [r.label for r in self.rewards]

    def score(self, prompts: list[str], completions: list[str], fields: dict[str, list[Any]], *,
              process: bool = False):
        """A `RewardBatch`; with `process`, rewards may return one score per reasoning step (grpo_process)."""
        from posttrain.jobs.rewards.score import combine

        return combine(self.rewards, prompts, completions, fields=fields, on_error=self.on_error, process=process)


def reward_function(spec: Any, base_dir: str | Path | None = None, *, where: str = "spec.rewards[0]"):
    """A `RewardSpec` (function | model | url | judge) -> the `RewardFunction` that loads it; `where` names the
    reward's field in errors."""
    from posttrain.jobs.rewards.score import RewardFunction

    kwargs = dict(spec.kwargs)
    if spec.function is not None:
        name = spec.function
        module, _, attr = name.rpartition(":")
        if module.endswith(".py") and base_dir and not Path(module).is_absolute():
            name = f"{Path(base_dir, module)}:{attr}"
        return RewardFunction(name, spec.weight, kwargs, label=spec.name or "")
    if spec.model is not None:
        # On this (reward) pod: a pvc:// or s3:// reward model becomes a local folder here.
        kwargs.setdefault("path", local_model(spec.model, base_dir))
        return RewardFunction("posttrain.jobs.rewards.scorers:RewardModel", spec.weight, kwargs,
                              label=spec.name or "reward_model")
    if spec.judge is not None:
        label = spec.name or "judge"
        kwargs.update(path=local_model(spec.judge.model, base_dir), spec=spec.judge.model_dump(), label=label,
                      where=f"{where}.judge", on_error=spec.on_error)
        return RewardFunction("posttrain.jobs.rewards.judge:Judge", spec.weight, kwargs, label=label)
    kwargs.update(url=spec.url, timeout=spec.timeout_seconds, retries=spec.retries)
    return RewardFunction("posttrain.jobs.rewards.scorers:HttpVerifier", spec.weight, kwargs,
                          label=spec.name or "http_verifier")


def local_model(source: str, base_dir: str | Path | None) -> str:
    """A model source (path, pvc://, s3://, hf://) as a folder (or hub id) this pod loads."""
    from posttrain.jobs.models import model_on_this_pod

    return model_on_this_pod(source, base=base_dir)[0]
