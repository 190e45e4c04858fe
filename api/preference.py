"""`spec.preference`: the settings of preference learning (dpo, kto, orpo, simpo) and reward-model training (reward).

    spec:
      algorithm: dpo
      preference: {lossType: [sigmoid, sft], lossWeights: [1.0, 0.2], beta: 0.1}

Names follow TRL's DPOConfig / KTOConfig / RewardConfig and the experimental ORPOConfig / CPOConfig
(TRL 1.16), so a TRL recipe carries over:
`lossType` is TRL's `loss_type`, `beta` its `beta`, and so on. `check_preference` holds the
rules that depend on the algorithm (which losses it knows, which fields apply to it).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from posttrain.api.base import ApiModel

# TRL 1.16 DPOTrainer's loss types (dpo_config.py); several combine with lossWeights.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
# TRL 1.16 KTOTrainer's loss types (kto_config.py); one at a time.
KTO_LOSSES = ("kto", "apo_zero_unpaired")
PREFERENCE_ALGORITHMS = ("dpo", "kto", "orpo", "simpo", "reward")


class PreferenceSpec(ApiModel):
    loss_type: list[str] | None = Field(
        None,
        min_length=1,
        max_length=8,
        description=(
            "Loss, with TRL's names. dpo: sigmoid (DPO, the default), hinge (SLiC), ipo, exo_pair, nca_pair, "
            "robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm; "
            "several are summed with lossWeights (e.g. [sigmoid, sft] for RPO-style DPO + NLL). "
            "kto: kto (the default) or apo_zero_unpaired, one only. Not used by reward (Bradley-Terry)."
        ),
    )
    loss_weights: list[float] | None = Field(
        None, description="Weight of each lossType entry, same length (default 1.0 each). dpo only."
    )
    beta: float = Field(
        0.1, gt=0, description="dpo, kto: how far the policy may move from the reference (higher stays closer; "
        "IPO's tau for lossType ipo). orpo: the weight of the odds-ratio term (lambda). simpo: the reward scale."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5,
        description="Probability that a preference label is flipped (robust) or EXO's epsilon (exo_pair), in "
        "[0, 0.5). dpo only."
    )
    precompute_ref_log_probs: bool = Field(
        False, description="Compute the reference model's log-probabilities of the whole data set once before "
        "training, so no reference model is held while training (dpo and kto)."
    )
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable (label true) examples. kto only.")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable (label false) examples. kto only.")
    simpo_gamma: float = Field(0.5, ge=0, description="Target reward margin of SimPO (gamma). simpo only.")
    cpo_alpha: float = Field(
        0.0, ge=0, description="Weight of an NLL term on the chosen completions (0 is plain SimPO; 1 is CPO-SimPO). "
        "simpo only."
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Pulls the reward model's outputs towards zero mean (Eisenstein et al.). reward only."
    )

    @model_validator(mode="after")
    def _check(self) -> PreferenceSpec:
        if self.loss_weights is not None:
            if self.loss_type is None or len(self.loss_weights) != len(self.loss_type):
                raise ValueError("@lossWeights: give one weight per lossType entry (and lossType itself)")
        return self


# Fields of PreferenceSpec and the algorithms each applies to (wire names, as errors name them).
ONLY_FOR = {
    "lossWeights": ("dpo",),
    "labelSmoothing": ("dpo",),
    "lossType": ("dpo", "kto"),
    "beta": ("dpo", "kto", "orpo", "simpo"),
    "simpoGamma": ("simpo",),
    "cpoAlpha": ("simpo",),
    "precomputeRefLogProbs": ("dpo", "kto"),
    "desirableWeight": ("kto",),
    "undesirableWeight": ("kto",),
    "centerRewardsCoefficient": ("reward",),
}


def check_preference(algorithm: str, pref: PreferenceSpec | None, *, adapter: str,
                     target_modules: str | list[str] = "all-linear", micro_batch: int = 2,
                     formats: dict[str, str] | None = None) -> str | None:
    """The first problem of `spec.preference` (or of the adapter or batch it needs) for `algorithm`, as
    "@field: message", or None. Refuses up front what TRL 1.16's trainers would refuse on the workers."""
    if algorithm not in PREFERENCE_ALGORITHMS:
        return f"@preference: is for {', '.join(PREFERENCE_ALGORITHMS)}; remove it for {algorithm}" if pref else None
    for where, fmt in (formats or {}).items():  # data field path -> its format
        if fmt != "auto":
            return (f"@{where}.format: {fmt} is an SFT record format; {algorithm} reads "
                    f"{'{prompt, completion, label}' if algorithm == 'kto' else '{prompt, chosen, rejected}'} "
                    "records (field names from data.*Field): remove format")
    if algorithm != "reward" and isinstance(target_modules, list) and "lm_head" in target_modules:
        return ("@adapter.targetModules: an adapter on lm_head is never trained by the preference trainers "
                "(they read lm_head's weight directly); remove lm_head")
    if algorithm == "reward" and adapter in ("prefix", "prompt"):
        return (f"@adapter.type: reward writes a whole scoring model, and {adapter} tuning cannot be merged into "
                "one; use none, lora, qlora, dora or rslora")
    if algorithm in ("orpo", "simpo") and adapter == "prompt":
        # TRL's experimental ORPO/CPO trainers compare logits with labels position by position, and prompt
        # tuning prepends its virtual tokens to the logits.
        return f"@adapter.type: TRL's {algorithm} trainer does not work with prompt tuning; use prefix, a LoRA type or none"
    pref = pref or PreferenceSpec()
    if algorithm == "kto" and (pref.loss_type or ["kto"])[0] == "kto" and micro_batch < 2:
        return ("@training.microBatchSize: kto estimates its KL term from the other completions of a forward pass; "
                "set microBatchSize to 2 or more")
    if "exo_pair" in (pref.loss_type or []) and pref.label_smoothing == 0:
        return "@preference.labelSmoothing: exo_pair needs a value above 0 (the EXO paper uses 1e-3)"
    defaults = PreferenceSpec()
    for field, info in PreferenceSpec.model_fields.items():
        wire = info.alias or field
        if algorithm not in ONLY_FOR[wire] and getattr(pref, field) != getattr(defaults, field):
            return f"@preference.{wire}: applies to {', '.join(ONLY_FOR[wire])}, not {algorithm}; remove it"
    known = {"dpo": DPO_LOSSES, "kto": KTO_LOSSES}.get(algorithm, ())
    for i, loss in enumerate(pref.loss_type or []):
        if loss not in known:
            return f"@preference.lossType[{i}]: {loss!r} is not a {algorithm} loss; use one of {', '.join(known)}"
    if algorithm == "kto" and pref.loss_type and len(pref.loss_type) > 1:
        return "@preference.lossType: kto takes one loss (kto or apo_zero_unpaired), not a combination"
    return None
