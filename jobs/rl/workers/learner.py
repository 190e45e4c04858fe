"""The learner side of GRPO / PPO: one torch.distributed group of FSDP2-sharded policy replicas.

The driver makes each `LearnerWorker` a Ray actor and calls the same method on
every rank (the methods run collectives, so all ranks must take part):

    Learner = ray.remote(num_cpus=1)(LearnerWorker)
    workers = [Learner.remote() for _ in range(W)]
    ray.get([w.setup.remote(job, rank=r, world_size=W, master_addr=addr, master_port=port, total_steps=100)
             for r, w in enumerate(workers)])     # job: the validated PostTrainingJob
    logp = ray.get([w.compute_logprobs.remote(batch) for w in workers])[0]       # every rank returns it all
    metrics = ray.get([w.train_step.remote(batch) for w in workers])[0]          # averaged across ranks
    named = ray.get([w.export_weights.remote(adapter_only=True) for w in workers])[0]   # rank 0 has them
    engine.load_weights(named)

Batch: `input_ids`, `attention_mask`, `completion_mask`, each (B, L) (lists or
tensors; prompt and completion in one row, any padding side). `completion_mask`
is 1 on the tokens the policy generated. `train_step` also takes `advantages`,
(B,) or (B, L), and optionally `old_logprobs` (B, L) (default: this policy's own logprobs at the
start of the step) and `rollout_logprobs` (B, L), the engines' logprobs of the sampled tokens, which
`rl.rolloutCorrection` (tis, mis) weighs each token's loss by (`math.algos.rollout_correction_weights`).
Logprobs are aligned with `input_ids`: `logp[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])`,
0 where `completion_mask` is 0. Rows are split contiguously across ranks; a
batch whose size does not divide the world size is padded with empty rows.

Everything comes from the job: `spec.model` (with every field: dtype, trustRemoteCode,
gradientCheckpointing; loaded on this actor's pod), `spec.adapter`, `spec.rl`, and
`spec.training` (learning rate, schedule, warmup, weight decay, micro-batch size, seed).

Micro-batches (`rl.micro`): `training.microBatchSize` rows, or with `rl.microBatchTokens` rows sorted by
length and binned to that many tokens; each cut to its own longest row, and weighed by its share of what
the loss averages over, so the step's loss and gradient are those of the whole batch at once.

Sharding, epochs and checkpoints: `sharded.ShardedWorker` (FSDP2
`fully_shard` per decoder layer, then the root, on a 1-D device mesh; gloo on CPU,
nccl on GPU). Dropout stays off (the model is kept in eval mode) so that the
logprobs of the ratio and of the reference agree.

Reference policy (only when `rl.kl.beta > 0`): for a LoRA adapter, the same
model under `disable_adapter()`; for full fine-tuning, a frozen sharded copy.

Weights for the rollout engine (`export_weights`) use the plain transformers
names (`model.layers.0.self_attn.q_proj.weight`): for LoRA the adapter is folded
into the base weight (W + scaling * B @ A) so the engine's plain model needs no
PEFT. `adapter_only=True` sends only the adapted modules' merged weights. Engines that serve LoRA
adapters (vLLM) get the adapter itself instead (`export_adapter`: PEFT's tensors, a few MB, and
`adapter_config` for its `adapter_config.json`), and the base weights never move.

Checkpoints (`save_checkpoint` / `load_checkpoint`) are torch.distributed.checkpoint
folders of the sharded model and optimizer state; every rank writes its shard, to a path
(a PVC) or straight to object storage (DCP's fsspec writer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..engines.fused import Groups, unit_of
from ..math.algos import POLICY_LOSSES, rollout_correction_weights
from ..math.kl import entropy_from_logits, kl_penalty, uses_reference
from ..math.masked import masked_mean
from ..micro import loss_shares, micro_batches, scatter
from .sharded import ShardedWorker, position_ids, precision

# train_step's metrics with rl.rolloutCorrection (see math.algos.rollout_correction_weights)
CORRECTION_METRICS = ("rollout_ratio_mean", "rollout_corrected_fraction", "rollout_logprob_gap")

if TYPE_CHECKING:
    from posttrain.api.spec import PostTrainingJob


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """logits (B, L, V) of a causal LM, input_ids (B, L) -> (B, L) float32 logprob of each token given
    its prefix; position 0 (no prefix) is 0."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return torch.cat([torch.zeros_like(logp[:, :1]), logp], dim=1)


def forward(model: Any, mb: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(B, L) logprobs of a micro-batch, 0 off the completion, and the raw logits (B, L, V)."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"],
                   position_ids=position_ids(mb["attention_mask"]), use_cache=False).logits
    logp = token_logprobs(logits, mb["input_ids"])
    return torch.where(mb["completion_mask"].bool(), logp, 0.0), logits


class LearnerWorker(ShardedWorker):
    """One rank of the learner group. Make it an actor with `ray.remote(num_cpus=...)(LearnerWorker)`."""

    META_FILE = "learner.json"

    def setup(self, job: PostTrainingJob, *, rank: int, world_size: int, master_addr: str, master_port: int,
              total_steps: int | None = None, threads: int | None = 1, base_dir: str | None = None) -> dict[str, Any]:
        """Join the process group, load and shard the policy (and reference), build AdamW and its schedule.

        The schedule (`training.lrScheduler`: linear, cosine, constant, constant_with_warmup) runs over
        `total_steps` RL steps (one scheduler step per RL step, whatever `rl.ppoEpochs`), warming up for
        `training.warmupRatio` of them. Relative model paths resolve against `base_dir`.

        Returns {"rank", "backend", "sharding": "fsdp2", "trainable_params", "dtensor_params", "params"} (the
        DTensor count proves `fully_shard` turned every parameter into one).
        """
        from transformers import get_scheduler

        from posttrain.api.spec import AdapterType
        from posttrain.jobs.models import load_for_training, model_on_this_pod

        spec = job.spec
        self.rl, self.adapter, training = spec.rl, spec.adapter, spec.training
        if self.rl is None:
            raise ValueError("spec.rl is missing: the learner needs the job's resolved RL settings")
        if self.adapter.type.is_virtual_tokens():
            raise ValueError(f"adapter type {self.adapter.type.value}: the RL learner supports full "
                             "fine-tuning and the LoRA family; prefix / prompt tuning has no weights to sync")
        self.loss_fn = POLICY_LOSSES.get(self.rl.loss_type)  # an unknown name fails in setup, not at step 1
        backend = self.join(rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
                            threads=threads, micro_batch_size=training.micro_batch_size, epochs=self.rl.ppo_epochs)
        torch.manual_seed(training.seed)
        self.is_lora = self.adapter.type is not AdapterType.none
        load_dtype, mp_policy = precision(spec.model.dtype, full_weights=not self.is_lora)
        model_path, model_spec = model_on_this_pod(spec.model, base=base_dir, dtype=load_dtype)
        self.model_path = model_path  # this pod's copy: the base of a merged save

        def load() -> torch.nn.Module:
            return self.shard_model(load_for_training(model_path, model_spec, self.adapter), mp_policy=mp_policy)

        self.model = load()
        self.ref_model = None
        if uses_reference(self.rl.kl.beta) and not self.is_lora:
            self.ref_model = load().requires_grad_(False)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
        total = max(1, total_steps or 1)
        self.scheduler = get_scheduler(training.lr_scheduler, self.optimizer,
                                       num_warmup_steps=int(training.warmup_ratio * total), num_training_steps=total)
        return self.describe(backend)

    # ---- batches ---------------------------------------------------------------------------------

    def _parts(self, shard: dict[str, Tensor]) -> list[dict[str, Tensor]]:
        """The shard's micro-batches: `rl.microBatchTokens` when set, else `training.microBatchSize` rows."""
        return micro_batches(shard, rows=self.micro_batch_size, tokens=self.rl.micro_batch_tokens)

    @torch.no_grad()
    def _logprobs(self, shard: dict[str, Tensor], *, reference: bool = False) -> Tensor:
        parts, out = self._parts(shard), []
        for mb in parts:
            if reference and self.is_lora:
                with self.model.disable_adapter():
                    out.append(forward(self.model, mb)[0])
            else:
                out.append(forward(self.ref_model if reference else self.model, mb)[0])
        return scatter(parts, out, like=shard["input_ids"])

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

        correct = self.rl.rollout_correction != "none"
        if correct and "rollout_logprobs" not in shard:
            raise ValueError("rl.rolloutCorrection needs the rollout engines' logprobs (rollout_logprobs) in the "
                             "batch; the engines returned none")
        names = ("loss", "kl", "entropy", "clip_fraction") + (CORRECTION_METRICS if correct else ())

        def loss_of(mb: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
            logp, logits = forward(self.model, mb)
            if not given_old and "old_logprobs" not in mb:
                mb["old_logprobs"] = logp.detach()  # kept in the micro-batch dict for the next epochs
            penalty = kl_penalty(logp, mb.get("ref_logprobs"), mb["completion_mask"], beta=beta,
                                 estimator=self.rl.kl.estimator)
            weights, corrected = None, {}
            if correct:  # against the policy before the step (old), which the ratio's clipping is relative to
                weights, corrected = rollout_correction_weights(
                    mb["old_logprobs"], mb["rollout_logprobs"], mb["completion_mask"],
                    mode=self.rl.rollout_correction, cap=self.rl.rollout_correction_cap)
            loss, metrics = self.loss_fn(logp, mb["old_logprobs"], mb["advantages"], mb["completion_mask"],
                                         clip_low=self.rl.clip_low, clip_high=clip_high,
                                         max_length=self.rl.max_new_tokens,
                                         kl_penalty=penalty if uses_reference(beta) else None,
                                         token_weights=weights)
            with torch.no_grad():
                mask = mb["completion_mask"]
                entropy = masked_mean(entropy_from_logits(logits.detach(), mask), mask)
                kl = masked_mean(penalty, mask) / beta if beta else torch.zeros(())
                values = [loss.detach(), kl, entropy, metrics["clip_fraction"]] + [corrected[k] for k in
                                                                                  names[4:]]
                stats = torch.stack([v.double().cpu() for v in values])
            return loss, stats

        parts = self._parts(shard)  # each micro-batch weighs its part of what the loss averages over
        means, grad_norm = self.fit(parts, loss_of, loss_shares(parts, self.loss_fn.normaliser))
        totals = dict(zip(names, means))
        totals["grad_norm"] = grad_norm
        totals["lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.scheduler.step()  # one schedule step per RL step
        return totals

    # ---- weights and checkpoints ----------------------------------------------------------------

    def export_weights(self, adapter_only: bool = False, groups: Groups = ()) -> list[tuple[str, Tensor]]:
        """HF-named full tensors on CPU for the rollout engine, on rank 0 (other ranks return []).

        A collective: call it on every rank. LoRA weights come merged (W + scaling * B @ A) under the
        base module's name; `adapter_only` keeps only those, with the other members of their engine's
        fused `groups` (full fine-tuning has no adapter: error). Tied embeddings travel once, under
        `model.embed_tokens.weight` (`drop_tied_twins`).
        """
        if adapter_only and not self.is_lora:
            raise ValueError("adapter_only export needs a LoRA adapter; full fine-tuning sends every weight")
        state = full_state(self.model, keep=self.rank == 0)
        if self.rank != 0:
            return []
        named = (list(state.items()) if not self.is_lora
                 else merge_lora_state(state, self._lora_scalings(), adapter_only=adapter_only, groups=groups))
        named = drop_tied_twins(named)  # before the cast below, which would make the twins two tensors
        if self.mp_policy is not None:  # fp32 masters travel in the compute dtype the engines run in
            half = self.mp_policy.param_dtype
            named = [(n, t.to(half) if t.is_floating_point() else t) for n, t in named]
        return named

    def export_adapter(self) -> list[tuple[str, Tensor]]:
        """The LoRA adapter's tensors under PEFT's saved names (`base_model.model.<module>.lora_A.weight`, as in
        `adapter_model.safetensors`), on CPU on rank 0 (other ranks return []), in the engines' compute dtype.
        A collective: call it on every rank."""
        from peft import get_peft_model_state_dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.is_lora:
            raise ValueError("export_adapter needs a LoRA adapter; full fine-tuning sends every weight")
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return []
        named = list(get_peft_model_state_dict(self.model, state_dict=state).items())
        if self.mp_policy is not None:
            half = self.mp_policy.param_dtype
            named = [(n, t.to(half) if t.is_floating_point() else t) for n, t in named]
        return named

    def adapter_config(self) -> dict[str, Any]:
        """The `adapter_config.json` fields an engine needs to serve `export_adapter`'s tensors."""
        return peft_adapter_config(self.model.peft_config["default"])

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

        from posttrain.jobs.run import storage

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

                from ..engines import load_into_hf_model

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

    def checkpoint_extra(self) -> dict[str, Any]:
        return {"scheduler": self.scheduler.state_dict()}

    def restore_extra(self, meta: dict[str, Any]) -> None:
        if "scheduler" in meta:
            self.scheduler.load_state_dict(meta["scheduler"])


def full_state(model: torch.nn.Module, *, keep: bool) -> dict[str, Tensor]:
    """An FSDP2 model's whole state dict on CPU where `keep` (rank 0), else {}. A collective: every rank
    all-gathers each sharded tensor in the same (state_dict) order.

    What `get_model_state_dict(full_state_dict=True, cpu_offload=True)` returns for our models (plain
    names: no activation-checkpoint or compile wrappers), without its per-call check of every
    parameter's names: 40% of a SmolLM2 LoRA export (1,386 name lookups each time)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if keep:
            out[name] = tensor.detach().cpu()
    return out


def drop_tied_twins(named: list[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """`named` without the tensors that are the same view as an earlier one's: a tied model's
    `lm_head.weight` after `model.embed_tokens.weight` (18% of SmolLM2-135M's bytes). The engines load
    the same model class, whose tied pair takes both values from the one name (vLLM skips a tied
    `lm_head.*` anyway). A merged LoRA `lm_head` is a new tensor and still travels."""
    seen: set[tuple[Any, ...]] = set()
    out = []
    for name, tensor in named:
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out.append((name, tensor))
    return out


def merge_lora_state(state: dict[str, Tensor], scalings: dict[str, float], *,
                     adapter_only: bool, groups: Groups = ()) -> list[tuple[str, Tensor]]:
    """A PEFT model's full state dict -> plain HF names with each LoRA update folded in.

    `base_model.model.X.base_layer.weight` + `X.lora_A.default.weight` (r, in) and
    `X.lora_B.default.weight` (out, r) become `X.weight` = W + scaling * B @ A; lora tensors
    are dropped; other tensors are renamed. `adapter_only` keeps the adapted modules and the other
    members of their fused `groups` (adapting `q_proj` alone still sends `k_proj` and `v_proj`: the
    engine loads the three as one tensor).
    """
    prefix = "base_model.model."
    out: list[tuple[str, Tensor]] = []
    adapted: set[str] = set()
    for name, tensor in state.items():
        if ".lora_" in name:
            continue
        plain = name.removeprefix(prefix).replace(".base_layer.", ".")
        module = name.rsplit(".", 1)[0].removesuffix(".base_layer")
        if name.endswith(".base_layer.weight") and module in scalings:
            a = state[f"{module}.lora_A.default.weight"].float()
            b = state[f"{module}.lora_B.default.weight"].float()
            # one fused W + s * (B @ A): no full-size temporaries for B @ A and its scaled copy (half the time)
            tensor = torch.addmm(tensor.float(), b, a, alpha=scalings[module]).to(tensor.dtype)
            adapted.add(unit_of(plain, groups))
        out.append((plain, tensor))
    if adapter_only:
        out = [(name, tensor) for name, tensor in out if unit_of(name, groups) in adapted]
    return out


def peft_adapter_config(config: Any) -> dict[str, Any]:
    """A PEFT `LoraConfig` -> the JSON fields of its `adapter_config.json` that a serving engine reads
    (rank, alpha, modules, rsLoRA scaling). DoRA's magnitude vectors are not served: refused."""
    if config.use_dora:
        raise NotImplementedError("serving a DoRA adapter: vLLM has no DoRA; use rl.loraServing: merged")
    targets = config.target_modules
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config.r, "lora_alpha": config.lora_alpha,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
            "use_rslora": bool(config.use_rslora), "use_dora": False, "bias": config.bias,
            "modules_to_save": None, "rank_pattern": dict(config.rank_pattern or {}),
            "alpha_pattern": dict(config.alpha_pattern or {})}
