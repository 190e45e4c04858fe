"""Checkpoints: `checkpoint-<step>/` folders under one location, each complete once its marker is in.

Used by every algorithm, on a filesystem path (a PVC) or object storage alike:

    ckpts = Checkpoints(storage.resolve("s3://bucket/runs/a/checkpoints"))
    folder = ckpts.folder(100)          # every rank writes its files below it (DCP shards, HF files)
    ckpts.mark_complete(100)            # written last, once every writer is done
    ckpts.rotate(keep=2)                # only after the newest one is marked
    ckpts.latest()                      # (folder, 100): the newest complete checkpoint, or None

A folder without the marker (a save that died half way) never counts for resume and is cleared
when a newer one completes. `driver_state` / `restore_rng` are what the driver keeps beside the
shards: the step, where the data stands, and its random number generators.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any
from posttrain.jobs.run import storage

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
COMPLETE_MARKER = ".posttrain-complete"
DRIVER_STATE = "driver.json"


def step_of(name: str) -> int | None:
    """The step in a checkpoint folder's name, or None for other names.

    >>> step_of("checkpoint-40"), step_of("checkpoint-x"), step_of("run.json")
    (40, None, None)
    """
    tail = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    return int(tail) if tail.isdigit() else None


@dataclass(frozen=True)
class Checkpoints:
    """The checkpoint folders of one run at `root` (a `storage.Location`)."""

    root: storage.Location

    def folder(self, step: int) -> storage.Location:
        return self.root.child(f"{PREFIX}{step}")

    def steps(self) -> list[int]:
        """Steps of every checkpoint folder, complete or not, ascending."""
        return sorted(s for s in (step_of(n) for n in storage.list_names(self.root)) if s is not None)

    def is_complete(self, step: int) -> bool:
        return storage.exists(self.folder(step).child(COMPLETE_MARKER))

    def complete_steps(self) -> list[int]:
        return [s for s in self.steps() if self.is_complete(s)]

    def latest(self) -> tuple[storage.Location, int] | None:
        """The newest complete checkpoint and its step."""
        for step in reversed(self.steps()):
            if self.is_complete(step):
                return self.folder(step), step
        return None

    def begin(self, step: int) -> storage.Location:
        """A fresh folder for `step` (a leftover of an earlier attempt at that step is cleared first)."""
        folder = self.folder(step)
        storage.remove(folder)
        return folder

    def mark_complete(self, step: int) -> None:
        storage.write_text(self.folder(step).child(COMPLETE_MARKER), f"{step}\n")

    def rotate(self, keep: int) -> list[int]:
        """Delete all but the newest `keep` complete checkpoints, and unfinished ones older than the newest
        complete one (an unfinished newer one may still be being written). Returns the steps deleted."""
        steps = self.steps()
        complete = [s for s in steps if self.is_complete(s)]
        if not complete:
            return []
        kept = set(complete[-keep:])
        doomed = [s for s in steps if s not in kept and s < complete[-1]]
        for step in doomed:
            storage.remove(self.folder(step))
        return doomed

    def write_json(self, step: int, name: str, data: dict[str, Any]) -> None:
        storage.write_text(self.folder(step).child(name), json.dumps(data, indent=2, default=str) + "\n")

    def read_json(self, folder: storage.Location, name: str) -> dict[str, Any]:
        text = storage.read_text(folder.child(name))
        return json.loads(text) if text else {}


def driver_state(step: int, per_step: int, n_items: int) -> dict[str, Any]:
    """What a checkpoint holds besides the shards: the step, where the data stands, the driver's RNGs."""
    import numpy as np
    import torch

    position = step * per_step
    return {
        "step": step,
        "data_position": position,
        "epoch": position // n_items,
        "index_in_epoch": position % n_items,
        "rng": {
            "python": _jsonable(random.getstate()),
            "numpy": _jsonable(np.random.get_state()),
            "torch": torch.get_rng_state().tolist(),
        },
    }


def restore_rng(rng: dict[str, Any]) -> None:
    import numpy as np
    import torch

    if "python" in rng:
        version, state, gauss = rng["python"]
        random.setstate((version, tuple(state), gauss))
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in rng:
        torch.set_rng_state(torch.tensor(rng["torch"], dtype=torch.uint8))


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value
