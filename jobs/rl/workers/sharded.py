"""The base of every sharded model worker (the policy learner, PPO's critic): one rank of an FSDP2 group.

What the learner and the critic share lives here once: joining the rank's torch.distributed group
(NCCL on GPU, gloo on CPU), the 1-D device mesh, `fully_shard` per decoder layer, cutting a batch
into this rank's rows and its micro-batches, gathering rows back, the epochs of accumulated and
clipped optimizer steps, and DCP checkpoints of model and optimizer (to a path or object storage).

A subclass implements `setup(job, rank=..., world_size=..., master_addr=..., master_port=...)`
(calling `join` first) and its own step through `fit`. Every method that runs a collective must be
called on every rank.

Precision: a half-precision `model.dtype` (bf16 or fp16; `auto` is bf16 on GPU) computes in that
dtype but keeps fp32 master weights and optimizer state (`precision`: full fine-tuning loads fp32
weights, and FSDP2's `MixedPrecisionPolicy` casts them for the forward and backward, reducing
gradients in fp32). In pure bf16, AdamW updates below the weights' 8-bit mantissa (a learning rate
of 1e-6) round to nothing and the run silently stops learning.

Mode: the model trains in train mode (gradient checkpointing runs only there) with every dropout at
zero (`train_without_dropout`), so the ratio's and the reference's logprobs stay deterministic.
After each step the gradients are freed and, on GPU, the cached blocks returned, so a colocated
engine can take the memory back for generation.
"""

from __future__ import annotations

import datetime
import json
import math
from typing import Any, Callable, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from .base import ActorBase

BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")
INTEGER_KEYS = (*BATCH_KEYS, "teacher_ids")  # token ids stay long when sharded; the rest travels as float32


def _tensor(x: Any, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions that count only attended tokens, as `generate` computes them (left padding safe)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The transformer blocks of a (PEFT-wrapped) HF model: modules whose class is in `_no_split_modules`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise RuntimeError(f"{type(base).__name__} names no decoder layer class (_no_split_modules={names})")
    return layers


def join_group(rank: int, world_size: int, master_addr: str, master_port: int) -> tuple[torch.device, str]:
    """Join this process's default torch.distributed group (NCCL on GPU, gloo on CPU); (device, backend).

    A process holds one default group: joining again with another rank or size is an error.
    """
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(minutes=30))
    elif (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise RuntimeError(f"this process already belongs to a group as rank {dist.get_rank()} of "
                           f"{dist.get_world_size()}; run each group's ranks in their own actors")
    return device, backend


def precision(dtype: str, *, full_weights: bool) -> tuple[str, Any]:
    """(dtype to load the weights in, FSDP2 MixedPrecisionPolicy or None) for a `model.dtype`
    (`models.master_weights`: fp32 masters, half-precision compute)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from posttrain.jobs.models import master_weights

    load, compute = master_weights(dtype, full_weights=full_weights, on_gpu=torch.cuda.is_available())
    if compute is None:
        return dtype, None
    return load, MixedPrecisionPolicy(param_dtype=getattr(torch, compute), reduce_dtype=torch.float32)


def train_without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode (gradient checkpointing runs only there) with every dropout probability set to 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("attention_dropout", "dropout_rate", "hidden_dropout"):  # floats read in forward()
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model.train()


def free_port() -> int:
    """An unused TCP port on this host, for a group's `master_port`."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ShardedWorker(ActorBase):
    """One rank of an FSDP2-sharded model with an AdamW optimizer (`self.model`, `self.optimizer`)."""

    META_FILE: ClassVar[str] = "worker.json"  # rank 0's JSON beside the DCP shards of a checkpoint
    max_grad_norm: float = 1.0

    def join(self, *, rank: int, world_size: int, master_addr: str, master_port: int, threads: int | None,
             micro_batch_size: int | None, epochs: int) -> str:
        """Join the group and set up the mesh; returns the backend."""
        from torch.distributed.device_mesh import init_device_mesh

        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size, self.epochs, self.step = micro_batch_size, epochs, 0
        self.device, backend = join_group(rank, world_size, master_addr, master_port)
        self.mesh = init_device_mesh(self.device.type, (world_size,))
        return backend

    def shard_model(self, model: torch.nn.Module, *, layers_of: torch.nn.Module | None = None,
                    extra_units: tuple[torch.nn.Module, ...] = (), mp_policy: Any = None) -> torch.nn.Module:
        """`fully_shard` each decoder layer (of `layers_of`, default the model), each extra unit, then the root;
        in train mode without dropout. `mp_policy`: FSDP2's MixedPrecisionPolicy (see `precision`)."""
        from torch.distributed.fsdp import fully_shard

        kwargs: dict[str, Any] = {"mesh": self.mesh}
        if mp_policy is not None:
            kwargs["mp_policy"] = mp_policy
        self.mp_policy = mp_policy
        model.to(self.device)
        for layer in decoder_layers(layers_of if layers_of is not None else model):
            fully_shard(layer, **kwargs)
        for unit in extra_units:
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)
        return train_without_dropout(model)

    def describe(self, backend: str) -> dict[str, Any]:
        """What setup reports: the group, and proof that every parameter was sharded (DTensors)."""
        from torch.distributed.tensor import DTensor

        params = [p for p in self.model.parameters() if p.requires_grad]
        return {"rank": self.rank, "backend": backend, "sharding": "fsdp2",
                "trainable_params": sum(p.numel() for p in params),
                "dtensor_params": sum(isinstance(p, DTensor) for p in self.model.parameters()),
                "params": sum(1 for _ in self.model.parameters())}

    # ---- batches ---------------------------------------------------------------------------------

    def _shard(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], int]:
        """This rank's rows of `batch` (padded to a multiple of the world size with empty rows); and B."""
        ids = _tensor(batch["input_ids"], torch.long)
        size = ids.shape[0]
        per_rank = math.ceil(size / self.world_size)
        pad = per_rank * self.world_size - size
        out: dict[str, Tensor] = {}
        for key, value in batch.items():
            if value is None:
                continue
            t = _tensor(value, torch.long if key in INTEGER_KEYS else torch.float32)
            if pad:  # empty rows: a copy of row 0 with every mask at 0
                filler = t[:1].expand(pad, *t.shape[1:]).clone()
                if key in ("attention_mask", "completion_mask"):
                    filler.zero_()
                    if key == "attention_mask":
                        filler[:, 0] = 1  # one attended token keeps attention finite
                t = torch.cat([t, filler])
            out[key] = t[self.rank * per_rank:(self.rank + 1) * per_rank].to(self.device)
        return out, size

    def _micro(self, shard: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        rows = shard["input_ids"].shape[0]
        size = self.micro_batch_size or rows
        return [{k: v[i:i + size] for k, v in shard.items()} for i in range(0, rows, size)]

    def _gather_rows(self, local: Tensor, size: int) -> Tensor:
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)[:size].cpu()

    # ---- optimizer steps -------------------------------------------------------------------------

    def fit(self, micro: list[dict[str, Tensor]], loss_of: Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]],
            weights: list[float] | None = None) -> tuple[list[float], float]:
        """`self.epochs` optimizer steps over `micro`, each accumulating gradients over every micro-batch and
        clipping them to `max_grad_norm`. `loss_of(mb)` returns (loss, a 1-D tensor of metrics); `weights`
        (summing to 1, default equal) weigh each micro-batch's loss and metrics (`rl.micro.loss_shares`).

        Returns the metrics averaged over micro-batches, ranks and epochs, and the mean grad norm (before
        clipping). A collective.
        """
        weights = weights or [1 / len(micro)] * len(micro)
        totals: Tensor | None = None
        grad_norms = 0.0
        for _ in range(self.epochs):
            self.optimizer.zero_grad(set_to_none=True)
            sums: Tensor | None = None
            for mb, weight in zip(micro, weights):
                loss, metrics = loss_of(mb)
                (loss * weight).backward()
                metrics = metrics.detach().double().cpu() * weight
                sums = metrics if sums is None else sums + metrics
            # the parameters as they are now: FSDP2 may re-register them at its lazy init (first forward)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                                       self.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.step += 1
            assert sums is not None
            sums = sums.to(self.device)
            dist.all_reduce(sums)  # sum over ranks, then the mean
            epoch = (sums / self.world_size).cpu()
            totals = epoch if totals is None else totals + epoch
            grad_norms += float(grad_norm)
        assert totals is not None
        self.release_memory()
        return (totals / self.epochs).tolist(), grad_norms / self.epochs

    def release_memory(self) -> None:
        """Free the gradients and hand cached device blocks back (a colocated engine generates next)."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- checkpoints -----------------------------------------------------------------------------

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a subclass keeps in META_FILE besides the step (e.g. the LR schedule)."""
        return {}

    def restore_extra(self, meta: dict[str, Any]) -> None:
        """Restore what `checkpoint_extra` kept."""

    def save_checkpoint(self, path: str) -> None:
        """Every rank writes its shards of model and optimizer into the DCP folder `path` (a path or an
        fsspec URL such as s3://...); rank 0 adds META_FILE. A collective."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        from posttrain.jobs.run import storage

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        if self.rank == 0:
            meta = {"step": self.step, "world_size": self.world_size, **self.checkpoint_extra()}
            storage.write_text(storage.resolve(path).child(self.META_FILE), json.dumps(meta))
        dist.barrier()

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore what `save_checkpoint` wrote (any world size); returns META_FILE's content."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from posttrain.jobs.run import storage

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        meta = json.loads(storage.read_text(storage.resolve(path).child(self.META_FILE)) or "{}")
        self.step = int(meta.get("step", 0))
        self.restore_extra(meta)
        return meta

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
