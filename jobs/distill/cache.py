"""The teacher cache of `distill.mode: logits`: the teacher's top-k log-probabilities of a data split, stored once.

    cache = TeacherCache(storage.resolve(uri), key=cache_key(spec, splits))
    found = cache.read("train")               # None unless a complete cache of this key is there
    cache.write("train", scores)              # [(ids [n, k], logp [n, k]) per row]

Layout: `<cache>/<split>/topk.npz` (arrays `ids` int32 [N, k], `logp` float32 [N, k], `counts` int64 [rows]:
positions per row, rows in data order) and `<cache>/<split>/manifest.json` (the key and the sizes). A split
folder is published whole (`storage.publish_tree`), so it is complete or absent, on a PVC and on object
storage alike, and every pod reads the same one. The key covers the teacher, topK, temperature and the
tokenized rows, so a changed job scores again instead of reading stale values.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.api.distill import DistillSpec
from posttrain.jobs.run import storage

FILE, MANIFEST = "topk.npz", "manifest.json"


def rows_digest(rows: list[tuple[list[int], list[int]]]) -> str:
    """A digest of tokenized rows (input_ids, labels), in order."""
    h = hashlib.sha256()
    for ids, labels in rows:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
        h.update(np.asarray(labels, dtype=np.int64).tobytes())
        h.update(b"#")
    return h.hexdigest()


def cache_key(spec: Any, rows: list[tuple[list[int], list[int]]]) -> str:
    """What a split's cache depends on: the teacher, topK, temperature and the rows."""
    settings = spec.distill or DistillSpec()
    described = {"teacher": spec.teacher.wire(), "topK": settings.top_k, "temperature": settings.temperature,
                 "rows": rows_digest(rows)}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:32]


class TeacherCache:
    def __init__(self, root: storage.Location) -> None:
        self.root = root

    def read(self, split: str, key: str) -> list[tuple[np.ndarray, np.ndarray]] | None:
        """The split's per-row scores when a complete cache with this key is there, else None."""
        folder = self.root.child(split)
        text = storage.read_text(folder.child(MANIFEST))
        if not text or json.loads(text).get("key") != key:
            return None
        local = Path(tempfile.mkdtemp(prefix="posttrain-teacher-"))
        try:
            path = (storage.download_tree(folder, local / split) if folder.remote else folder.local) / FILE
            with np.load(path, allow_pickle=False) as arrays:
                ids, logp, counts = arrays["ids"], arrays["logp"], arrays["counts"]
        finally:
            shutil.rmtree(local, ignore_errors=True)
        edges = np.concatenate([[0], np.cumsum(counts)])
        return [(ids[a:b], logp[a:b]) for a, b in zip(edges[:-1], edges[1:])]

    def write(self, split: str, key: str, scores: list[tuple[np.ndarray, np.ndarray]], *, k: int) -> dict[str, Any]:
        """Publish the split's scores (whole) and return its manifest."""
        local = Path(tempfile.mkdtemp(prefix="posttrain-teacher-"))
        try:
            ids = np.concatenate([s[0] for s in scores]) if scores else np.zeros((0, k), np.int32)
            logp = np.concatenate([s[1] for s in scores]) if scores else np.zeros((0, k), np.float32)
            counts = np.asarray([len(s[0]) for s in scores], dtype=np.int64)
            np.savez(local / FILE, ids=ids.astype(np.int32), logp=logp.astype(np.float32), counts=counts)
            manifest = {"key": key, "rows": len(scores), "positions": int(counts.sum()), "topK": int(ids.shape[1])}
            (local / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            storage.publish_tree(local, self.root.child(split))
            return manifest
        finally:
            shutil.rmtree(local, ignore_errors=True)
