"""Shared-memory weight sync (`jobs/rl/shm_sync.py`): the pure pieces, then learner -> engines on local Ray.

    pytest tests/test_rl_shm_sync.py            # unit tests in well under a second, the Ray ones in about a minute

The Ray scenarios use one learner rank and the two rollout actors of a module fixture (transformers
engine, tiny Llama), with the region in a private directory under /dev/shm so "nothing leaked" is
a listing of that directory, and each process's mappings are read from /proc/<pid>/maps.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

import tiny

torch = pytest.importorskip("torch")
ray = pytest.importorskip("ray")

from posttrain.jobs.rl.buckets import TensorMeta, tensor_meta  # noqa: E402
from posttrain.jobs.rl.shm_sync import (  # noqa: E402
    ALIGN, HEADER, PREFIX, Region, SharedMemorySync, _check_room, check_same_node, choose_auto, layout)
from posttrain.jobs.rl.sync import ObjectStoreSync, make_weight_sync  # noqa: E402
from support.jobs import FULL, LORA  # noqa: E402
from test_rl_sync import Group, make_batch, rollouts  # noqa: E402,F401 - rollouts: the module fixture


@pytest.fixture(scope="module")
def shm_dir():
    """A private directory in /dev/shm: "nothing leaked" is its listing."""
    path = tempfile.mkdtemp(prefix="pytest-shm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# ---- pure pieces ---------------------------------------------------------------------------------------

def test_layout_aligns_every_tensor_after_the_header():
    metas = [TensorMeta("a", (3,), "float32", 3, 12), TensorMeta("b", (), "bfloat16", 1, 2),
             TensorMeta("c", (0,), "float32", 0, 0), TensorMeta("d", (65,), "uint8", 65, 65)]
    plan = layout(metas)
    assert plan.offsets == (HEADER, HEADER + ALIGN, HEADER + 2 * ALIGN, HEADER + 2 * ALIGN)
    assert plan.size == HEADER + 2 * ALIGN + 2 * ALIGN
    assert layout([]).size == HEADER


def test_auto_picks_shared_memory_only_when_every_engine_is_on_the_learner_node():
    assert choose_auto(on_gpu=False, learner_node="n1", engine_nodes=["n1", "n1"]) == "shared_memory"
    assert choose_auto(on_gpu=False, learner_node="n1", engine_nodes=["n1", "n2"]) == "object_store"
    assert choose_auto(on_gpu=False, learner_node=None, engine_nodes=[]) == "object_store"
    assert choose_auto(on_gpu=True, learner_node="n1", engine_nodes=["n1"]) == "nccl"
    learners, rollouts = [object()], [object(), object()]  # the constructors start nothing
    same = make_weight_sync("auto", learners, rollouts, adapter_only=False, on_gpu=False, nodes=("n1", ["n1", "n1"]))
    apart = make_weight_sync("auto", learners, rollouts, adapter_only=False, on_gpu=False, nodes=("n1", ["n1", "n2"]))
    assert type(same) is SharedMemorySync and type(apart) is ObjectStoreSync
    named = make_weight_sync("shared_memory", learners, rollouts, adapter_only=True, on_gpu=False, name="x")
    assert type(named) is SharedMemorySync and named.name == "x" and named.adapter_only


def test_explicit_request_across_nodes_names_the_field():
    check_same_node("n1", ["n1", "n1"])
    with pytest.raises(ValueError, match=r"spec.rl.weightSync 'shared_memory' .* 1 of 2 run on \['n2'\]"):
        check_same_node("n1", ["n1", "n2"])


def test_region_roundtrip_is_bit_exact_and_close_leaves_nothing(shm_dir):
    named = [("w", torch.randn(5, 7)), ("h", torch.randn(3, dtype=torch.float64).to(torch.bfloat16)),
             ("m", torch.tensor([True, False, True])), ("s", torch.tensor(3, dtype=torch.int64)),
             ("e", torch.empty(0, 4))]
    plan = layout(tensor_meta(named))
    path = os.path.join(shm_dir, PREFIX + "t")
    writer = Region(path, plan, create=True)
    for (_, dest), (_, src) in zip(writer.views, named):
        dest.copy_(src)
    writer.seq = 7
    reader = Region(path, plan, create=False)
    writer.unlink()
    assert os.listdir(shm_dir) == []  # unlinked, still mapped by both
    assert reader.seq == 7
    for (name, got), (want_name, want) in zip(reader.views, named):
        assert name == want_name and got.dtype == want.dtype and torch.equal(got, want), name
    writer.close(), reader.close()
    assert os.listdir(shm_dir) == []
    again = Region(path, plan, create=True)
    with pytest.raises(FileExistsError):  # a name in use is never silently shared
        Region(path, plan, create=True)
    again.close()
    assert os.listdir(shm_dir) == []


def test_region_refuses_more_than_the_directory_has(shm_dir):
    with pytest.raises(OSError, match="spec.rl.weightSync to object_store"):
        _check_room(shm_dir, 1 << 60)


def test_export_sends_a_tied_pair_once_but_a_merged_twin_travels():
    from posttrain.jobs.rl.workers.learner import drop_tied_twins

    embed, other = torch.randn(8, 4), torch.randn(8, 4)
    named = [("model.embed_tokens.weight", embed), ("x", other), ("lm_head.weight", embed),
             ("y", embed[:4]), ("e1", torch.empty(0)), ("e2", torch.empty(0))]
    assert [n for n, _ in drop_tied_twins(named)] == ["model.embed_tokens.weight", "x", "y", "e1", "e2"]
    merged = [("model.embed_tokens.weight", embed), ("lm_head.weight", embed + 1)]  # LoRA on lm_head: a new tensor
    assert [n for n, _ in drop_tied_twins(merged)] == ["model.embed_tokens.weight", "lm_head.weight"]


# ---- on Ray actors -------------------------------------------------------------------------------------

def mapped(actors: list, path: str) -> list[bool]:
    """Whether each actor's process still maps `path` (deleted or not)."""
    pids = ray.get([a.pid.remote() for a in actors])
    return [path in open(f"/proc/{pid}/maps").read() for pid in pids]


def full_state_is_dcps():
    def check(worker) -> bool:
        """The export's gather (`learner.full_state`) gives what DCP's `get_model_state_dict` gives."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from posttrain.jobs.rl.workers.learner import full_state

        want = get_model_state_dict(worker.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        got = full_state(worker.model, keep=True)
        return list(got) == list(want) and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                               for k in want)

    return check  # nested: Ray sends it by value (this test module is not importable in the actors)

@pytest.mark.slow
def test_full_push_is_bit_exact_then_a_second_push_is_seen_and_close_unmaps(rollouts, tmp_path, shm_dir):
    from transformers import AutoTokenizer

    path = str(tiny.make_model(tmp_path / "untied", hidden=64))
    group = Group(path, 1, FULL, rollouts)
    group.batch = make_batch(AutoTokenizer.from_pretrained(path))
    sync = SharedMemorySync(group.learners, group.rollouts, adapter_only=False, directory=shm_dir)
    try:
        sync.setup()
        region = sync.path
        assert os.listdir(shm_dir) == []  # unlinked once every engine mapped it
        assert mapped([*group.learners, *group.rollouts], region) == [True, True, True]
        seen = []
        for step in (1, 2):
            group.all("train_step", group.batch)
            stats = sync.push(step)
            exported = group.all("export_weights")
            assert stats.method == stats.backend == "shared_memory" and stats.tensors == len(exported)
            assert stats.bytes == sum(t.numel() * t.element_size() for _, t in exported)
            for engine in group.engine_states():
                for name, tensor in exported:
                    assert torch.equal(engine[name], tensor), name
            seen.append(dict(exported))
        assert sync.path == region  # same layout: the region is reused
        assert ray.get(group.learners[0].call.remote(full_state_is_dcps()))
        assert any(not torch.equal(seen[0][n], seen[1][n]) for n in seen[0])  # the second push moved weights
    finally:
        sync.close()
        group.stop()
    assert mapped(group.rollouts, region) == [False, False]
    assert os.listdir(shm_dir) == []


@pytest.mark.slow
def test_lora_layout_change_replans_and_a_dead_learner_leaks_nothing(rollouts, tmp_path, shm_dir):
    from transformers import AutoTokenizer

    path = str(tiny.make_model(tmp_path / "tied", tied=True, hidden=64))
    group = Group(path, 1, LORA, rollouts)
    group.batch = make_batch(AutoTokenizer.from_pretrained(path))
    sync = make_weight_sync("auto", group.learners, group.rollouts, adapter_only=True, on_gpu=False,
                            directory=shm_dir, name="lora")
    assert type(sync) is SharedMemorySync  # one local node: auto picks shared memory on CPU
    try:
        sync.setup()
        group.all("train_step", group.batch)
        small = sync.push(1)
        first = sync.path
        sync.adapter_only = False  # the export grows (every weight): the next push makes a new region
        group.all("train_step", group.batch)
        whole = sync.push(2)
        full = group.all("export_weights")
        assert small.tensors < whole.tensors == len(full)
        names = [n for n, _ in full]
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # a tied pair travels once
        assert sync.path != first and mapped(group.rollouts, first) == [False, False]
        for engine in group.engine_states():
            for name, tensor in full:
                assert torch.equal(engine[name], tensor), name
        tied = ray.get([r.call.remote(lambda w: w.engine.model.lm_head.weight
                                      is w.engine.model.model.embed_tokens.weight) for r in group.rollouts])
        assert tied == [True, True]
        second = sync.path
        ray.kill(group.learners[0])  # dies holding the region: close still frees the engines' mappings
        sync.close()
        assert mapped(group.rollouts, second) == [False, False]
    finally:
        sync.close()
        for a in group.learners:
            ray.kill(a)
    assert os.listdir(shm_dir) == []
