"""`spec.teacher`, `spec.distill` and `model.keepLayers`: the settings of `algorithm: distill`.

    spec:
      algorithm: distill
      model: {source: hf://HuggingFaceTB/SmolLM2-135M-Instruct, keepLayers: {every: 2}}   # the student
      teacher: {source: hf://HuggingFaceTB/SmolLM2-135M-Instruct}
      distill: {mode: logits, loss: jsd, beta: 0.5, temperature: 2.0, alpha: 0.1, topK: 20}
      roles: {trainer: {gpus: 1}, teacher: {gpus: 1}}

On-policy (GKD): the student samples from the data's prompts on rollout engines, the teacher scores the
student's tokens, the student minimises the divergence on its own samples. It runs on the RL actors, so it
takes `spec.rl`'s sampling settings and the RL roles (no reward actors):

      distill: {mode: on_policy, loss: reverse_kl, temperature: 1.0, topK: 20}
      rl: {groupSize: 4, promptsPerStep: 8, maxNewTokens: 128, temperature: 1.0}
      roles: {learner: {gpus: 1}, rollout: {gpus: 1, engine: vllm}, teacher: {gpus: 1}}

The loss names and `beta` follow TRL's GKD (`generalized_jsd_loss`): `jsd` with `beta` interpolates
between the two KL directions (beta 0 is forward KL(teacher || student), beta 1 reverse KL(student ||
teacher)). `alpha` mixes in the plain SFT cross-entropy: loss = (1 - alpha) x divergence + alpha x CE.
`check_distill_job` holds the rules that need the whole spec (which algorithm, which roles).

    >>> DistillSpec().wire()
    {'mode': 'logits', 'loss': 'forward_kl', 'beta': 0.5, 'temperature': 1.0, 'alpha': 0.0, 'topK': 20}
    >>> keep_indices([0, 2], 4), keep_indices(KeepEvery(every=2), 5)
    ([0, 2], [0, 2, 4])
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag

from posttrain.api.base import ApiModel

DISTILL_ROLES = ("trainer", "teacher")  # the student trains on trainer; the teacher scores on teacher
# on_policy: the student trains on the RL learners, samples on rollout engines; the teacher scores on teacher
ON_POLICY_ROLES = ("learner", "rollout", "teacher")
MODES = ("logits", "on_policy")
# spec.rl fields of the policy-gradient loss and its rewards: an on_policy job minimises distill.loss instead
POLICY_GRADIENT_FIELDS = ("advantage", "scale_rewards", "loss_type", "clip_low", "clip_high", "kl", "gamma", "lam",
                          "value_clip", "critic_learning_rate", "rollout_correction", "rollout_correction_cap")
ON_POLICY_ADAPTERS = ("none", "lora", "rslora")  # the RL learner's (rollout engines load merged weights)


class KeepEvery(ApiModel):
    every: int = Field(ge=1, description="Keep every this many-th decoder layer, from layer 0 (2 keeps 0, 2, 4, ...).")


# A list of indices or {every: n}; the tag picks the member, so an error names only the form that was written
# (the loader drops the tags from error paths).
KeepLayers = Annotated[
    Union[Annotated[list[int], Tag("list[int]")], Annotated[KeepEvery, Tag("KeepEvery")]],
    Discriminator(lambda v: "KeepEvery" if isinstance(v, (dict, KeepEvery)) else "list[int]"),
]


class DistillSpec(ApiModel):
    mode: Literal["logits", "on_policy"] = Field(
        "logits",
        description="logits: the student learns the teacher's token distributions on the data set's "
        "completions (the teacher scores the data once, its top-k log-probabilities are cached). "
        "on_policy: the student samples from the data's prompts (rollout engines, spec.rl's sampling settings) "
        "and learns the teacher's distributions on its own tokens (GKD), on the RL learner, rollout and teacher "
        "roles.",
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl",
        description="Per-token divergence: forward_kl KL(teacher || student) (mode covering), reverse_kl "
        "KL(student || teacher) (mode seeking), or jsd: TRL's generalized Jensen-Shannon divergence with beta.",
    )
    beta: float = Field(
        0.5, ge=0.0, le=1.0,
        description="jsd only: the mixture weight, in [0, 1]; 0 is forward KL, 1 reverse KL, 0.5 the symmetric JSD.",
    )
    temperature: float = Field(
        1.0, gt=0.0, description="Both models' logits are divided by this before the divergence (above 1 softens).",
    )
    alpha: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Weight of the plain SFT cross-entropy on the data's completion: loss = (1 - alpha) x "
        "divergence + alpha x CE, in [0, 1]. mode logits only (the student's own samples have no reference "
        "completion).",
    )
    top_k: int = Field(
        20, ge=1, le=1024,
        description="The teacher's k most likely tokens kept per position (the rest of its probability is kept as "
        "one tail mass); the divergence is taken over these k tokens and the tail. Both modes.",
    )
    cache: str | None = Field(
        None,
        description="Where the teacher's cached top-k log-probabilities go (path, `pvc://`, `s3://`); default "
        "`teacher-cache/` inside the output. A complete cache written with the same teacher, data and topK is reused. "
        "mode logits only (on_policy scores fresh samples every step).",
    )


def keep_indices(keep: list[int] | KeepEvery, layers: int) -> list[int]:
    """The decoder layers `model.keepLayers` keeps of a model with `layers` of them, in order; ValueError
    naming the field when it selects nothing or an index the model does not have."""
    if isinstance(keep, KeepEvery):
        return list(range(0, layers, keep.every))
    bad = [i for i in keep if i >= layers]
    if bad:
        raise ValueError(f"spec.model.keepLayers: layer {bad[0]} does not exist; the model has {layers} decoder "
                         f"layers (0..{layers - 1})")
    return list(keep)


def check_keep_layers(keep: Any) -> None:
    """What can be checked of `model.keepLayers` without the model: non-empty, non-negative, ascending, no repeats."""
    if isinstance(keep, list):
        if not keep:
            raise ValueError("@keepLayers: selects no layer; list the decoder layers to keep, e.g. [0, 2, 4], "
                             "or {every: 2}")
        for i, index in enumerate(keep):
            if index < 0:
                raise ValueError(f"@keepLayers[{i}]: ({index}) layer indices start at 0")
            if i and index <= keep[i - 1]:
                raise ValueError(f"@keepLayers[{i}]: ({index}) list each layer once, in ascending order")


def check_distill_job(spec: Any) -> None:
    """The rules of `spec.teacher`/`spec.distill`/`roles.teacher` for the whole spec (a `PostTrainingJobSpec`);
    raises ValueError("@<field>: ...")."""
    name = spec.algorithm.value
    if name != "distill":
        for field in ("teacher", "distill"):
            if getattr(spec, field) is not None:
                raise ValueError(f"@{field}: is for algorithm distill, not {name}; remove it")
        if spec.roles.teacher is not None:
            raise ValueError(f"@roles.teacher: is for algorithm distill, not {name}; remove it")
        return
    if spec.teacher is None:
        raise ValueError("@teacher: algorithm distill needs a teacher model, e.g. "
                         "{source: hf://HuggingFaceTB/SmolLM2-135M-Instruct}")
    settings = spec.distill or DistillSpec()
    if settings.loss != "jsd" and settings.beta != DistillSpec().beta:
        raise ValueError(f"@distill.beta: applies to loss jsd, not {settings.loss}; remove beta or use loss jsd")
    if spec.teacher.keep_layers is not None:
        raise ValueError("@teacher.keepLayers: the teacher is used whole; keepLayers belongs on spec.model "
                         "(the student)")
    if spec.adapter.type.value in ("prefix", "prompt"):
        raise ValueError(f"@adapter.type: {spec.adapter.type.value} tuning adds virtual tokens, so the student's "
                         "positions no longer line up with the teacher's; use none or a LoRA type")
    if settings.mode == "on_policy":
        check_on_policy(spec, settings)
    elif spec.rl is not None:
        raise ValueError("@rl: sets the student's sampling, which only distill mode on_policy does; remove rl, or "
                         "set distill.mode: on_policy")


def check_on_policy(spec: Any, settings: DistillSpec) -> None:
    """What `distill.mode: on_policy` takes: the RL roles and spec.rl's sampling, no rewards, no logits-mode
    settings; raises ValueError("@<field>: ...")."""
    if settings.cache is not None:
        raise ValueError("@distill.cache: on_policy scores the student's fresh samples every step, nothing is "
                         "cached; remove cache (or use mode logits)")
    if settings.alpha != DistillSpec().alpha:
        raise ValueError("@distill.alpha: mixes in cross-entropy on the data's completions, which on_policy does not "
                         "train on (the student learns on its own samples); remove alpha (or use mode logits)")
    if spec.roles.trainer != type(spec.roles.trainer)():
        raise ValueError("@roles.trainer: on_policy trains the student on roles.learner (and samples on "
                         "roles.rollout); size roles.learner instead")
    if spec.roles.reward is not None:
        raise ValueError("@roles.reward: on_policy learns from the teacher, with no reward actors; remove it")
    if spec.rewards:
        raise ValueError("@rewards: on_policy learns from the teacher, not from rewards; remove rewards")
    if spec.adapter.type.value not in ON_POLICY_ADAPTERS:
        raise ValueError(f"@adapter.type: on_policy trains on the RL learner, which takes "
                         f"{', '.join(ON_POLICY_ADAPTERS)}, not {spec.adapter.type.value}")
    rl = spec.rl
    default = type(rl)() if rl is not None else None
    for name in POLICY_GRADIENT_FIELDS if rl is not None else ():
        if getattr(rl, name) != getattr(default, name):  # against the default: a dumped spec validates again
            wire = type(rl).model_fields[name].alias or name
            raise ValueError(f"@rl.{wire}: is a policy-gradient setting; on_policy minimises distill.loss over "
                             "the student's samples, so remove it (spec.rl takes groupSize, promptsPerStep, "
                             "maxNewTokens, temperature, topP, ppoEpochs, weightSync, async)")
