"""One Ray Train worker running a TRL trainer with our glue (`algorithms.sft` drives it).

The trainer is the one `algorithms.methods.METHODS` names for the job's algorithm: SFTTrainer (sft),
DPOTrainer (dpo), KTOTrainer (kto) or RewardTrainer (reward); the glue below is the same for all.

`train_loop(config)` runs on every worker of the `TorchTrainer`; Ray Train has
already joined the workers into one torch.distributed group (gloo on CPU,
NCCL on GPU), and the HF Trainer inside picks it up: DDP on CPU, FSDP on
several GPUs. Rank 0 reports progress to the driver's tracker actor and writes
the trained model or adapter.

Each worker loads the model on its own pod (`models.materialize`). Checkpoints go to the run's
checkpoint location: on a filesystem (a PVC) the Trainer writes them in place; on object storage
each rank writes into a local staging folder and uploads its own files. Either way rank 0 marks a
checkpoint complete only after every rank is done with it, and only then deletes older ones
(the Trainer's own rotation is off: it deleted the old checkpoint before the new one counted).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from posttrain.api.spec import AdapterType, PostTrainingJobSpec
from posttrain.jobs import models
from posttrain.jobs.algorithms import prepared
from posttrain.jobs.algorithms.methods import EVALUATED, METHODS, flat_metrics
from posttrain.jobs.rewards.scorers import REWARD_INPUT, reward_input
from posttrain.jobs.run import storage
from posttrain.jobs.run.checkpoints import PREFIX, Checkpoints

log = logging.getLogger(__name__)

def _callback_class():
    """`ReportToDriver` (a class made on first use: transformers is imported inside the worker)."""
    from transformers import TrainerCallback

    class ReportToDriver(TrainerCallback):
        """Forwards logs, checkpoints and phase changes to the driver (rank 0 only); completes checkpoints.

        Step logs are sent in batches, at most `flush_seconds` apart (the driver reads the tracker every
        `poll_seconds`, 0.5 s, anyway): a short step does not pay a Ray call. Any other event sends
        what is pending first, in order, and the end of training sends the rest.
        """

        def __init__(self, tracker: Any, rank: int, ckpts: Checkpoints, keep: int, *,
                     flush_seconds: float = 0.5) -> None:
            self.tracker, self.rank, self.ckpts, self.keep = tracker, rank, ckpts, keep
            self.flush_seconds = flush_seconds
            self._last: tuple[float, int] | None = None
            self._pending: list[dict[str, Any]] = []
            self._flushed = time.monotonic()

        def push(self, event: dict[str, Any]) -> None:
            if self.rank == 0 and self.tracker is not None:
                self._pending.append(event)
                if event["type"] != "log" or time.monotonic() - self._flushed >= self.flush_seconds:
                    self.flush()

        def flush(self) -> None:
            if self._pending:
                self.tracker.extend.remote(self._pending)
                self._pending = []
            self._flushed = time.monotonic()

        def on_train_end(self, args, state, control, **kwargs):
            self.flush()

        def on_train_begin(self, args, state, control, **kwargs):
            self._last = (time.time(), state.num_input_tokens_seen)
            self.push({"type": "begin", "step": state.global_step, "max_steps": state.max_steps})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = dict(logs or {})
            event: dict[str, Any] = {"type": "log", "step": state.global_step, **logs}
            if "loss" in logs and self._last is not None:
                now, tokens = time.time(), state.num_input_tokens_seen
                then, before = self._last
                if now > then and tokens >= before:
                    event["tokens_per_second"] = (tokens - before) / (now - then)
                event["tokens_seen"] = tokens
                self._last = (now, tokens)
            self.push(event)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            # `eval_on_start`: the evaluation before training runs inside train(), once the model is
            # prepared with its optimizer (FSDP2 refuses to prepare a model alone for evaluate())
            if state.global_step == 0 and metrics:
                self.push({"type": "eval_before", **evaluated(metrics)})

        def on_save(self, args, state, control, **kwargs):
            step = state.global_step
            local = Path(args.output_dir) / f"{PREFIX}{step}"
            target = self.ckpts.folder(step)
            if target.is_remote and local.is_dir():
                storage.upload_tree(local, target)  # this rank's files; the others upload theirs
            _barrier()  # every rank's files are in before the marker
            if self.rank == 0:
                self.ckpts.mark_complete(step)
                self.ckpts.rotate(self.keep)
                self.push({"type": "checkpoint", "step": step, "path": target.uri})
            if target.is_remote:
                shutil.rmtree(local, ignore_errors=True)  # staged copy uploaded

    return ReportToDriver


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# What Ray Train sets on each worker's process for torch.distributed (and what makes accelerate go distributed).
_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")


def leave_group_of_one(world: int) -> None:
    """A run of one worker trains as one plain process, as TRL alone does.

    Ray Train starts a torch.distributed group even for one worker and sets LOCAL_RANK and friends;
    accelerate then wraps the model in DistributedDataParallel (a buffer broadcast before every
    forward, reducer hooks in every backward) and sends each metric the trainer logs through a
    gloo all_gather, about 17 collectives per DPO step (cProfile of benchmarks/dpo_vs_trl.py). A group
    of one gains nothing from either, so it is closed before the trainer's arguments pick a mode.
    """
    if world != 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key in _GROUP_ENV:
        os.environ.pop(key, None)


def _staging(address: str, rank: int) -> Path:
    """A local folder of this rank's for checkpoints bound for object storage."""
    digest = hashlib.sha256(address.encode()).hexdigest()[:16]
    return storage.cache_root() / "staging" / digest / f"rank-{rank}"


def sft_arguments(spec: PostTrainingJobSpec, cfg: dict[str, Any], *, world: int, has_eval: bool) -> dict[str, Any]:
    """The keyword arguments every TRL config takes for this job (SFTConfig, DPOConfig, ...: building the
    config joins the process group); `METHODS[algorithm].options` adds the algorithm's own."""
    import torch

    t = spec.training
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if on_gpu and world > 1 and spec.adapter.type is not AdapterType.qlora:
        kwargs["fsdp"] = "full_shard auto_wrap"
        kwargs["fsdp_config"] = {"use_orig_params": True}
    ckpt = spec.checkpoint
    return dict(
        output_dir=cfg["checkpoint_local"],
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1.0,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps(),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5 takes a ratio when the value is below 1
        weight_decay=t.weight_decay,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        # the eval loss before training, measured inside train() (not by evaluate() first: under FSDP2
        # accelerate prepares a model only together with its optimizer); a resumed run measured it already
        eval_on_start=has_eval and not cfg.get("resume_step"),
        eval_steps=t.eval_steps,
        save_strategy="steps" if ckpt.every_steps else "no",
        save_steps=ckpt.every_steps or 500,
        save_total_limit=None,  # rotation is ours, after the newest checkpoint is marked complete
        max_length=t.max_seq_length,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not on_gpu,
        ddp_backend=None if on_gpu or world == 1 else "gloo",  # one worker: no group (leave_group_of_one)
        **precision(spec.model.dtype, spec.adapter.type, on_gpu=on_gpu)[1],
        include_num_input_tokens_seen="non_padding",
        gradient_checkpointing=spec.model.gradient_checkpointing,
        dataset_num_proc=None,
        **kwargs,
    )


def train_loop(cfg: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker."""
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    leave_group_of_one(world)
    spec = PostTrainingJobSpec.model_validate(cfg["spec"])
    tracker = cfg.get("tracker")
    torch_threads = cfg.get("torch_threads")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)

    base = Path(cfg["base_dir"])
    model_source = models.materialize(spec.model, base=base)  # on this worker's pod
    tok_spec = spec.model.model_copy(update={"source": spec.model.tokenizer}) if spec.model.tokenizer else spec.model
    tokenizer = models.load_tokenizer(models.materialize(tok_spec, base=base, weights=False),
                                      revision=models.hub_revision(tok_spec),
                                      trust_remote_code=spec.model.trust_remote_code)
    ckpts = Checkpoints(storage.resolve(cfg["checkpoints"]))
    local_root = ckpts.root.local if ckpts.root.local is not None else _staging(cfg["checkpoints"], rank)
    local_root.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, checkpoint_local=str(local_root),  # the rows, read from the run's output (`prepared`)
               **{split: prepared.load(cfg[split], staging=_staging(cfg["output"], rank) / "data")
                  for split in prepared.SPLITS})
    resume_from = None
    if cfg.get("resume_step"):
        step = cfg["resume_step"]
        resume_from = local_root / f"{PREFIX}{step}"
        if ckpts.root.is_remote:  # every rank reads the whole checkpoint (model, optimizer, its RNG file)
            storage.download_tree(ckpts.folder(step), resume_from)
    from transformers import set_seed

    set_seed(spec.training.seed)  # adapter initialisation is part of what the seed decides
    eval_ds = cfg["eval"]
    callback = _callback_class()(tracker, rank, ckpts, spec.checkpoint.keep)
    trainer = build_trainer(spec, cfg, model_source, tokenizer, world=world, callbacks=[callback])
    callback.push({"type": "phase", "phase": "training"})
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        callback.flush()  # the step logs not sent yet, also when training failed
    callback.push({"type": "train_done", "step": trainer.state.global_step, "metrics": result.metrics})
    if eval_ds is not None:
        callback.push({"type": "phase", "phase": "evaluating"})
        callback.push({"type": "eval_after", "step": trainer.state.global_step, **evaluated(trainer.evaluate())})
    callback.push({"type": "phase", "phase": "saving"})
    # a reward model records how its pairs were tokenized: the grpo/ppo scorer repeats it (scorers.RewardModel)
    extra = {REWARD_INPUT: reward_input(cfg["train"][0])} if METHODS[spec.algorithm.value].head == "score" else None
    _save(trainer, tokenizer, spec, storage.resolve(cfg["output"]), model_source, rank=rank, callback=callback,
          base=base, extra=extra)


def precision(dtype: str, adapter: AdapterType, *, on_gpu: bool) -> tuple[str, dict[str, bool]]:
    """(dtype the weights load in, the Trainer's `bf16`/`fp16` flags) for a `model.dtype`: fp32 masters
    with half-precision autocast (`models.master_weights`; on one GPU nothing else upcasts them). fp16
    autocast needs a GPU: on CPU a float16 model trains as it loads.

    >>> precision("auto", AdapterType.none, on_gpu=True)
    ('float32', {'bf16': True, 'fp16': False})
    >>> precision("bfloat16", AdapterType.lora, on_gpu=False)
    ('bfloat16', {'bf16': True, 'fp16': False})
    """
    load, compute = models.master_weights(dtype, full_weights=adapter is AdapterType.none, on_gpu=on_gpu)
    if compute == "float16" and not on_gpu:
        return dtype, {"bf16": False, "fp16": False}
    return load, {"bf16": compute == "bfloat16", "fp16": compute == "float16"}


def build_trainer(spec: PostTrainingJobSpec, cfg: dict[str, Any], model_source: str, tokenizer: Any, *, world: int,
                  callbacks: list[Any]) -> Any:
    """The algorithm's TRL trainer (`METHODS`) over the model (with its adapter) and `cfg`'s train/eval sets."""
    method = METHODS[spec.algorithm.value]
    trainer_cls, config_cls = method.classes()
    import torch

    load_dtype, _ = precision(spec.model.dtype, spec.adapter.type, on_gpu=torch.cuda.is_available())
    net = models.load_for_training(model_source, spec.model.model_copy(update={"dtype": load_dtype}), spec.adapter,
                                   head=method.head)
    args = sft_arguments(spec, cfg, world=world, has_eval=cfg["eval"] is not None)
    return trainer_cls(model=net, args=config_cls(**args, **method.options(spec)), train_dataset=cfg["train"],
                       eval_dataset=cfg["eval"], processing_class=tokenizer, callbacks=callbacks)


def evaluated(metrics: dict[str, Any]) -> dict[str, float]:
    """The EVALUATED values of one evaluation's metrics (`eval_loss`, and `eval_rewards_accuracy`... where the
    trainer has them)."""
    found = flat_metrics(metrics)
    return {f"eval_{k}": found[f"eval_{k}"] for k in EVALUATED if f"eval_{k}" in found}


def _save(trainer: Any, tokenizer: Any, spec: PostTrainingJobSpec, out: storage.Location, model_source: str, *,
          rank: int, callback: Any, base: Path, extra: dict[str, Any] | None = None) -> None:
    """Write the model or adapter. Every rank takes part (FSDP gathers); rank 0 publishes it to the output
    (a PVC or object storage), whole: a reader sees the previous result or the new one."""
    adapter = spec.adapter
    staging = Path(tempfile.mkdtemp(prefix="posttrain-save-"))
    try:
        if adapter.type is AdapterType.bottleneck:
            from posttrain.jobs import bottleneck

            state = trainer.accelerator.get_state_dict(trainer.model)  # every rank: FSDP gathers
            if rank == 0:
                bottleneck.save(trainer.accelerator.unwrap_model(trainer.model), staging, state_dict=state)
        else:
            trainer.save_model(str(staging))  # full weights or the adapter alone, gathered across ranks
        if rank != 0:
            return
        (staging / "training_args.bin").unlink(missing_ok=True)  # a pickle of trainer settings, not a model
        kind = "model" if adapter.type is AdapterType.none else "adapter"
        tokenizer.save_pretrained(staging)
        models.write_provenance(staging, kind=kind, model=spec.model, base=base, extra=extra)
        dest = out.child(kind)
        storage.publish_tree(staging, dest)
        event = {"type": "saved", "kind": kind, "path": dest.uri}
        # A reward model is always written whole: `rewards: [{model: <output>/model}]` loads it as is.
        if kind == "adapter" and (spec.output.merge_adapter or METHODS[spec.algorithm.value].head == "score"):
            # The adapter stays beside the merged model: small, and what a serving stack may want.
            merged = staging.parent / f"{staging.name}-merged"
            _merge_into(staging, merged, model_source, spec)
            tokenizer.save_pretrained(merged)
            models.write_provenance(merged, kind="merged-model", model=spec.model, base=base, extra=extra)
            storage.publish_tree(merged, out.child("model"))
            event.update(kind="merged-model", path=out.child("model").uri, adapter_path=dest.uri)
        callback.push(event)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.parent / f"{staging.name}-merged", ignore_errors=True)


def _merge_into(adapter_dir: Path, dest: Path, base_source: str, spec: PostTrainingJobSpec) -> None:
    """Reload the base in full precision, apply the adapter, merge, save a standalone model."""
    import peft

    dtype = models.torch_dtype(spec.model.dtype)
    head = METHODS[spec.algorithm.value].head
    extra = {"num_labels": 1} if head == "score" else {}
    base = models.auto_class(head).from_pretrained(base_source, dtype=dtype, revision=models.hub_revision(spec.model),
                                                   trust_remote_code=spec.model.trust_remote_code, **extra)
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(dest)
