"""RL learner actors: FSDP2 (`fully_shard`, gloo on CPU) policy replicas as Ray actors.

    pytest -m slow tests/test_rl_learner.py

Each module fixture runs one scenario on a tiny Llama and records what the tests check:
- full fine-tuning, world size 2: a step with a positive advantage on one completion raises its
  logprob; exported weights in a `TransformersEngine` and a plain HF model decode alike and score
  tokens as the learner does; a DCP checkpoint restored into fresh actors gives identical logprobs,
  and one more step from it (Adam moments restored) matches the original run's next step;
- world size 1 on the same batch gives the same loss as world size 2;
- LoRA with kl.beta > 0: reference logprobs (adapter disabled) equal the base model's, and the
  merged adapter-only export scores tokens as the learner does.
"""

from __future__ import annotations

import time

import pytest

import tiny

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")
pytest.importorskip("peft")

from posttrain.jobs.rl.engines import Sampling, load_into_hf_model  # noqa: E402
from posttrain.jobs.rl.engines.transformers_engine import TransformersEngine  # noqa: E402
from posttrain.jobs.rl.workers.learner import LearnerWorker, token_logprobs  # noqa: E402
from posttrain.jobs.rl.workers.sharded import free_port  # noqa: E402
from support.jobs import FULL, LORA, rl_job  # noqa: E402

pytestmark = pytest.mark.slow

RL = {"lossType": "grpo", "kl": {"beta": 0.0}, "maxNewTokens": 8}
RL_KL = {"lossType": "dapo", "kl": {"beta": 0.1}, "maxNewTokens": 8, "ppoEpochs": 2}
LR = 5e-3


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(tiny.make_model(tmp_path_factory.mktemp("tiny-llama"), hidden=64))


def make_batch(tok) -> dict:
    """Four prompt+completion rows, right-padded; completion_mask on the completion tokens."""
    pairs = [("add 3 + 4 =", " the answer is 7"), ("add 3 + 4 =", " so 9"),
             ("sum 12 + 30 =", " 42"), ("think", " the value is 5 then")]
    rows = [(tok(p)["input_ids"], tok(c)["input_ids"]) for p, c in pairs]
    width = max(len(p) + len(c) for p, c in rows)
    ids, att, comp = [], [], []
    for p, c in rows:
        n = len(p) + len(c)
        ids.append(p + c + [tok.pad_token_id] * (width - n))
        att.append([1] * n + [0] * (width - n))
        comp.append([0] * len(p) + [1] * len(c) + [0] * (width - n))
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp,
            "advantages": [1.0, -1.0, 0.5, -0.5]}


def start(world: int, model_path: str, adapter: dict, rl: dict, *, micro_batch_size: int = 64) -> list:  # 64: one micro-batch a rank
    actor = ray.remote(num_cpus=2 / world)(LearnerWorker)  # share the machine's 2 CPUs
    workers = [actor.remote() for _ in range(world)]
    port = free_port()
    job = rl_job(model_path, adapter=adapter, rl=rl, training={"learningRate": LR, "microBatchSize": micro_batch_size})
    infos = ray.get([w.setup.remote(job, rank=r, world_size=world, master_addr="127.0.0.1", master_port=port)
                     for r, w in enumerate(workers)])
    for info in infos:  # FSDP2 really sharded every parameter (gloo on CPU)
        assert info["sharding"] == "fsdp2" and info["dtensor_params"] == info["params"] > 0, info
    return workers


def call(workers, method: str, *args, **kwargs):
    """The same call on every rank (they run collectives); rank 0's answer."""
    return ray.get([getattr(w, method).remote(*args, **kwargs) for w in workers])[0]


def stop(workers) -> None:
    ray.get([w.shutdown.remote() for w in workers])
    for w in workers:
        ray.kill(w)


def hf_logprobs(model, batch) -> torch.Tensor:
    ids, att = torch.tensor(batch["input_ids"]), torch.tensor(batch["attention_mask"])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=att).logits
    return torch.where(torch.tensor(batch["completion_mask"]).bool(), token_logprobs(logits, ids), 0.0)


def seq_logprob(logp: torch.Tensor) -> torch.Tensor:
    return logp.sum(-1)


@pytest.fixture(scope="module")
def tok(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture(scope="module")
def full_run(ray_local, model_path, tok, tmp_path_factory):
    batch = make_batch(tok)
    out: dict = {"batch": batch, "timings": {}}
    t0 = time.monotonic()
    workers = start(2, model_path, FULL, RL)
    out["timings"]["setup_ws2"] = time.monotonic() - t0
    out["before"] = call(workers, "compute_logprobs", batch)
    t0 = time.monotonic()
    out["metrics"] = call(workers, "train_step", batch)
    out["timings"]["train_step_ws2"] = time.monotonic() - t0
    out["after"] = call(workers, "compute_logprobs", batch)
    t0 = time.monotonic()
    out["exported"] = call(workers, "export_weights", adapter_only=False)
    out["timings"]["export"] = time.monotonic() - t0
    ckpt = str(tmp_path_factory.mktemp("ckpt") / "step1")
    call(workers, "save_checkpoint", ckpt)
    out["metrics_2"] = call(workers, "train_step", batch)
    out["after_2"] = call(workers, "compute_logprobs", batch)
    stop(workers)
    fresh = start(2, model_path, FULL, RL)
    out["meta"] = call(fresh, "load_checkpoint", ckpt)
    out["restored"] = call(fresh, "compute_logprobs", batch)
    out["restored_metrics_2"] = call(fresh, "train_step", batch)
    out["restored_after_2"] = call(fresh, "compute_logprobs", batch)
    stop(fresh)
    print("timings", out["timings"])
    return out


def test_positive_advantage_raises_logprob(full_run):
    before, after = seq_logprob(full_run["before"]), seq_logprob(full_run["after"])
    assert after[0] > before[0] + 1e-3  # advantage +1
    assert after[1] < before[1] - 1e-3  # advantage -1
    m = full_run["metrics"]
    assert set(m) >= {"loss", "kl", "entropy", "clip_fraction", "grad_norm", "lr"}
    assert m["lr"] == LR and m["grad_norm"] > 0 and m["entropy"] > 0 and m["kl"] == 0
    assert abs(m["clip_fraction"]) < 1e-9  # on-policy first epoch: ratio 1, nothing clipped


def test_world_size_one_matches_two(ray_local, model_path, full_run):
    # one rank, two micro-batches of 2 rows: the same gradient as 2 ranks x 2 rows
    workers = start(1, model_path, FULL, RL, micro_batch_size=2)
    try:
        before = call(workers, "compute_logprobs", full_run["batch"])
        metrics = call(workers, "train_step", full_run["batch"])
        after = call(workers, "compute_logprobs", full_run["batch"])
    finally:
        stop(workers)
    torch.testing.assert_close(before, full_run["before"], atol=1e-5, rtol=1e-5)
    assert metrics["loss"] == pytest.approx(full_run["metrics"]["loss"], abs=1e-5)
    assert metrics["grad_norm"] == pytest.approx(full_run["metrics"]["grad_norm"], rel=1e-4)
    torch.testing.assert_close(after, full_run["after"], atol=1e-4, rtol=1e-4)


def test_truncated_importance_weights_scale_the_step(ray_local, model_path, full_run):
    """rl.rolloutCorrection tis: engines whose logprobs are log 2 below the trainer's give rho = 2 on every
    token, truncated at the cap 1.5, so the first step's loss and gradient are 1.5 times the plain step's."""
    import math

    batch = full_run["batch"]
    mask = torch.tensor(batch["completion_mask"])
    rollout = torch.where(mask.bool(), full_run["before"] - math.log(2.0), 0.0)
    rl = {**RL, "rolloutCorrection": "tis", "rolloutCorrectionCap": 1.5}
    workers = start(1, model_path, FULL, rl)
    try:
        metrics = call(workers, "train_step", dict(batch, rollout_logprobs=rollout.tolist()))
        with pytest.raises(ray.exceptions.RayTaskError, match="rolloutCorrection needs"):
            call(workers, "train_step", batch)  # the engines sent no logprobs
    finally:
        stop(workers)
    plain = full_run["metrics"]
    assert metrics["loss"] == pytest.approx(1.5 * plain["loss"], rel=1e-4)
    assert metrics["grad_norm"] == pytest.approx(1.5 * plain["grad_norm"], rel=1e-3)
    assert metrics["rollout_ratio_mean"] == pytest.approx(2.0, rel=1e-4)
    assert metrics["rollout_corrected_fraction"] == 1.0
    assert metrics["rollout_logprob_gap"] == pytest.approx(math.log(2.0), rel=1e-4)


def test_exported_weights_drive_engine(model_path, full_run, tok):
    from transformers import AutoModelForCausalLM

    named = full_run["exported"]
    assert named and not any(n.startswith(("base_model.", "_fsdp")) for n, _ in named)
    engine = TransformersEngine(model_path)
    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    before = hf_logprobs(plain, full_run["batch"])
    engine.load_weights(named)
    load_into_hf_model(plain, named)
    # the exported weights are the learner's: the plain model scores tokens as the learner does
    torch.testing.assert_close(hf_logprobs(plain, full_run["batch"]), full_run["after"], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(before, full_run["after"], atol=1e-4)
    prompts = [tok("add 3 + 4 =")["input_ids"], tok("think")["input_ids"]]
    sampling = Sampling.greedy_decoding(max_new_tokens=8)
    gens = engine.generate(prompts, sampling)
    for p, g in zip(prompts, gens):
        ids = torch.tensor([p])
        want = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert g.token_ids[0] == want[:len(g.token_ids[0])]


def test_checkpoint_roundtrip(full_run):
    assert full_run["meta"]["step"] == 1
    torch.testing.assert_close(full_run["restored"], full_run["after"], atol=0, rtol=0)
    # a step from the checkpoint (Adam moments restored) equals the original run's second step
    assert full_run["restored_metrics_2"]["loss"] == pytest.approx(full_run["metrics_2"]["loss"], abs=1e-6)
    torch.testing.assert_close(full_run["restored_after_2"], full_run["after_2"], atol=1e-6, rtol=1e-6)


def test_lora_reference_is_base_and_export_merges(ray_local, model_path, tok):
    from transformers import AutoModelForCausalLM

    batch = make_batch(tok)
    workers = start(2, model_path, LORA, RL_KL)
    try:
        ref_before = call(workers, "reference_logprobs", batch)
        metrics = call(workers, "train_step", batch)
        metrics = call(workers, "train_step", batch)  # LoRA B starts at 0: step 2 moves off the base
        policy = call(workers, "compute_logprobs", batch)
        three = {k: v[:3] for k, v in batch.items()}  # 3 rows on 2 ranks: padded with an empty row
        policy_three = call(workers, "compute_logprobs", three)
        ref_after = call(workers, "reference_logprobs", batch)
        named = call(workers, "export_weights", adapter_only=True)
    finally:
        stop(workers)
    torch.testing.assert_close(policy_three, policy[:3], atol=1e-6, rtol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    base = hf_logprobs(plain, batch)
    torch.testing.assert_close(ref_before, base, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_after, base, atol=1e-5, rtol=1e-5)  # training never moves the reference
    assert metrics["kl"] > 0 and metrics["clip_fraction"] >= 0 and not torch.allclose(policy, base, atol=1e-4)
    names = [n for n, _ in named]
    assert names and all(n.endswith("proj.weight") and "lora" not in n and "base_layer" not in n for n in names)
    assert "model.embed_tokens.weight" not in names  # adapter only: just the adapted modules
    load_into_hf_model(plain, named)
    torch.testing.assert_close(hf_logprobs(plain, batch), policy, atol=1e-5, rtol=1e-5)
