"""What differs between the TRL trainers that run on our Ray Train workers (sft, dpo, kto, orpo, simpo, reward,
distill).

    method = METHODS["dpo"]
    trainer_cls, config_cls = method.classes()
    config = config_cls(**common_arguments, **method.options(spec))

Everything else (data reading, workers, checkpoints, progress, saving) is shared: `algorithms.sft`
drives the workers, `algorithms.sft_worker.train_loop` runs the trainer this table names. A new
TRL trainer is one entry here, one `ALGORITHMS.add` line and its data builder.

TRL logs metrics with slashes (`rewards/chosen`); metrics.jsonl, /metrics and the status use the
flat names of `FLAT` (`rewards_chosen`), for dpo/kto (implicit rewards) and reward (the model's
scores of the chosen and rejected completions) alike.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from posttrain.api.preference import PreferenceSpec

# TRL's metric name -> ours. For reward, `accuracy`/`margin` are the pairwise accuracy and mean margin
# of the model's scores: the same quantities as DPO's implicit-reward accuracy and margin.
FLAT = {
    "rewards/chosen": "rewards_chosen",
    "rewards/rejected": "rewards_rejected",
    "rewards/margins": "rewards_margin",
    "rewards/accuracies": "rewards_accuracy",
    "accuracy": "rewards_accuracy",
    "margin": "rewards_margin",
    "kl": "kl",
}
# Values of a worker's log event that go into metrics.jsonl (after FLAT renames them).
LOGGED = ("loss", "grad_norm", "learning_rate", "epoch", "tokens_per_second", "tokens_seen", "rewards_chosen",
          "rewards_rejected", "rewards_margin", "rewards_accuracy", "kl", "distill_loss", "ce")
# Of an evaluation: kept as eval_<name> per step, and before/after training in the summary (distill: the
# divergence, the cross-entropy and the token-level KL to the teacher on the eval split).
EVALUATED = ("loss", "rewards_margin", "rewards_accuracy", "distill_loss", "ce", "teacher_kl")


def flat_metrics(logs: dict[str, Any]) -> dict[str, Any]:
    """TRL's names -> ours, for training (`rewards/chosen`) and evaluation (`eval_rewards/chosen`) logs.

    >>> flat_metrics({"loss": 0.7, "rewards/margins": 0.1, "eval_accuracy": 1.0})
    {'loss': 0.7, 'rewards_margin': 0.1, 'eval_rewards_accuracy': 1.0}
    """
    out: dict[str, Any] = {}
    for key, value in logs.items():
        prefix, name = ("eval_", key[5:]) if key.startswith("eval_") else ("", key)
        out[prefix + FLAT.get(name, name)] = value
    return out


def _no_options(spec: Any) -> dict[str, Any]:
    return {}


def _dpo_options(spec: Any) -> dict[str, Any]:
    p = spec.preference or PreferenceSpec()
    return {"loss_type": p.loss_type or ["sigmoid"], "loss_weights": p.loss_weights, "beta": p.beta,
            "label_smoothing": p.label_smoothing, "precompute_ref_log_probs": p.precompute_ref_log_probs}


def _kto_options(spec: Any) -> dict[str, Any]:
    p = spec.preference or PreferenceSpec()
    return {"loss_type": (p.loss_type or ["kto"])[0], "beta": p.beta, "desirable_weight": p.desirable_weight,
            "undesirable_weight": p.undesirable_weight, "precompute_ref_log_probs": p.precompute_ref_log_probs}


def _orpo_options(spec: Any) -> dict[str, Any]:
    return {"beta": (spec.preference or PreferenceSpec()).beta}


def _simpo_options(spec: Any) -> dict[str, Any]:
    p = spec.preference or PreferenceSpec()
    return {"loss_type": "simpo", "beta": p.beta, "simpo_gamma": p.simpo_gamma, "cpo_alpha": p.cpo_alpha}


def _reward_options(spec: Any) -> dict[str, Any]:
    p = spec.preference or PreferenceSpec()
    return {"center_rewards_coefficient": p.center_rewards_coefficient}


def _distill_options(spec: Any) -> dict[str, Any]:
    from posttrain.api.distill import DistillSpec

    d = spec.distill or DistillSpec()
    return {"distill_loss": d.loss, "distill_beta": d.beta, "distill_temperature": d.temperature,
            "distill_alpha": d.alpha}


@dataclass(frozen=True)
class Method:
    trainer: str  # "module:Class" of the TRL trainer
    config: str  # "module:Class" of its config
    head: str  # "causal" (a language model) or "score" (sequence classification with one label: a reward model)
    options: Callable[[Any], dict[str, Any]]  # the config's algorithm-specific arguments from the spec
    data: str  # "sft" (tokenized by posttrain.jobs.data) or "preference" (records TRL tokenizes)

    def classes(self) -> tuple[type, type]:
        def load(ref: str) -> type:
            module, name = ref.split(":")
            return getattr(importlib.import_module(module), name)

        return load(self.trainer), load(self.config)


METHODS = {
    "sft": Method("trl:SFTTrainer", "trl:SFTConfig", "causal", _no_options, "sft"),
    "dpo": Method("trl:DPOTrainer", "trl:DPOConfig", "causal", _dpo_options, "preference"),
    "kto": Method("trl:KTOTrainer", "trl:KTOConfig", "causal", _kto_options, "preference"),
    # reference-free, from TRL's experimental package (both run with our pins; prompt tuning does not, see api.spec)
    "orpo": Method("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig", "causal", _orpo_options,
                   "preference"),
    "simpo": Method("trl.experimental.cpo:CPOTrainer", "trl.experimental.cpo:CPOConfig", "causal", _simpo_options,
                    "preference"),
    "reward": Method("trl:RewardTrainer", "trl:RewardConfig", "score", _reward_options, "preference"),
    # SFTTrainer with the loss against the teacher's cached top-k (the rows carry it: see algorithms.distill)
    "distill": Method("posttrain.jobs.distill.trainer:DistillTrainer", "posttrain.jobs.distill.trainer:DistillConfig",
                      "causal", _distill_options, "sft"),
}
