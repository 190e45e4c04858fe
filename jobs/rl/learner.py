"""The learner side of GRPO / PPO: one torch.distributed group of FSDP2-sharded policy replicas.

The driver makes each `LearnerWorker` a Ray actor and calls the same method on
every rank (the methods run collectives, so all ranks must take part):

    Learner = ray.remote(num_cpus=1)(LearnerWorker)
    workers = [Learner.remote() for _ in range(W)]
    ray.get([w.setup.remote(r, W, addr, port, model_path, adapter.wire(), rl.wire(), 1e-6, 0)
             for r, w in enumerate(workers)])
    logp = ray.get([w.compute_logprobs.remote(batch) for w in workers])[0]       # every rank returns it all
    metrics = ray.get([w.train_step.remote(batch) for w in workers])[0]          # averaged across ranks
    named = ray.get([w.export_weights.remote(adapter_only=True) for w in workers])[0]   # rank 0 has them
    engine.load_weights(named)

Batch: `input_ids`, `attention_mask`, `completion_mask`, each (B, L) (lists or
tensors; prompt and completion in one row, any padding side). `completion_mask`
is 1 on the tokens the policy generated. `train_step` also takes `advantages`,
(B,) or (B, L), and optionally `old_logprobs` (B, L) from the rollout (default:
this policy's own logprobs at the start of the step, i.e. strictly on-policy).
Logprobs are aligned with `input_ids`: `logp[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])`,
0 where `completion_mask` is 0. Rows are split contiguously across ranks; a
batch whose size does not divide the world size is padded with empty rows.

Sharding: FSDP2 `fully_shard` on every decoder layer, then on the root, on a
1-D device mesh (gloo on CPU, nccl on GPU). Dropout stays off (the model is kept
in eval mode) so that the logprobs of the ratio and of the reference agree.

Reference policy (only when `rl.kl.beta > 0`): for a LoRA adapter, the same
model under `disable_adapter()`; for full fine-tuning, a frozen sharded copy.

Weights for the rollout engine (`export_weights`) use the plain transformers
names (`model.layers.0.self_attn.q_proj.weight`): for LoRA the adapter is folded
into the base weight (W + scaling * B @ A) so the engine's plain model needs no
PEFT. `adapter_only=True` sends only the adapted modules' merged weights.

Checkpoints (`save_checkpoint` / `load_checkpoint`) are torch.distributed.checkpoint
folders of the sharded model and optimizer state; every rank writes its shard, to a path
(a PVC) or straight to object storage (DCP's fsspec writer).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .actors import ActorBase
from .algos import POLICY_LOSSES
from .kl import entropy_from_logits, kl_penalty, uses_reference
from .masked import masked_mean

BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")


def _tensor(x: Any, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype)


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """logits (B, L, V) of a causal LM, input_ids (B, L) -> (B, L) float32 logprob of each token given
    its prefix; position 0 (no prefix) is 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


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


class LearnerWorker(ActorBase):
    """One rank of the learner group. Make it an actor with `ray.remote(num_cpus=...)(LearnerWorker)`."""

    def setup(self, rank: int, world_size: int, master_addr: str, master_port: int, model: str | dict[str, Any],
              adapter_spec_dict: dict[str, Any], rl_spec_dict: dict[str, Any], lr: float, seed: int, *,
              dtype: str = "auto", max_grad_norm: float = 1.0, micro_batch_size: int | None = None,
              weight_decay: float = 0.0, threads: int | None = 1, lr_scheduler: str = "constant",
              warmup_ratio: float = 0.0, total_steps: int | None = None,
              base_dir: str | None = None) -> dict[str, Any]:
        """Join the process group, load and shard the policy (and reference), build AdamW and its schedule.

        `model` is the job's `spec.model` (wire form; loaded on this actor's pod, see
        `models.model_on_this_pod`) or a local model folder.

        `lr_scheduler` (linear, cosine, constant, constant_with_warmup, as `training.lrScheduler`) runs over
        `total_steps` RL steps (one scheduler step per RL step, whatever `rl.ppo_epochs`), warming up for
        `warmup_ratio` of them.

        Returns {"rank", "backend", "sharding": "fsdp2", "trainable_params", "dtensor_params"} (the last
        counts parameters that `fully_shard` turned into DTensors: all of them).
        """
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from posttrain.api.rl import RLSpec
        from posttrain.api.spec import AdapterSpec, AdapterType
        from posttrain.jobs.models import load_for_training, model_on_this_pod

        if threads:
            torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.rl = RLSpec.model_validate(rl_spec_dict)
        self.adapter = AdapterSpec.model_validate(adapter_spec_dict)
        if self.adapter.type.is_virtual_tokens():
            raise ValueError(f"adapter type {self.adapter.type.value}: the RL learner supports full "
                             "fine-tuning and the LoRA family; prefix / prompt tuning has no weights to sync")
        self.loss_fn = POLICY_LOSSES.get(self.rl.loss_type)  # an unknown name fails in setup, not at step 1
        self.max_grad_norm, self.micro_batch_size = max_grad_norm, micro_batch_size
        self.device, backend = join_group(rank, world_size, master_addr, master_port)
        self.mesh = init_device_mesh(self.device.type, (world_size,))
        torch.manual_seed(seed)
        self.is_lora = self.adapter.type is not AdapterType.none
        model_path, model_spec = model_on_this_pod(model, dtype=dtype, base=base_dir)
        self.model_path = model_path  # this pod's copy: the base of a merged save

        def shard(m: torch.nn.Module) -> torch.nn.Module:
            m.to(self.device)
            for layer in decoder_layers(m):
                fully_shard(layer, mesh=self.mesh)
            fully_shard(m, mesh=self.mesh)
            return m.eval()  # no dropout: ratio and reference logprobs must be deterministic

        self.model = shard(load_for_training(model_path, model_spec, self.adapter))
        self.ref_model = None
        if uses_reference(self.rl.kl.beta) and not self.is_lora:
            self.ref_model = shard(load_for_training(model_path, model_spec, self.adapter)).requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        from transformers import get_scheduler

        total = max(1, total_steps or 1)
        self.scheduler = get_scheduler(lr_scheduler, self.optimizer, num_warmup_steps=int(warmup_ratio * total),
                                       num_training_steps=total)
        self.step = 0
        from torch.distributed.tensor import DTensor

        return {"rank": rank, "backend": backend, "sharding": "fsdp2",
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
            t = _tensor(value, torch.long if key in BATCH_KEYS else torch.float32)
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

    def _forward(self, model: Any, mb: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(B, L) logprobs, 0 off the completion, and the raw logits (B, L, V)."""
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                       position_ids=position_ids(mb["attention_mask"]), use_cache=False).logits
        logp = token_logprobs(logits, mb["input_ids"])
        return torch.where(mb["completion_mask"].bool(), logp, 0.0), logits

    @torch.no_grad()
    def _logprobs(self, shard: dict[str, Tensor], *, reference: bool = False) -> Tensor:
        out = []
        for mb in self._micro(shard):
            if reference and self.is_lora:
                with self.model.disable_adapter():
                    out.append(self._forward(self.model, mb)[0])
            else:
                out.append(self._forward(self.ref_model if reference else self.model, mb)[0])
        return torch.cat(out)

    def _gather_rows(self, local: Tensor, size: int) -> Tensor:
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)[:size].cpu()

    def compute_logprobs(self, batch: dict[str, Any]) -> Tensor:
        """(B, L) logprobs of the batch's completion tokens under the current policy (on every rank)."""
        shard, size = self._shard(batch)
        return self._gather_rows(self._logprobs(shard), size)

    def reference_logprobs(self, batch: dict[str, Any]) -> Tensor:
        """(B, L) logprobs under the reference policy (LoRA: adapter disabled). Needs kl.beta > 0 for
        full fine-tuning (no frozen copy is kept otherwise)."""
        if not self.is_lora and self.ref_model is None:
            raise RuntimeError("no reference policy: full fine-tuning keeps one only when rl.kl.beta > 0")
        shard, size = self._shard(batch)
        return self._gather_rows(self._logprobs(shard, reference=True), size)

    # ---- training --------------------------------------------------------------------------------

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        """`rl.ppo_epochs` optimizer steps over the batch, each accumulating gradients over micro-batches.

        Returns metrics averaged over ranks and epochs: loss, kl (the unscaled estimate; 0 when beta is 0),
        entropy, clip_fraction, grad_norm (before clipping), lr.
        """
        shard, _ = self._shard(batch)
        mask = shard["completion_mask"]
        adv = shard["advantages"]
        if adv.dim() == 1:
            adv = adv.unsqueeze(-1).expand_as(mask)
        shard["advantages"] = torch.where(mask.bool(), adv, 0.0)
        # Without rollout logprobs the ratio's denominator is this policy before the step: the first epoch's
        # own forward, detached (dropout is off and no update happens before every micro-batch has run),
        # kept for later epochs; no extra forward pass.
        given_old = "old_logprobs" in shard
        beta = self.rl.kl.beta
        if uses_reference(beta):
            shard["ref_logprobs"] = self._logprobs(shard, reference=True)  # once per step
        clip_high = self.rl.clip_high if self.rl.clip_high is not None else self.rl.clip_low
        micro = self._micro(shard)
        totals: dict[str, float] = {}
        for _ in range(self.rl.ppo_epochs):
            self.optimizer.zero_grad(set_to_none=True)
            sums = torch.zeros(4, dtype=torch.float64)
            for mb in micro:
                logp, logits = self._forward(self.model, mb)
                if not given_old and "old_logprobs" not in mb:
                    mb["old_logprobs"] = logp.detach()  # stored in the micro-batch dict for the next epochs
                penalty = kl_penalty(logp, mb.get("ref_logprobs"), mb["completion_mask"], beta=beta,
                                     estimator=self.rl.kl.estimator)
                loss, metrics = self.loss_fn(logp, mb["old_logprobs"], mb["advantages"], mb["completion_mask"],
                                             clip_low=self.rl.clip_low, clip_high=clip_high,
                                             max_length=self.rl.max_new_tokens,
                                             kl_penalty=penalty if uses_reference(beta) else None)
                (loss / len(micro)).backward()
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits.detach(), mb["completion_mask"]),
                                          mb["completion_mask"])
                    kl = masked_mean(penalty, mb["completion_mask"]) / beta if beta else torch.zeros(())
                    sums += torch.stack([loss.detach().double().cpu(), kl.double().cpu(),
                                         entropy.double().cpu(), metrics["clip_fraction"].double().cpu()])
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], self.max_grad_norm)
            if hasattr(grad_norm, "full_tensor"):
                grad_norm = grad_norm.full_tensor()
            self.optimizer.step()
            self.step += 1
            sums = (sums / len(micro)).to(self.device)
            dist.all_reduce(sums)  # sum over ranks, then the mean
            sums = (sums / self.world_size).cpu()
            for key, value in zip(("loss", "kl", "entropy", "clip_fraction"), sums.tolist()):
                totals[key] = totals.get(key, 0.0) + value / self.rl.ppo_epochs
            totals["grad_norm"] = totals.get("grad_norm", 0.0) + float(grad_norm) / self.rl.ppo_epochs
        totals["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()  # one schedule step per RL step
        return totals

    # ---- weights and checkpoints ----------------------------------------------------------------

    def export_weights(self, adapter_only: bool = False) -> list[tuple[str, Tensor]]:
        """HF-named full tensors on CPU for the rollout engine, on rank 0 (other ranks return []).

        A collective: call it on every rank. LoRA weights come merged (W + scaling * B @ A) under the
        base module's name; `adapter_only` keeps only those (full fine-tuning has no adapter: error).
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if adapter_only and not self.is_lora:
            raise ValueError("adapter_only export needs a LoRA adapter; full fine-tuning sends every weight")
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return []
        if not self.is_lora:
            return list(state.items())
        return merge_lora_state(state, self._lora_scalings(), adapter_only=adapter_only)

    def _lora_scalings(self) -> dict[str, float]:
        """{peft module name: scaling} for every LoRA layer; DoRA cannot be merged this way."""
        from peft.tuners.lora import LoraLayer

        out = {}
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and "default" in getattr(module, "scaling", {}):
                if getattr(module, "use_dora", {}).get("default", False):
                    raise NotImplementedError("merged export of a DoRA adapter (magnitude vector) is not implemented")
                out[name] = float(module.scaling["default"])
        return out

    def save_pretrained(self, dest: str, *, merge: bool = False, extra_files: dict[str, bytes] | None = None) -> str | None:
        """Publish the trained policy as a Hugging Face folder at `dest` (a path, a PVC path or object storage;
        `storage.publish_tree`: written whole, replacing an older one). A collective: call on every rank;
        rank 0 writes.

        Full fine-tuning: the model. LoRA: the adapter (`adapter_config.json` + weights), or with `merge` a
        standalone model (this pod's base weights with the adapter folded in). `extra_files` (name -> bytes,
        e.g. the tokenizer's files) go in too. Returns what was written ("model" or "adapter") on rank 0.
        """
        import shutil
        import tempfile

        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from posttrain.jobs import storage

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        staging = Path(tempfile.mkdtemp(prefix="posttrain-policy-"))
        try:
            if not self.is_lora:
                self.model.save_pretrained(staging, state_dict=state)
                written = "model"
            elif not merge:
                from peft import get_peft_model_state_dict

                self.model.save_pretrained(staging, state_dict=get_peft_model_state_dict(self.model, state_dict=state))
                written = "adapter"
            else:
                from transformers import AutoModelForCausalLM

                from .engines import load_into_hf_model

                plain = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
                load_into_hf_model(plain, merge_lora_state(state, self._lora_scalings(), adapter_only=True))
                plain.save_pretrained(staging)
                written = "model"
            for name, data in (extra_files or {}).items():
                (staging / name).write_bytes(data)
            storage.publish_tree(staging, storage.resolve(dest))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return written

    def save_checkpoint(self, path: str) -> None:
        """Write this rank's model and optimizer shards into `path` (a DCP folder) plus `learner.json`."""
        save_sharded(self, path, "learner.json", {"scheduler": self.scheduler.state_dict()})

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore model and optimizer shards written by `save_checkpoint` (any world size); returns learner.json."""
        meta = load_sharded(self, path, "learner.json")
        if "scheduler" in meta:
            self.scheduler.load_state_dict(meta["scheduler"])
        return meta

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


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


def save_sharded(worker: Any, path: str, meta_file: str, extra: dict[str, Any] | None = None) -> None:
    """Every rank writes its shards of `worker.model` and `worker.optimizer` into the DCP folder `path`;
    rank 0 adds `meta_file` ({"step", "world_size", **extra}). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from posttrain.jobs import storage

    model_sd, optim_sd = get_state_dict(worker.model, worker.optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)  # a path or an fsspec URL (s3://...)
    if worker.rank == 0:
        meta = {"step": worker.step, "world_size": worker.world_size, **(extra or {})}
        storage.write_text(storage.resolve(path).child(meta_file), json.dumps(meta))
    dist.barrier()


def load_sharded(worker: Any, path: str, meta_file: str) -> dict[str, Any]:
    """Restore what `save_sharded` wrote (any world size) into `worker`; sets `worker.step`, returns the meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(worker.model, worker.optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(worker.model, worker.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    from posttrain.jobs import storage

    meta = json.loads(storage.read_text(storage.resolve(path).child(meta_file)) or "{}")
    worker.step = int(meta["step"])
    return meta


def merge_lora_state(state: dict[str, Tensor], scalings: dict[str, float], *,
                     adapter_only: bool) -> list[tuple[str, Tensor]]:
    """A PEFT model's full state dict -> plain HF names with each LoRA update folded in.

    `base_model.model.X.base_layer.weight` + `X.lora_A.default.weight` (r, in) and
    `X.lora_B.default.weight` (out, r) become `X.weight` = W + scaling * B @ A; lora tensors
    are dropped; other tensors are renamed (only kept when not `adapter_only`).
    """
    prefix = "base_model.model."
    out: list[tuple[str, Tensor]] = []
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        plain = name.removeprefix(prefix).replace(".base_layer.", ".")
        module = name.rsplit(".", 1)[0].removesuffix(".base_layer")
        if name.endswith(".base_layer.weight") and module in scalings:
            a = state[f"{module}.lora_A.default.weight"].float()
            b = state[f"{module}.lora_B.default.weight"].float()
            tensor = (tensor.float() + scalings[module] * (b @ a)).to(tensor.dtype)
            out.append((plain, tensor))
        elif not adapter_only:
            out.append((plain, tensor))
    return out


def free_port() -> int:
    """An unused TCP port on this host, for the group's `master_port`."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]

