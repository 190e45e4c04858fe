"""The trainer's prepared (tokenized) data: written once by the driver to the run's output, read by each
Ray Train worker from there, so the rows never travel inside `train_loop_config` (a 1 GB dataset would
otherwise be pickled by the driver and copied through Ray's object store to every worker).

    cfg = publish(ctx.folder.loc, cfg)                # cfg["train"] / cfg["eval"]: addresses, not rows
    train_ds = load(cfg["train"], staging=tmp)        # on a worker: memory-mapped Arrow files

The folder is `<output>/prepared-data/<split>` (Hugging Face `datasets` Arrow format): the output is a
path, a PVC or object storage, which every pod of the job can read (`storage`). A local or PVC folder is
memory-mapped where it is; object storage is downloaded to this worker's `staging` folder first. Each worker
reads the whole split and the Trainer's distributed sampler gives it its rows, as with in-memory data.
Teacher columns of `distill` (teacher_ids, teacher_logp) are columns of these rows and travel the same way.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from posttrain.jobs.run import storage

FOLDER = "prepared-data"
SPLITS = ("train", "eval")


def publish(output: storage.Location, cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with each dataset of SPLITS written under `output`/prepared-data and replaced by its address."""
    out = dict(cfg)
    for split in SPLITS:
        ds = cfg.get(split)
        if ds is None:
            continue
        staging = Path(tempfile.mkdtemp(prefix=f"posttrain-{split}-"))
        try:
            ds.save_to_disk(str(staging / split))
            dest = output.child(FOLDER, split)
            storage.publish_tree(staging / split, dest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        out[split] = dest.address
    return out


def load(address: str | None, *, staging: Path) -> Any:
    """The dataset published at `address` (None stays None); object storage is copied under `staging`."""
    if address is None:
        return None
    from datasets import load_from_disk

    loc = storage.resolve(address)
    if loc.local is not None:
        return load_from_disk(str(loc.local))
    staging.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(dir=staging, prefix="data-"))  # a rerun on this pod gets its own copy
    return load_from_disk(str(storage.download_tree(loc, fresh / "split")))
