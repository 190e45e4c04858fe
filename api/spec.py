"""The `PostTrainingJob` spec: the one source of truth for the API.

Every field is documented once here; the description becomes the CRD's
`kubectl explain` text (see `posttrain.api.crd`). Field names are snake_case
in Python and camelCase on the wire.

    >>> spec = PostTrainingJobSpec.model_validate(
    ...     {"algorithm": "sft", "model": {"source": "/models/tiny"},
    ...      "data": {"train": [{"source": "train.jsonl"}]}, "training": {"maxSteps": 10}})
    >>> spec.adapter.type.value, spec.training.max_steps
    ('none', 10)
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.api import refs
from posttrain.api.adapters import check_bottleneck
from posttrain.api.base import ApiModel, check_template
from posttrain.api.distill import DISTILL_ROLES, ON_POLICY_ROLES, DistillSpec, KeepLayers, check_distill_job, check_keep_layers
from posttrain.api.env import EnvFromSource, EnvVar
from posttrain.api.evaluation import EvaluationSpec, check_evaluate_job, check_training_evaluation
from posttrain.api.generate import GenerateSpec, check_generate_job
from posttrain.api.preference import PreferenceSpec, check_preference
from posttrain.api.rl import RewardSpec, RLSpec, lora_serving_problem
from posttrain.api.tracking import TrackingSpec

GROUP = "posttrain.dev"
VERSION = "v1alpha1"
KIND = "PostTrainingJob"
PLURAL = "posttrainingjobs"
SHORT_NAME = "ptj"

RL_ROLES = ("rollout", "learner", "reward")
GENERATE_ROLES = ("rollout", "reward")  # the policy samples on rollout, the judge runs on reward
EVALUATE_ROLES = ("rollout", "reward")  # the models on rollout; reward only for best_of_n / metric rewards

# Algorithms whose runtime ships in this version; the others validate as
# names but `validate` and `run` refuse them with a clear message.
AVAILABLE_ALGORITHMS = frozenset({"sft", "dpo", "kto", "orpo", "simpo", "reward", "distill", "grpo", "ppo", "generate",
                                  "evaluate"})


class Algorithm(str, Enum):
    sft = "sft"
    dpo = "dpo"
    kto = "kto"
    orpo = "orpo"
    simpo = "simpo"
    reward = "reward"
    distill = "distill"
    generate = "generate"
    evaluate = "evaluate"
    grpo = "grpo"
    ppo = "ppo"

    def is_rl(self) -> bool:
        return self in (Algorithm.grpo, Algorithm.ppo)

    def roles(self) -> tuple[str, ...]:
        """The Ray roles it runs: grpo/ppo the RL roles, generate and evaluate rollout and reward (evaluate's
        reward only when its spec uses rewards: see `PostTrainingJobSpec.ray_roles`), distill the trainer (the
        student) and the teacher (mode on_policy: learner, rollout and teacher, see `ray_roles`), the rest the
        trainer."""
        if self.is_rl():
            return RL_ROLES
        if self is Algorithm.evaluate:
            return EVALUATE_ROLES
        if self is Algorithm.distill:
            return DISTILL_ROLES
        return GENERATE_ROLES if self is Algorithm.generate else ("trainer",)

    def is_preference(self) -> bool:
        """Learns from preference data ({prompt, chosen, rejected}, or labelled completions for kto)."""
        return self in (Algorithm.dpo, Algorithm.kto, Algorithm.orpo, Algorithm.simpo, Algorithm.reward)

    def trains(self) -> bool:
        return self not in (Algorithm.generate, Algorithm.evaluate)


class AdapterType(str, Enum):
    none = "none"
    lora = "lora"
    qlora = "qlora"
    dora = "dora"
    rslora = "rslora"
    prefix = "prefix"
    prompt = "prompt"
    bottleneck = "bottleneck"

    def is_lora_family(self) -> bool:
        return self in (AdapterType.lora, AdapterType.qlora, AdapterType.dora, AdapterType.rslora)

    def is_virtual_tokens(self) -> bool:
        return self in (AdapterType.prefix, AdapterType.prompt)


class ModelSpec(ApiModel):
    source: str = Field(
        description=(
            "Where the base model comes from: a hub id `hf://org/name` or `hf://org/name@revision`, "
            "a local directory in Hugging Face format, a `.gguf` file (dequantized on load), "
            "`pvc://claim/path` (a PersistentVolumeClaim mounted in the job's pods), "
            "`s3://` / `gs://` object storage, or `ptj://<job>`: the model another PostTrainingJob of this "
            "namespace published (`<its output.uri>/model`, or its `adapter` merged into that job's base); the "
            "job waits until that one has succeeded. `ptj://<job>/<path>` names a path inside its output."
        ),
        min_length=1,
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weight dtype while training. `auto` is bfloat16 on GPU and float32 on CPU.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass to save memory (slower)."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model's repository to run. Leave off unless you trust it."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer source when it differs from `source` (same URI forms, `ptj://` included)."
    )
    keep_layers: KeepLayers | None = Field(
        None,
        description="Train a smaller model made of some of this model's decoder layers, each initialised from that "
        "layer's weights (layer dropping, e.g. a student for algorithm distill): a list of layer indices counted "
        "from 0 such as [0, 2, 4], or {every: 2} for every second layer from layer 0. Embeddings, final norm and "
        "head are kept. Training algorithms on roles.trainer only.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )

    @model_validator(mode="after")
    def _check_keep_layers(self) -> ModelSpec:
        check_keep_layers(self.keep_layers)
        return self


class AdapterSpec(ApiModel):
    type: AdapterType = Field(
        AdapterType.none,
        description=(
            "Parameter-efficient method: `none` (full fine-tuning), `lora`, `qlora` (4-bit NF4 base, "
            "double quantization), `dora`, `rslora` (rank-stabilized scaling), `prefix` or `prompt` tuning, or "
            "`bottleneck` (Houlsby adapters: small down/up projections after decoder blocks; sft and the preference "
            "trainers except reward; it cannot be merged into the weights)."
        ),
    )
    r: int = Field(16, gt=0, description="LoRA rank (lora, qlora, dora, rslora).")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator; the update is scaled by alpha/r (alpha/sqrt(r) for rslora).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input, in [0, 1).")
    target_modules: str | list[str] = Field(
        "all-linear",
        description=(
            "Modules that get LoRA weights: `all-linear`, or a list of module name suffixes "
            "such as [q_proj, v_proj]. Not used by prefix or prompt tuning."
        ),
    )
    num_virtual_tokens: int = Field(
        20, gt=0, description="Number of learned virtual tokens (prefix and prompt tuning only)."
    )
    reduction_factor: int = Field(
        16, gt=0, description="Bottleneck adapters only: the bottleneck has hidden_size // reductionFactor units "
        "(at least 1); an adapter has about 2 x hidden_size^2 / reductionFactor weights."
    )
    non_linearity: Literal["relu", "gelu", "silu", "tanh"] = Field(
        "relu", description="Bottleneck adapters only: the activation between the down- and up-projection "
        "(relu, as in Houlsby et al. and Pfeiffer et al.)."
    )
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="Bottleneck adapters only: `houlsby` puts one after each decoder layer's attention "
        "block and one after its feed-forward block; `pfeiffer` only after the feed-forward block (half the weights)."
    )

    @model_validator(mode="after")
    def _check_fields_fit_type(self) -> AdapterSpec:
        # Compared with the default rather than checked in model_fields_set, so that a spec
        # dumped with its defaults (the resolved spec the workers get) validates again.
        if self.type.is_virtual_tokens() and self.target_modules != "all-linear":
            raise ValueError(
                f"@targetModules: does not apply to a {self.type.value} adapter (it learns virtual tokens, "
                "not weights of modules): remove targetModules or use type lora"
            )
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("@targetModules: empty list; name at least one module or use all-linear")
        # Only the chosen type's fields may differ from their defaults (a dumped spec has them all).
        if self.type is AdapterType.bottleneck:
            fields = ("r", "alpha", "dropout", "target_modules", "num_virtual_tokens")
            hint = "a bottleneck adapter takes reductionFactor, nonLinearity and placement"
        else:
            fields, hint = BOTTLENECK_FIELDS, "use type bottleneck"
        for name in fields:
            if getattr(self, name) != _field_default(name):
                raise ValueError(f"@{AdapterSpec.model_fields[name].alias or name}: does not apply to a "
                                 f"{self.type.value} adapter; remove it ({hint})")
        return self


BOTTLENECK_FIELDS = ("reduction_factor", "non_linearity", "placement")


def _field_default(name: str) -> Any:
    return AdapterSpec.model_fields[name].get_default(call_default_factory=True)


class DataSource(ApiModel):
    source: str = Field(
        description=(
            "A data set: a local `.jsonl`, `.json`, `.parquet` or `.csv` file (path or `file://`), "
            "a folder written by `datasets.save_to_disk`, `pvc://claim/path`, `s3://`/`gs://`, "
            "a hub data set `hf://datasets/org/name`, or `ptj://<job>`: the data set another PostTrainingJob of "
            "this namespace wrote (`<its output.uri>/data/train.jsonl`; `ptj://<job>/<path>` names another file of "
            "its output); the job waits until that one has succeeded."
        ),
        min_length=1,
    )
    weight: float = Field(
        1.0,
        gt=0,
        description=(
            "Mixing weight: this set contributes weight x min(size, maxSamples) examples per epoch "
            "(examples-proportional mixing with a cap; 2.0 repeats the set twice, 0.5 takes half)."
        ),
    )
    max_samples: int | None = Field(None, gt=0, description="Cap on the examples taken from this set before weighting.")
    split: str = Field("train", description="Split to read from a hub data set or a `save_to_disk` DatasetDict.")
    format: Literal["auto", "prompt_completion", "messages", "cot"] = Field(
        "auto",
        description=(
            "Record format: `prompt_completion`, chat `messages`, or `cot` (prompt, reasoning, answer). "
            "`auto` decides from the fields present."
        ),
    )


class DataSpec(ApiModel):
    train: list[DataSource] = Field(min_length=1, max_length=64, description="Training sets, mixed by weight.")
    eval: DataSource | None = Field(None, description="A held-out evaluation set.")
    eval_fraction: float = Field(
        0.0,
        ge=0.0,
        lt=0.5,
        description="Fraction of each training set held out for evaluation when `eval` is not given.",
    )
    prompt_field: str = Field("prompt", description="Field holding the prompt.")
    completion_field: str = Field("completion", description="Field holding the target completion.")
    messages_field: str = Field("messages", description="Field holding a chat as a list of {role, content}.")
    reasoning_field: str = Field("reasoning", description="Field holding the chain of thought (cot format).")
    answer_field: str = Field("answer", description="Field holding the final answer (cot format).")
    chosen_field: str = Field("chosen", description="Field holding the preferred completion (dpo, reward).")
    rejected_field: str = Field("rejected", description="Field holding the dispreferred completion (dpo, reward).")
    label_field: str = Field(
        "label", description="Field holding whether a completion is desirable, true or false (kto; the completion "
        "is in completionField)."
    )
    margin_field: str = Field(
        "margin", description="Optional field with how much better chosen is than rejected; when the set has it, "
        "the reward model's Bradley-Terry loss subtracts it (reward)."
    )
    cot_template: str = Field(
        "<think>\n{reasoning}\n</think>\n<answer>{answer}</answer>",
        description="How a cot record's reasoning and answer become one target; must contain {reasoning} and {answer}.",
    )
    completion_only_loss: bool = Field(
        True, description="Train on completion tokens only (prompt tokens masked out of the loss)."
    )

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        check_template(self.cot_template, required={"reasoning", "answer"}, allowed={"reasoning", "answer"},
                       field="cotTemplate", hint="the cot template")
        if self.eval is not None and self.eval_fraction > 0:
            raise ValueError("@evalFraction: give either eval or evalFraction, not both")
        return self


class TrainingSpec(ApiModel):
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps to run; wins over epochs when both are set.")
    epochs: float | None = Field(None, gt=0, description="Passes over the mixed training set (when maxSteps is unset).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    global_batch_size: int = Field(
        8, gt=0, description="Sequences per optimizer step across all workers (micro batch x accumulation x workers)."
    )
    micro_batch_size: int = Field(1, gt=0, description="Sequences per forward pass on one worker.")
    max_seq_length: int = Field(1024, gt=0, description="Sequences are truncated to this many tokens.")
    seed: int = Field(0, ge=0, description="Seed for data order, mixing, and initialization.")
    logging_steps: int = Field(1, gt=0, description="Log metrics every this many steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every this many steps; evaluation always runs before and after training."
    )



class Toleration(ApiModel):
    key: str | None = Field(None, description="Taint key to tolerate; empty with operator Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(None, description="Exists or Equal (default Equal).")
    value: str | None = Field(None, description="Taint value for operator Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match; empty matches all."
    )
    toleration_seconds: int | None = Field(None, description="For NoExecute: how long the pod stays bound after the taint.")


class RoleSpec(ApiModel):
    replicas: int = Field(1, ge=1, description="Pods of this role; each runs one worker per GPU (one on CPU).")
    cpus: float | None = Field(None, gt=0, description="CPU cores per replica (request and limit).")
    memory: str | None = Field(
        None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$",
        description="Memory per replica as a Kubernetes quantity, e.g. 32Gi.",
    )
    gpus: int = Field(0, ge=0, description="nvidia.com/gpu per replica.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels this role's pods require.")
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Taints this role's pods tolerate.")
    affinity: dict[str, Any] | None = Field(
        None, description="A Kubernetes Affinity object for this role's pods.", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    priority_class_name: str | None = Field(None, description="PriorityClass of this role's pods.")
    engine: Literal["auto", "vllm", "transformers"] | None = Field(
        None, description="Inference engine of roles.rollout: vllm where installed (auto), else transformers."
    )
    strategy: Literal["fsdp2"] | None = Field(
        None, description="Sharding of roles.learner: fsdp2 (fully_shard per decoder layer, the default and only one)."
    )




class RolesSpec(ApiModel):
    trainer: RoleSpec = Field(
        default_factory=RoleSpec, description="Workers of supervised algorithms (sft, dpo, kto, orpo, simpo, reward, distill)."
    )
    rollout: RoleSpec | None = Field(None, description="Generation workers (grpo, ppo, generate).")
    learner: RoleSpec | None = Field(None, description="Policy learners (grpo, ppo).")
    reward: RoleSpec | None = Field(None, description="Reward scorers (grpo, ppo) and judges (generate).")
    teacher: RoleSpec | None = Field(None, description="Teacher workers of distill (they score the data with spec.teacher).")


class CheckpointSpec(ApiModel):
    uri: str | None = Field(
        None,
        description="Where checkpoints go (path, `pvc://`, `s3://`). Default: `checkpoints/` inside the output. "
        "On a cluster it must be shared storage: `pvc://` (ReadWriteMany) or object storage.",
    )
    every_steps: int | None = Field(None, gt=0, description="Save a checkpoint every this many steps; unset saves none until the end.")
    keep: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")


class OutputSpec(ApiModel):
    uri: str | None = Field(
        None,
        description="Where the trained model or adapter, metrics and summary go (path, `pvc://`, `s3://`). "
        "Required on a cluster, where it must be shared storage: `pvc://` (a ReadWriteMany claim) or object "
        "storage (`s3://`, `gs://`, `gcs://`, `az://`, `abfs://`).",
    )
    merge_adapter: bool = Field(
        False, description="Merge a LoRA/DoRA adapter into the base weights and write a standalone model."
    )


# Fields that may change while a job exists; every other spec field is fixed at creation
# (the CRD rejects changes with a CEL rule, and the operator refuses them too).
MUTABLE_FIELDS = frozenset({"suspend", "maxRestarts", "preRunningDeadlineSeconds", "ttlSecondsAfterFinished",
                            "activeDeadlineSeconds", "progressDeadlineSeconds"})


class PostTrainingJobSpec(ApiModel):
    algorithm: Algorithm = Field(
        description="Post-training algorithm: sft, dpo, kto, orpo, simpo, reward (reward-model training), distill, "
        "grpo, ppo, generate (writes a data set) or evaluate (compares models and test-time scaling methods).")
    model: ModelSpec = Field(description="The base model.")
    adapter: AdapterSpec = Field(default_factory=AdapterSpec, description="Full fine-tuning or a PEFT adapter.")
    data: DataSpec = Field(description="Training and evaluation data.")
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="Optimization settings (generate and evaluate use only seed and maxSeqLength).")
    roles: RolesSpec = Field(default_factory=RolesSpec, description="Where each Ray role runs and how many replicas.")
    placement: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="grpo/ppo: each role on its own worker group, or rollout and learner sharing devices.",
    )
    rl: RLSpec | None = Field(None, description="Rollout, advantage and loss settings (grpo and ppo; defaults apply).")
    preference: PreferenceSpec | None = Field(
        None, description="Loss and reference settings of dpo, kto, orpo, simpo and reward (defaults apply)."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=list, max_length=16, description="Reward functions, models or verifiers, combined by weight (grpo, ppo)."
    )
    generate: GenerateSpec | None = Field(None, description="What an algorithm: generate job writes (required there).")
    teacher: ModelSpec | None = Field(
        None, description="The teacher model of algorithm distill (required there); it must share the student's "
        "tokenizer vocabulary. Same fields as spec.model; ptj:// names another job's model.")
    distill: DistillSpec | None = Field(None, description="Distillation settings of algorithm distill (defaults apply).")
    evaluation: EvaluationSpec | None = Field(
        None, description="Evaluation and test-time scaling: what algorithm evaluate runs (required there), or, on a "
        "training job, the evaluation of the base and the trained model at the end.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing and resume.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results are written.")
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec,
        description="Experiment trackers (MLflow, TensorBoard, W&B) besides metrics.jsonl and Prometheus.")
    image: str | None = Field(None, description="Container image of the job's pods (default: the operator's runtime image).")
    max_restarts: int = Field(3, ge=0, description="Times a failed run is restarted from its last checkpoint.")
    suspend: bool = Field(False, description="Hold the job (maps to RayJob suspend; Kueue-compatible).")
    pre_running_deadline_seconds: int = Field(
        1800,
        ge=1,
        description="Fail a run whose Ray cluster is not running the job within this many seconds "
        "(unschedulable pods, image pulls), so a stuck job frees its GPUs.",
    )
    ttl_seconds_after_finished: int = Field(
        600, ge=0, description="Keep a finished run's Ray cluster this long for debugging, then delete it."
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, description="Fail a run that is still going after this many seconds (unset: no limit)."
    )
    progress_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description="Replace a Running run whose step has not advanced for this many seconds with the next run, "
        "which resumes from the last checkpoint (counts as a restart; unset: no limit).",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        max_length=128,
        description="Environment variables of every job container. Credentials (names like HF_TOKEN, "
        "AWS_SECRET_ACCESS_KEY, *_PASSWORD, *_KEY) must use valueFrom.secretKeyRef, never a plain value.",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list, max_length=32,
        description="Secrets or ConfigMaps whose keys all become environment variables of every job container.",
    )
    service_account_name: str | None = Field(
        None,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="ServiceAccount of the job's pods, for cloud workload identity (IRSA, GKE Workload "
        "Identity). The pods still get no Kubernetes API token (automountServiceAccountToken: false).",
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> PostTrainingJobSpec:
        for path, message in refs.errors(self.wire()):
            raise ValueError(f"@{path.removeprefix('spec.')}: {message}")
        if self.adapter.type is AdapterType.none and self.output.merge_adapter:
            raise ValueError("@output.mergeAdapter: needs an adapter; with adapter.type none the full model is written anyway")
        check_bottleneck(self)
        if self.output.merge_adapter and not self.adapter.type.is_lora_family():
            raise ValueError(
                f"@output.mergeAdapter: works for lora, qlora, dora and rslora, not {self.adapter.type.value}"
            )
        check_distill_job(self)
        if self.model.keep_layers is not None and "trainer" not in self.algorithm.roles():
            raise ValueError(f"@model.keepLayers: is for algorithms that train on roles.trainer, not "
                             f"{self.algorithm.value}")
        if self.model.keep_layers is not None and self.adapter.type is not AdapterType.none:
            raise ValueError("@model.keepLayers: a layer-dropped model is a new model that no adapter's base matches; "
                             "train it in full (adapter.type none), so the output is a standalone model")
        problem = check_preference(self.algorithm.value, self.preference, adapter=self.adapter.type.value,
                                   target_modules=self.adapter.target_modules,
                                   micro_batch=self.training.micro_batch_size, formats={
                                       **{f"data.train[{i}]": d.format for i, d in enumerate(self.data.train)},
                                       **({"data.eval": self.data.eval.format} if self.data.eval else {})})
        if problem:
            raise ValueError(problem)
        if self.algorithm.trains():
            if self.training.max_steps is None and self.training.epochs is None:
                raise ValueError("@training.maxSteps: set maxSteps or epochs (for example maxSteps: 100)")
            if self.evaluation is not None:
                check_training_evaluation(self)
        if self.algorithm is not Algorithm.generate and self.generate is not None:
            raise ValueError(f"@generate: is for algorithm generate, not {self.algorithm.value}")
        if self.algorithm is Algorithm.generate:
            check_generate_job(self)
            if self.evaluation is not None:
                raise ValueError("@evaluation: is for algorithm evaluate and training jobs, not generate")
        elif self.algorithm is Algorithm.evaluate:
            check_evaluate_job(self)
        elif not self.runs_rl_actors():
            for role in RL_ROLES:
                if role == "rollout" and self.evaluation is not None:
                    continue  # the evaluation at the end samples on rollout actors
                if getattr(self.roles, role) is not None:
                    raise ValueError(f"@roles.{role}: is for grpo and ppo; {self.algorithm.value} runs on roles.trainer")
            if self.rl is not None:
                raise ValueError(f"@rl: is for grpo and ppo, not {self.algorithm.value}")
            if self.rewards:
                raise ValueError(f"@rewards: are for grpo and ppo; {self.algorithm.value} learns from its data")
        else:
            if self.algorithm.is_rl() and not self.rewards:  # (distill on_policy learns from its teacher)
                raise ValueError("@rewards: grpo and ppo need at least one reward, e.g. "
                                 "[{function: posttrain.jobs.rewards.builtin:exact_answer}]")
            advantage = self.rl.advantage if self.rl else None
            if self.algorithm is Algorithm.ppo and advantage not in (None, "gae"):
                raise ValueError(f"@rl.advantage: ppo uses gae with its critic, not {advantage}")
            if self.algorithm is Algorithm.grpo and advantage == "gae":
                raise ValueError("@rl.advantage: gae needs a critic; use algorithm ppo, or grpo/rloo/dr_grpo here")
            rollout = self.roles.rollout
            serving = lora_serving_problem(self.rl, adapter=self.adapter.type.value,
                                           engine=rollout.engine if rollout else None) if self.rl else None
            if serving:
                raise ValueError(serving)
            if self.placement == "colocated" and rollout is not None:
                default = RoleSpec()
                sized = [k for k in RoleSpec.model_fields if k != "engine" and getattr(rollout, k) != getattr(default, k)]
                if sized:
                    raise ValueError(f"@roles.rollout.{sized[0]}: with placement colocated an engine runs beside each "
                                     "learner on the learner's pods; size roles.learner (roles.rollout takes only engine)")
        names = [e.name for e in self.env]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"@env[{i}].name: {name} is set twice; keep one entry")
        for role in ("trainer", "learner", "reward", "teacher"):
            if (getattr(self.roles, role) or RoleSpec()).engine is not None:
                raise ValueError(f"@roles.{role}.engine: only roles.rollout has an inference engine")
        for role in ("trainer", "rollout", "reward", "teacher"):
            if (getattr(self.roles, role) or RoleSpec()).strategy is not None:
                raise ValueError(f"@roles.{role}.strategy: only roles.learner has a sharding strategy")
        t = self.training
        per_step = t.micro_batch_size * self.trainer_workers()
        if "trainer" in self.ray_roles() and t.global_batch_size % per_step:
            raise ValueError(
                f"@training.globalBatchSize: ({t.global_batch_size}) must be a multiple of microBatchSize x "
                f"trainer workers ({t.micro_batch_size} x {self.trainer_workers()} = {per_step}; "
                "workers are roles.trainer.replicas x max(1, gpus))"
            )
        return self

    def ray_roles(self) -> tuple[str, ...]:
        """The roles this job's Ray cluster has: evaluate's reward role only when it uses spec.rewards, generate's
        only for a judge (preference_pairs)."""
        roles = ON_POLICY_ROLES if self.runs_rl_actors() and not self.algorithm.is_rl() else self.algorithm.roles()
        if self.algorithm is Algorithm.evaluate and not (self.evaluation and self.evaluation.needs_rewards()):
            roles = tuple(r for r in roles if r != "reward")
        if self.algorithm is Algorithm.generate and self.generate is not None and not self.generate.uses_judge():
            roles = tuple(r for r in roles if r != "reward")
        if self.evaluation is not None and "trainer" in roles:
            roles += ("rollout",)  # a supervised job's evaluation at the end
        return roles

    def runs_rl_actors(self) -> bool:
        """Trains on the RL actors (learner, rollout): grpo, ppo, and distill mode on_policy (the student samples)."""
        on_policy = self.algorithm is Algorithm.distill and self.distill is not None and self.distill.mode == "on_policy"
        return self.algorithm.is_rl() or on_policy

    def trainer_workers(self) -> int:
        """Training processes: one per GPU of every trainer replica (one per replica on CPU)."""
        return self.roles.trainer.replicas * max(1, self.roles.trainer.gpus)

    def gradient_accumulation_steps(self) -> int:
        return self.training.global_batch_size // (self.training.micro_batch_size * self.trainer_workers())


class Metadata(BaseModel):
    """The parts of Kubernetes object metadata posttrain reads; the rest passes through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="DNS-1123 label: lowercase letters, digits and '-'.",
    )
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PostTrainingJob(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    api_version: Literal["posttrain.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["PostTrainingJob"]
    metadata: Metadata
    spec: PostTrainingJobSpec
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_not_own_reference(self) -> PostTrainingJob:
        for path, message in refs.errors(self.spec.wire(), own_name=self.metadata.name):
            raise ValueError(f"@{path}: {message}")
        return self
