"""Weight sync through one shared-memory region on the node: the learner writes once, every engine reads.

For learner rank 0 and rollout engines on one node (a local run, one pod, `placement: colocated`):

    sync = make_weight_sync("shared_memory", learners, rollouts, adapter_only=False, on_gpu=False)
    sync.setup()          # every engine must be on learner rank 0's node (Ray node id), else ValueError
    stats = sync.push(step)
    sync.close()          # every process drops its mapping; nothing is left in /dev/shm

How a push moves the bytes: learner rank 0 copies its export (`export_weights`, HF names, LoRA merged)
into a file in `/dev/shm` laid out by `layout` (each tensor at a 64-byte aligned offset, a 64-byte
header in front); each engine maps the same file and hands `load_weights` views of it
(`torch.frombuffer`, no copy, no pickling), so the bytes are written once and read once per engine.
Through Ray go only the small plan (names, shapes, dtypes, offsets: sent when the layout changes)
and a sequence number.

- Setup exports once to size the region, creates it (`posix_fallocate`: a full /dev/shm is a clear
  error, not a SIGBUS later), and every engine maps it; then the file is unlinked. From then on the
  memory lives only as long as some process maps it: a learner or engine that dies (even SIGKILL)
  leaks nothing, and `close()` frees it.
- A push whose export has another layout (a size or dtype change) makes a new region the same way.
- The learner never overwrites what an engine reads: a push returns only when every engine has
  loaded (or failed), and engines check the header's sequence number before and after loading.
- `auto` (`make_weight_sync`) picks this transport on CPU when every engine is on the learner's
  node (`choose_auto`), else the object store; asked for by name across nodes it is an error
  naming `spec.rl.weightSync`.

Tests: `pytest tests/test_rl_shm_sync.py`; timings: `benchmarks/weight_sync.py`.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .buckets import TensorMeta, tensor_meta
from .sync import Export, SyncStats, WeightSync, _export

if TYPE_CHECKING:
    import torch
    from ray.actor import ActorHandle

log = logging.getLogger(__name__)

ALIGN = 64             # every tensor starts on a cache line (and so on any dtype's boundary)
HEADER = 64            # magic + sequence number of the push whose bytes are in the region
MAGIC = b"PTWSHM01"
PREFIX = "posttrain-weights-"
FIELD = "spec.rl.weightSync"


@dataclass(frozen=True)
class Layout:
    """Where each exported tensor lives in the region: `metas[i]` at byte `offsets[i]`; `size` in bytes."""

    metas: tuple[TensorMeta, ...]
    offsets: tuple[int, ...]
    size: int


def layout(metas: list[TensorMeta]) -> Layout:
    """Tensors back to back after the header, each at an `ALIGN`-byte boundary. Pure."""
    offsets, at = [], HEADER
    for m in metas:
        offsets.append(at)
        at += -(-m.nbytes // ALIGN) * ALIGN
    return Layout(tuple(metas), tuple(offsets), max(at, HEADER))


def choose_auto(*, on_gpu: bool, learner_node: str | None, engine_nodes: list[str]) -> str:
    """`weightSync: auto`: nccl on GPU; on CPU shared memory when every engine shares learner rank 0's node
    (Ray node ids), else the object store."""
    if on_gpu:
        return "nccl"
    return "shared_memory" if learner_node is not None and all(n == learner_node for n in engine_nodes) else "object_store"


def check_same_node(learner_node: str, engine_nodes: list[str]) -> None:
    """Raise, naming the field, unless every engine is on learner rank 0's node."""
    others = sorted({n for n in engine_nodes if n != learner_node})
    if others:
        raise ValueError(f"{FIELD} 'shared_memory' needs every rollout engine on learner rank 0's node "
                         f"({learner_node[:12]}), but {sum(n != learner_node for n in engine_nodes)} of "
                         f"{len(engine_nodes)} run on {[n[:12] for n in others]}; use 'auto' (falls back to "
                         "object_store) or 'object_store'")


def actor_nodes(learner: ActorHandle, rollouts: list[ActorHandle]) -> tuple[str, list[str]]:
    """(learner's Ray node id, each rollout's)."""
    import ray

    learner_node, *engine_nodes = ray.get([a.call.remote(_node_id) for a in [learner, *rollouts]])
    return learner_node, engine_nodes


def auto_method(learners: list[ActorHandle], rollouts: list[ActorHandle], *, on_gpu: bool,
                nodes: tuple[str, list[str]] | None = None) -> str:
    """`choose_auto` for these actors; asks them for their nodes (unless `nodes` is given) only on CPU."""
    if on_gpu:
        return "nccl"
    learner_node, engine_nodes = nodes if nodes is not None else actor_nodes(learners[0], rollouts)
    return choose_auto(on_gpu=False, learner_node=learner_node, engine_nodes=engine_nodes)


def default_directory() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else os.environ.get("TMPDIR", "/tmp")


class SharedMemorySync(WeightSync):
    """Learner rank 0 writes its export into a shared-memory region that every engine on the node maps.

    `directory`: where the region's file is made (a tmpfs; `/dev/shm` by default). `name` keys the
    region on the actors: two live syncs over the same actors need different names.
    """

    method = "shared_memory"

    def __init__(self, learners: list[ActorHandle], rollouts: list[ActorHandle], *, adapter_only: bool,
                 lora_serving: str | None = None, directory: str | None = None, name: str = "weights") -> None:
        super().__init__(learners, rollouts, adapter_only=adapter_only, lora_serving=lora_serving)
        self.directory, self.name = directory or default_directory(), name
        self.path: str | None = None  # the current region's file (unlinked once every engine maps it)
        self._seq = 0
        self._ready = False

    def setup(self) -> None:
        import ray

        check_same_node(*actor_nodes(self.learners[0], self.rollouts))
        export = self.export
        ref = self.learners[0].call.remote(_write, self.name, self.directory, export, 0)
        written, *_ = _wait_all([ref, *self._export_on_other_ranks(export)])
        self.path = written["plan"]["path"]
        _wait_all([r.call.remote(_map, self.name, ray.put(written["plan"])) for r in self.rollouts])
        self._unlink()
        self._ready = True
        log.info("weight sync %r: shared memory %s, %.1f MiB, %d tensors, %d engines", self.name, self.path,
                 written["plan"]["layout"].size / 2**20, written["tensors"], len(self.rollouts))

    def push(self, step: int) -> SyncStats:
        import ray

        if not self._ready:
            raise RuntimeError("SharedMemorySync.push before setup(): call setup() once after the actors are ready")
        started = time.perf_counter()
        self._seq += 1
        export, config = self.export, self.adapter_config
        ref = self.learners[0].call.remote(_write, self.name, self.directory, export, self._seq)
        written, *_ = _wait_all([ref, *self._export_on_other_ranks(export)])
        exported = time.perf_counter()
        plan = written["plan"]  # None unless the export's layout changed: then a new region, mapped anew
        if plan is not None:
            self.path = plan["path"]
        plan_ref = ray.put(plan) if plan is not None else None
        counts = _wait_all([r.call.remote(_load, self.name, plan_ref, self._seq, config) for r in self.rollouts])
        done = time.perf_counter()
        if plan is not None:
            self._unlink()
        if any(c != written["tensors"] for c in counts):
            raise RuntimeError(f"weight sync: engines loaded {counts} tensors, the learner wrote {written['tensors']}")
        return self._report(SyncStats(step, self.method, self.method, done - started, exported - started,
                                      done - exported, written["bytes"], written["tensors"], payload=self.payload))

    def close(self) -> None:
        import ray

        if self.path is None:
            return
        refs = [a.call.remote(_release, self.name) for a in [self.learners[0], *self.rollouts]]
        for ref in refs:  # one actor already gone (its mapping went with it) must not keep the others mapped
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001
                log.warning("weight sync %r: release failed on one actor: %s", self.name, err)
        if os.path.exists(self.path):  # the learner died between creating and unlinking it (same node: we can)
            os.unlink(self.path)
        self.path, self._ready = None, False

    def _unlink(self) -> None:
        import ray

        ray.get(self.learners[0].call.remote(_unlink, self.name))


def _wait_all(refs: list[Any]) -> list[Any]:
    """`ray.get(refs)` after every task has ended: a failed engine must not let the next push overwrite
    the region while another engine still reads it."""
    import ray

    ray.wait(refs, num_returns=len(refs))
    return ray.get(refs)


# ---- one process's mapping ---------------------------------------------------------------------------

class Region:
    """A shared-memory file mapped into this process; `buffer` is a uint8 tensor over all of it."""

    def __init__(self, path: str, plan: Layout, *, create: bool) -> None:
        import torch

        self.path, self.plan, size = path, plan, plan.size
        if create:
            _check_room(Path(path).parent, size)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # the pages exist now: a full tmpfs fails here, not as SIGBUS
            except OSError as err:
                os.close(fd)
                os.unlink(path)
                raise OSError(f"weight sync: cannot reserve {size / 2**20:.1f} MiB in {Path(path).parent} ({err}); "
                              f"give the pod a larger /dev/shm or set {FIELD} to object_store") from err
        else:
            fd = os.open(path, os.O_RDWR)
        try:
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)  # page tables filled once, not per push
            self.mm = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.buffer = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.linked = create
        # one view per tensor, made once per region: a push only copies into them or loads from them
        self.views = [(m.name, self.buffer[o:o + m.nbytes].view(getattr(torch, m.dtype)).view(m.shape))
                      for m, o in zip(plan.metas, plan.offsets)]

    @property
    def seq(self) -> int:
        magic, seq = struct.unpack_from("<8sq", self.mm, 0)
        return seq if magic == MAGIC else -1

    @seq.setter
    def seq(self, value: int) -> None:
        struct.pack_into("<8sq", self.mm, 0, MAGIC, value)

    def unlink(self) -> None:
        if self.linked:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.linked = False

    def close(self) -> None:
        self.unlink()
        self.views, self.buffer = [], None
        try:
            self.mm.close()
        except BufferError:  # something still holds a view: the mapping goes when that is collected
            log.warning("weight sync: a view of %s is still referenced; its mapping stays until freed", self.path)


def _check_room(directory: Path, size: int) -> None:
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < size:
        raise OSError(f"weight sync: the region needs {size / 2**20:.1f} MiB in {directory}, which has "
                      f"{free / 2**20:.1f} MiB free; give the pod a larger /dev/shm or set {FIELD} to object_store")


# ---- inside the actors (run through `actor.call`) ----------------------------------------------------

def _regions(worker: Any) -> dict[str, Region]:
    return vars(worker).setdefault("_shm_regions", {})


def _node_id(worker: Any) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _write(worker: Any, name: str, directory: str, export: Export, seq: int) -> dict[str, Any]:
    """Learner rank 0: export (with the other ranks) and copy it into the region, making a new region
    when there is none or the layout changed. Returns {"plan": {path, layout} or None, "tensors", "bytes"}."""
    import torch

    named = _export(worker, export)  # the weights (LoRA merged), or the adapter's tensors (rl.loraServing adapter)
    plan = layout(tensor_meta(named))
    region, fresh = _regions(worker).get(name), None
    if region is None or region.plan != plan:
        if region is not None:
            region.close()
        path = str(Path(directory) / f"{PREFIX}{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        region = _regions(worker)[name] = Region(path, plan, create=True)
        fresh = {"path": path, "layout": plan}
    region.seq = 0  # being written
    with torch.no_grad():
        for (_, dest), (_, src) in zip(region.views, named):
            dest.copy_(src)
    region.seq = seq
    return {"plan": fresh, "tensors": len(named), "bytes": sum(m.nbytes for m in plan.metas)}


def _unlink(worker: Any, name: str) -> None:
    """Learner rank 0, once every engine maps the region: drop its name; the memory lives while mapped."""
    _regions(worker)[name].unlink()


def _map(worker: Any, name: str, plan: dict[str, Any]) -> None:
    """An engine: map the region `plan` names (replacing an older one) and keep views of its tensors."""
    old = _regions(worker).pop(name, None)
    if old is not None:
        old.close()
    _regions(worker)[name] = Region(plan["path"], plan["layout"], create=False)


def _load(worker: Any, name: str, plan: dict[str, Any] | None, seq: int, config: dict[str, Any] | None = None) -> int:
    """An engine: load push `seq` from the region (mapping a new one first when `plan` is given); with an
    adapter's `config`, serve the region's tensors as the engine's new LoRA adapter."""
    if plan is not None:
        _map(worker, name, plan)
    region = _regions(worker)[name]
    if region.seq != seq:
        raise RuntimeError(f"weight sync: the region holds push {region.seq}, expected {seq}")
    loaded = worker.load_adapter(region.views, config) if config is not None else worker.load_weights(region.views)
    if region.seq != seq:  # the learner wrote while this engine read: its weights are a mix
        raise RuntimeError(f"weight sync: push {seq} was overwritten while loading")
    return loaded


def _release(worker: Any, name: str) -> None:
    region = _regions(worker).pop(name, None)
    if region is not None:
        region.close()
