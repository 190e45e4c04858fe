"""The PPO critic: a value model on its own torch.distributed group of FSDP2-sharded ranks.

The driver makes each `CriticWorker` a Ray actor, separate from the learners (a process holds one
default process group, so the critic ranks form their own group on their own port), and calls the
same method on every rank (the methods run collectives):

    Critic = ray.remote(num_cpus=1)(CriticWorker)
    critics = [Critic.remote() for _ in range(W)]
    ray.get([c.setup.remote(job, rank=r, world_size=W, master_addr=addr, master_port=free_port())
             for r, c in enumerate(critics)])       # job: the validated PostTrainingJob
    values = ray.get([c.compute_values.remote(batch) for c in critics])[0]         # every rank returns it all
    adv, returns = gae_advantages(rewards, batch["completion_mask"], values=values, gamma=..., lam=...)
    metrics = ray.get([c.train_step.remote({**batch, "returns": returns, "old_values": values})
                       for c in critics])[0]                                         # averaged across ranks

Model: the policy's base model without its LM head (`AutoModel`, e.g. `LlamaModel`) and a scalar
head `Linear(hidden, 1)` in float32, initialised to zero so that every value starts at 0. With a
LoRA-family adapter the backbone gets its own adapter (same spec as the policy's) and the head
trains with it; with `type: none` everything trains. Learning rate: `rl.criticLearningRate`,
else `training.learningRate`; `model.gradientCheckpointing` applies to the backbone.

Batch: as `LearnerWorker`'s (`input_ids`, `attention_mask`, `completion_mask`, each (B, L));
`train_step` also takes `returns` (B, L) and optionally `old_values` (B, L), the values at rollout
time (default: this critic's values at the start of the step). Values are aligned like the
learner's logprobs: `values[b, t]` is V of the state `input_ids[b, :t]`, the prefix before token
t is generated, read from the hidden state at position t - 1; 0 where `completion_mask` is 0. So
`values`, the learner's logprobs and per-token rewards share one index, which is what
`gae_advantages` expects. Row split, padding rows, micro-batches, epochs and checkpoints are
`sharded.ShardedWorker`'s, as for the learner: `fully_shard` per decoder layer, on the head, then
on the root; eval mode (no dropout); DCP folders of model and optimizer plus `critic.json`.

    pytest -m slow tests/test_rl_critic.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..math.algos import value_loss
from .sharded import ShardedWorker, position_ids, precision

if TYPE_CHECKING:
    from posttrain.api.spec import AdapterSpec, ModelSpec, PostTrainingJob

METRICS = ("value_loss", "value_clip_fraction", "value_mean", "critic_grad_norm")


class ValueHead(torch.nn.Linear):
    """Linear(hidden, 1) that maps (B, L, H) to (B, L) float32, returning a new tensor rather than a view
    (FSDP2 hooks each unit's output, and a view's in-place use would bypass that hook)."""

    def forward(self, hidden: Tensor) -> Tensor:
        return hidden.float() @ self.weight[0] + self.bias


class ValueModel(torch.nn.Module):
    """backbone + scalar head: input_ids, attention_mask (B, L) -> (B, L) float32 score of each position's
    hidden state (the value of the prefix *including* that token; `CriticWorker` shifts it by one)."""

    def __init__(self, backbone: torch.nn.Module, hidden_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        # float32 even under a bf16 backbone: the head is tiny and the regression target is a scalar
        self.head = ValueHead(hidden_size, 1, dtype=torch.float32)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return self.head(hidden)


def load_value_model(model_path: str, model_spec: ModelSpec, adapter: AdapterSpec) -> ValueModel:
    """`AutoModel` (no LM head) of `model_path`, wrapped in the adapter's LoRA when it has one, plus the head."""
    from transformers import AutoModel

    from posttrain.api.spec import AdapterType
    from posttrain.jobs.models import _peft_config, hub_revision, torch_dtype

    backbone = AutoModel.from_pretrained(model_path, dtype=torch_dtype(model_spec.dtype),
                                         revision=hub_revision(model_spec),
                                         trust_remote_code=model_spec.trust_remote_code)
    if model_spec.gradient_checkpointing:
        backbone.gradient_checkpointing_enable()
    hidden = backbone.config.get_text_config().hidden_size
    if adapter.type is not AdapterType.none:
        import peft

        config = _peft_config(adapter)
        config.task_type = "FEATURE_EXTRACTION"  # a headless model: hidden states out, no LM loss
        backbone = peft.get_peft_model(backbone, config)
    return ValueModel(backbone, hidden)


class CriticWorker(ShardedWorker):
    """One rank of the critic group. Make it an actor with `ray.remote(num_cpus=...)(CriticWorker)`."""

    META_FILE = "critic.json"

    def setup(self, job: PostTrainingJob, *, rank: int, world_size: int, master_addr: str, master_port: int,
              threads: int | None = 1, base_dir: str | None = None) -> dict[str, Any]:
        """Join (or start) the critic's process group, load and shard the value model, build AdamW.

        Returns {"rank", "backend", "sharding": "fsdp2", "trainable_params", "dtensor_params", "params", "lr"}.
        """
        from posttrain.api.spec import AdapterType
        from posttrain.jobs.models import model_on_this_pod

        spec = job.spec
        self.rl, self.adapter, training = spec.rl, spec.adapter, spec.training
        if self.rl is None:
            raise ValueError("spec.rl is missing: the critic needs the job's resolved RL settings")
        if self.adapter.type.is_virtual_tokens() or self.adapter.type is AdapterType.qlora:
            raise ValueError(f"adapter type {self.adapter.type.value}: the critic supports full fine-tuning and "
                             "lora, dora or rslora (no 4-bit base, no virtual tokens); use type lora for the critic")
        backend = self.join(rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
                            threads=threads, micro_batch_size=training.micro_batch_size, epochs=self.rl.ppo_epochs)
        torch.manual_seed(training.seed)
        load_dtype, mp_policy = precision(spec.model.dtype, full_weights=self.adapter.type is AdapterType.none)
        model_path, model_spec = model_on_this_pod(spec.model, base=base_dir, dtype=load_dtype)
        model = load_value_model(model_path, model_spec, self.adapter)
        # the head is its own unit (float32 beside a possibly bf16 backbone)
        self.model = self.shard_model(model, layers_of=model.backbone, extra_units=(model.head,), mp_policy=mp_policy)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.lr = self.rl.critic_learning_rate or training.learning_rate
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=training.weight_decay)
        return {**self.describe(backend), "lr": self.lr}

    # ---- values ----------------------------------------------------------------------------------

    def _forward(self, mb: dict[str, Tensor]) -> Tensor:
        """(B, L) float32 values: V(input_ids[:, :t]) at t from the hidden state at t - 1; 0 off the completion."""
        scores = self.model(mb["input_ids"], mb["attention_mask"])
        values = torch.cat([torch.zeros_like(scores[:, :1]), scores[:, :-1]], dim=1)
        return torch.where(mb["completion_mask"].bool(), values, 0.0)

    @torch.no_grad()
    def _values(self, shard: dict[str, Tensor]) -> Tensor:
        return torch.cat([self._forward(mb) for mb in self._micro(shard)])

    def compute_values(self, batch: dict[str, Any]) -> Tensor:
        """(B, L) float32 values of the batch's completion positions (on every rank)."""
        shard, size = self._shard(batch)
        return self._gather_rows(self._values(shard), size)

    # ---- training --------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """`rl.ppo_epochs` AdamW steps on the clipped value loss (clip `rl.value_clip` around `old_values`),
        each accumulating gradients over micro-batches and clipping them to `max_grad_norm`.

        Returns {value_loss, value_clip_fraction, value_mean, critic_grad_norm (before clipping)},
        averaged over ranks and epochs.
        """
        if batch.get("returns") is None:
            raise KeyError("train_step needs `returns` (B, L): the GAE targets from gae_advantages")
        shard, _ = self._shard(batch)
        if "old_values" not in shard:
            shard["old_values"] = self._values(shard)

        def loss_of(mb: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            loss, metrics = value_loss(self._forward(mb), mb["old_values"], mb["returns"], mb["completion_mask"],
                                       value_clip=self.rl.value_clip)
            return loss, torch.stack([loss.detach(), metrics["value_clip_fraction"], metrics["value_mean"]])

        means, grad_norm = self.fit(self._micro(shard), loss_of)
        return dict(zip(METRICS, [*means, grad_norm]))
