"""The PPO critic: a value model on its own torch.distributed group of FSDP2-sharded ranks.

The driver makes each `CriticWorker` a Ray actor, separate from the learners (a process holds one
default process group, so the critic ranks form their own group on their own port), and calls the
same method on every rank (the methods run collectives):

    Critic = ray.remote(num_cpus=1)(CriticWorker)
    critics = [Critic.remote() for _ in range(W)]
    ray.get([c.setup.remote(r, W, addr, free_port(), model_path, adapter.wire(), rl.wire(), lr, seed)
             for r, c in enumerate(critics)])
    values = ray.get([c.compute_values.remote(batch) for c in critics])[0]         # every rank returns it all
    adv, returns = gae_advantages(rewards, batch["completion_mask"], values=values, gamma=..., lam=...)
    metrics = ray.get([c.train_step.remote({**batch, "returns": returns, "old_values": values})
                       for c in critics])[0]                                         # averaged across ranks

Model: the policy's base model without its LM head (`AutoModel`, e.g. `LlamaModel`) and a scalar
head `Linear(hidden, 1)` in float32, initialised to zero so that every value starts at 0. With a
LoRA-family adapter the backbone gets its own adapter (same spec as the policy's) and the head
trains with it; with `type: none` everything trains. Learning rate: `rl.critic_learning_rate`,
else the `lr` given to `setup`.

Batch: as `LearnerWorker`'s (`input_ids`, `attention_mask`, `completion_mask`, each (B, L));
`train_step` also takes `returns` (B, L) and optionally `old_values` (B, L), the values at rollout
time (default: this critic's values at the start of the step). Values are aligned like the
learner's logprobs: `values[b, t]` is V of the state `input_ids[b, :t]`, the prefix before token
t is generated, read from the hidden state at position t - 1; 0 where `completion_mask` is 0. So
`values`, the learner's logprobs and per-token rewards share one index, which is what
`gae_advantages` expects. Row split, padding rows and micro-batches are the learner's own code.

Sharding and checkpoints as in `learner`: `fully_shard` per decoder layer, on the head, then on
the root; eval mode (no dropout); DCP folders of model and optimizer plus `critic.json`.

    pytest -m slow tests/test_rl_critic.py
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

from .actors import ActorBase
from .algos import value_loss
from .learner import LearnerWorker, decoder_layers, join_group, load_sharded, position_ids, save_sharded

if TYPE_CHECKING:
    from posttrain.api.spec import AdapterSpec, ModelSpec

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
    hidden = backbone.config.get_text_config().hidden_size
    if adapter.type is not AdapterType.none:
        import peft

        config = _peft_config(adapter)
        config.task_type = "FEATURE_EXTRACTION"  # a headless model: hidden states out, no LM loss
        backbone = peft.get_peft_model(backbone, config)
    return ValueModel(backbone, hidden)


class CriticWorker(ActorBase):
    """One rank of the critic group. Make it an actor with `ray.remote(num_cpus=...)(CriticWorker)`."""

    # The learner's row split (padding rows), micro-batching and gather: both sides cut a batch alike.
    _shard = LearnerWorker._shard
    _micro = LearnerWorker._micro
    _gather_rows = LearnerWorker._gather_rows

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, model: str | dict[str, Any],
              adapter_spec_dict: dict[str, Any], rl_spec_dict: dict[str, Any], lr: float, seed: int, *,
              dtype: str = "auto", max_grad_norm: float = 1.0, micro_batch_size: int | None = None,
              weight_decay: float = 0.0, threads: int | None = 1, base_dir: str | None = None) -> dict[str, Any]:
        """Join (or start) the critic's process group, load and shard the value model, build AdamW.
        `model`: the job's `spec.model` (wire form, loaded on this pod) or a local model folder.

        Returns {"rank", "backend", "sharding": "fsdp2", "trainable_params", "dtensor_params", "params", "lr"}.
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        from posttrain.api.rl import RLSpec
        from posttrain.api.spec import AdapterSpec, AdapterType
        from posttrain.jobs.models import model_on_this_pod

        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.rl = RLSpec.model_validate(rl_spec_dict)
        self.adapter = AdapterSpec.model_validate(adapter_spec_dict)
        if self.adapter.type.is_virtual_tokens() or self.adapter.type is AdapterType.qlora:
            raise ValueError(f"adapter type {self.adapter.type.value}: the critic supports full fine-tuning and "
                             "lora, dora or rslora (no 4-bit base, no virtual tokens); use type lora for the critic")
        self.max_grad_norm, self.micro_batch_size = max_grad_norm, micro_batch_size
        self.device, backend = join_group(rank, world_size, master_addr, master_port)
        self.mesh = init_device_mesh(self.device.type, (world_size,))
        torch.manual_seed(seed)

        model_path, model_spec = model_on_this_pod(model, dtype=dtype, base=base_dir)
        model = load_value_model(model_path, model_spec, self.adapter).to(self.device)
        for layer in decoder_layers(model.backbone):
            fully_shard(layer, mesh=self.mesh)
        fully_shard(model.head, mesh=self.mesh)  # its own unit: float32 beside a possibly bf16 root
        fully_shard(model, mesh=self.mesh)
        self.model = model.eval()  # no dropout: values and their gradients are deterministic
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.lr = self.rl.critic_learning_rate or lr
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=weight_decay)
        self.step = 0
        return {"rank": rank, "backend": backend, "sharding": "fsdp2", "lr": self.lr,
                "trainable_params": sum(p.numel() for p in params),
                "dtensor_params": sum(isinstance(p, DTensor) for p in self.model.parameters()),
                "params": sum(1 for _ in self.model.parameters())}

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
        micro = self._micro(shard)
        params = [p for p in self.model.parameters() if p.requires_grad]
        totals = dict.fromkeys(METRICS, 0.0)
        for _ in range(self.rl.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(3, dtype=torch.float64)
            for mb in micro:
                loss, metrics = value_loss(self._forward(mb), mb["old_values"], mb["returns"],
                                           mb["completion_mask"], value_clip=self.rl.value_clip)
                (loss / len(micro)).backward()
                sums += torch.stack([loss.detach(), metrics["value_clip_fraction"],
                                     metrics["value_mean"]]).double().cpu()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.step += 1
            sums = (sums / len(micro)).to(self.device)
            dist.all_reduce(sums)  # sum over ranks, then the mean
            epoch = (sums / self.world_size).cpu().tolist() + [float(grad_norm)]
            for key, value in zip(METRICS, epoch):
                totals[key] += value / self.rl.ppo_epochs
        return totals

    # ---- checkpoints -----------------------------------------------------------------------------

    def save_checkpoint(self, path: str) -> None:
        """Write this rank's model and optimizer shards into `path` (a DCP folder) plus `critic.json`."""
        save_sharded(self, path, "critic.json")

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore model and optimizer shards written by `save_checkpoint` (any world size); returns critic.json."""
        return load_sharded(self, path, "critic.json")

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
