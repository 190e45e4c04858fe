"""PPO critic actors: an FSDP2-sharded value model (gloo on CPU) as Ray actors.

    pytest -m slow tests/test_rl_critic.py

Each module fixture runs one scenario on a tiny Llama and records what the tests check:
- full fine-tuning, world size 2: values are (B, L), 0 off the completion, 0 everywhere at the start
  (zero head); a few steps toward fixed returns lower the value loss and bring the values near the
  returns; a value depends only on the tokens before its position; a DCP checkpoint restored into fresh
  actors gives identical values, and one more step from it matches the original run's next step;
- world size 1 (two micro-batches) on the same batch gives the same values and losses as world size 2;
- LoRA (with rl.criticLearningRate): the loss falls as well.
"""

from __future__ import annotations

import pytest

import tiny

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")
pytest.importorskip("peft")

from posttrain.jobs.rl.workers.critic import CriticWorker  # noqa: E402
from posttrain.jobs.rl.workers.sharded import free_port  # noqa: E402
from support.jobs import FULL, LORA, rl_job  # noqa: E402

pytestmark = pytest.mark.slow

RL = {"ppoEpochs": 2}  # valueClip 0.2 (the default)
LR = 5e-3
STEPS = 6
RETURNS = [1.0, -1.0, 0.5, -0.5]  # per row, on every completion token


@pytest.fixture(scope="module")
def critics(ray_local):
    """Two actor processes shared by the scenarios (starting one costs seconds of imports)."""
    workers = spawn(2)
    yield workers
    for w in workers:
        ray.kill(w)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return str(tiny.make_model(tmp_path_factory.mktemp("tiny-llama"), hidden=64))


@pytest.fixture(scope="module")
def batch(model_path) -> dict:
    """Four prompt+completion rows, right-padded; `returns` fixed per row on the completion tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    pairs = [("add 3 + 4 =", " the answer is 7"), ("sum 12 + 30 =", " so 9"),
             ("add 5 + 1 =", " 42"), ("think", " the value is 5 then")]
    rows = [(tok(p)["input_ids"], tok(c)["input_ids"]) for p, c in pairs]
    width = max(len(p) + len(c) for p, c in rows)
    ids, att, comp, ret = [], [], [], []
    for (p, c), r in zip(rows, RETURNS):
        n = len(p) + len(c)
        ids.append(p + c + [tok.pad_token_id] * (width - n))
        att.append([1] * n + [0] * (width - n))
        comp.append([0] * len(p) + [1] * len(c) + [0] * (width - n))
        ret.append([r if m else 0.0 for m in comp[-1]])
    return {"input_ids": ids, "attention_mask": att, "completion_mask": comp, "returns": ret}


def spawn(n: int) -> list:
    """`n` critic actor processes; `setup` again after `shutdown` reuses them. Half a CPU each: the shared
    pair and the checkpoint's fresh pair fit Ray's 2 CPUs together (each runs one torch thread)."""
    return [ray.remote(num_cpus=0.5)(CriticWorker).remote() for _ in range(n)]


def start(workers: list, model_path: str, adapter: dict, rl: dict, lr: float = LR, *,
          micro_batch_size: int = 64) -> list:  # 64: one micro-batch a rank
    world, port = len(workers), free_port()
    job = rl_job(model_path, algorithm="ppo", adapter=adapter, rl=rl,
                 training={"learningRate": lr, "microBatchSize": micro_batch_size})
    infos = ray.get([w.setup.remote(job, rank=r, world_size=world, master_addr="127.0.0.1", master_port=port)
                     for r, w in enumerate(workers)])
    for info in infos:  # FSDP2 really sharded every parameter (gloo on CPU)
        assert info["sharding"] == "fsdp2" and info["dtensor_params"] == info["params"] > 0, info
    return workers


def call(workers, method: str, *args, **kwargs):
    """The same call on every rank (they run collectives); rank 0's answer."""
    return ray.get([getattr(w, method).remote(*args, **kwargs) for w in workers])[0]


def stop(workers) -> None:
    """Leave the process group; the actors stay up for the next scenario."""
    ray.get([w.shutdown.remote() for w in workers])


def train(workers, batch: dict, steps: int) -> tuple[list[dict], list[torch.Tensor]]:
    """`steps` train steps, each with old_values = the critic's values before it (as a rollout records them)."""
    metrics, values = [], [call(workers, "compute_values", batch)]
    for _ in range(steps):
        metrics.append(call(workers, "train_step", {**batch, "old_values": values[-1]}))
        values.append(call(workers, "compute_values", batch))
    return metrics, values


def error(values: torch.Tensor, batch: dict) -> float:
    mask = torch.tensor(batch["completion_mask"]).bool()
    return (values - torch.tensor(batch["returns"]))[mask].abs().mean().item()


@pytest.fixture(scope="module")
def full_run(critics, model_path, batch, tmp_path_factory):
    out: dict = {}
    workers = start(critics, model_path, FULL, RL)
    out["metrics"], out["values"] = train(workers, batch, STEPS)
    three = {k: v[:3] for k, v in batch.items()}  # 3 rows on 2 ranks: padded with an empty row
    out["values_three"] = call(workers, "compute_values", three)
    out["perturbed"] = {}
    for where in ("first", "last"):  # change the first / last completion token of every row
        ids = [list(r) for r in batch["input_ids"]]
        for row, mask in zip(ids, batch["completion_mask"]):
            t = mask.index(1) if where == "first" else len(mask) - 1 - mask[::-1].index(1)
            row[t] = (row[t] + 1) % 300
        out["perturbed"][where] = call(workers, "compute_values", {**batch, "input_ids": ids})
    ckpt = str(tmp_path_factory.mktemp("critic-ckpt") / "step")
    call(workers, "save_checkpoint", ckpt)
    out["next_metrics"], next_values = train(workers, batch, 1)
    out["next_values"] = next_values[-1]
    stop(workers)
    fresh = start(spawn(2), model_path, FULL, RL)  # new processes: nothing carried over but the folder
    try:
        out["meta"] = call(fresh, "load_checkpoint", ckpt)
        out["restored_metrics"], restored = train(fresh, batch, 1)
        out["restored"], out["restored_next"] = restored
    finally:
        for w in fresh:
            ray.kill(w)
    return out


def test_values_shape_and_mask(full_run, batch):
    mask = torch.tensor(batch["completion_mask"]).bool()
    for values in full_run["values"]:
        assert values.shape == mask.shape and values.dtype == torch.float32
        assert torch.all(values[~mask] == 0)
    assert torch.all(full_run["values"][0] == 0)  # the zero-initialised head
    assert torch.all(full_run["values"][-1][mask] != 0)
    torch.testing.assert_close(full_run["values_three"], full_run["values"][-1][:3], atol=1e-6, rtol=1e-6)


def test_values_fit_the_returns(full_run, batch):
    losses = [m["value_loss"] for m in full_run["metrics"]]
    assert losses[-1] < 0.3 * losses[0], losses
    errors = [error(v, batch) for v in full_run["values"]]
    assert errors[-1] < 0.4 * errors[0], errors
    first = full_run["metrics"][0]
    assert set(first) == {"value_loss", "value_clip_fraction", "value_mean", "critic_grad_norm"}
    assert first["critic_grad_norm"] > 0
    clipped = [m["value_clip_fraction"] for m in full_run["metrics"]]
    assert all(0 <= c <= 1 for c in clipped) and max(clipped) > 0, clipped  # the 0.2 clip engaged


def test_value_sees_only_the_prefix(full_run, batch):
    """values[b, t] = V(input_ids[b, :t]): changing token t leaves position t alone and moves t + 1."""
    trained = full_run["values"][-1]
    torch.testing.assert_close(full_run["perturbed"]["last"], trained, atol=1e-6, rtol=1e-6)
    first = full_run["perturbed"]["first"]
    for b, mask in enumerate(batch["completion_mask"]):
        t = mask.index(1)
        assert mask[t + 1] == 1  # every completion has two tokens or more
        assert first[b, t] == pytest.approx(trained[b, t].item(), abs=1e-6)
        assert abs(first[b, t + 1] - trained[b, t + 1]) > 1e-5


def test_world_size_one_matches_two(critics, model_path, batch, full_run):
    # one rank, two micro-batches of 2 rows: the same gradient as 2 ranks x 2 rows
    workers = start(critics[:1], model_path, FULL, RL, micro_batch_size=2)
    try:
        metrics, values = train(workers, batch, 2)
    finally:
        stop(workers)
    for got, want in zip(metrics, full_run["metrics"]):
        assert got["value_loss"] == pytest.approx(want["value_loss"], abs=1e-5)
        assert got["critic_grad_norm"] == pytest.approx(want["critic_grad_norm"], rel=1e-4)
    for got, want in zip(values, full_run["values"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_checkpoint_roundtrip(full_run):
    assert full_run["meta"] == {"step": STEPS * RL["ppoEpochs"], "world_size": 2}
    torch.testing.assert_close(full_run["restored"], full_run["values"][-1], atol=0, rtol=0)
    # a step from the checkpoint (Adam moments restored) equals the original run's next step
    got, want = full_run["restored_metrics"][0], full_run["next_metrics"][0]
    assert got["value_loss"] == pytest.approx(want["value_loss"], abs=1e-6)
    torch.testing.assert_close(full_run["restored_next"], full_run["next_values"], atol=1e-6, rtol=1e-6)


def test_lora_critic_trains(critics, model_path, batch):
    rl = {**RL, "criticLearningRate": LR}
    workers = start(critics, model_path, LORA, rl, lr=1e-7)  # criticLearningRate wins over training.learningRate
    try:
        info = call(workers, "call", lambda self: (self.lr, sum(p.numel() for p in self.model.parameters()
                                                                    if p.requires_grad)))
        metrics, values = train(workers, batch, STEPS)
    finally:
        stop(workers)
    assert info[0] == LR
    losses = [m["value_loss"] for m in metrics]
    assert losses[-1] < 0.5 * losses[0], losses
    assert error(values[-1], batch) < 0.6 * error(values[0], batch)


def test_setup_rejects_adapters_without_weights():
    with pytest.raises(ValueError, match="use type lora"):
        CriticWorker().setup(rl_job("unused", algorithm="ppo", adapter={"type": "prefix"}), rank=0, world_size=1,
                             master_addr="127.0.0.1", master_port=1)
