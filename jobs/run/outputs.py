"""The output folder of a run: a public format, documented in the README.

    <output>/
      run.json        what this folder belongs to (job, spec, eval loss before training)
      metrics.jsonl   one JSON object per logged step: step, loss, ... and eval_loss when evaluated
      summary.json    status, steps, wall seconds, tokens/s, first/last loss, eval loss before/after,
                      versions, and where the model or adapter was written
      model/ | adapter/   the trained result (`posttrain.json` inside says which)
      data/           a generate job's data set: train.jsonl
      checkpoints/    checkpoint-<step>/ folders, unless spec.checkpoint.uri points elsewhere

The output is a filesystem path (locally, or a PVC on a cluster) or object storage. The driver keeps
its three files in a working folder (the output itself on a filesystem, a local copy for object
storage) and `RunFolder.push` uploads them: at every checkpoint, so that a resumed run finds the
metrics up to it, and at the end. The model is written by the process that holds it
(`storage.publish_tree`), not by the driver.

A folder that holds a finished run is never overwritten silently: `run` refuses it unless told
`--overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any
from posttrain.jobs.run import storage

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
DRIVER_FILES = (RUN_FILE, METRICS_FILE, SUMMARY_FILE)
RESULT_FOLDERS = ("model", "adapter", "data", "eval", "checkpoints")


class OutputInUse(RuntimeError):
    """The output folder holds something we must not overwrite."""


class RunFolder:
    """The output location of one run, and the driver's working copy of its own files."""

    def __init__(self, loc: storage.Location) -> None:
        if loc.is_hub:
            raise ValueError(f"spec.output.uri: {loc.uri} is a hub reference; write to a path, pvc:// or s3://")
        self.loc = loc
        if loc.local is not None:
            self.work = loc.local
        else:  # one working copy per output URI on this pod
            digest = hashlib.sha256(loc.address.encode()).hexdigest()[:16]
            self.work = storage.cache_root() / "outputs" / digest

    def path(self, name: str) -> Path:
        """Where the driver reads and writes its file `name` (run.json, metrics.jsonl, summary.json)."""
        return self.work / name

    def pull(self) -> None:
        """Object storage: start the working copy afresh from what the output holds now."""
        if not self.loc.is_remote:
            return
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        for name in DRIVER_FILES:
            text = storage.read_text(self.loc.child(name))
            if text is not None:
                (self.work / name).write_text(text)

    def push(self, *names: str) -> None:
        """Object storage: upload the driver's files (all of them by default) that exist."""
        if not self.loc.is_remote:
            return
        for name in names or DRIVER_FILES:
            if (self.work / name).exists():
                storage.write_text(self.loc.child(name), (self.work / name).read_text())

    def inspect(self) -> str:
        """`fresh`, `resumable` (an unfinished posttrain run) or `finished`; raises for foreign folders.
        Reads the output itself (object storage included), not a cache."""
        names = storage.list_names(self.loc)
        if not names:
            return "fresh"
        if SUMMARY_FILE in names:
            try:
                status = json.loads(storage.read_text(self.loc.child(SUMMARY_FILE)) or "{}").get("status")
            except json.JSONDecodeError:
                status = None
            if status == "succeeded":
                return "finished"
        if RUN_FILE in names:
            return "resumable"
        raise OutputInUse(f"output {self.loc.uri} is not empty and is not a posttrain run; "
                          "choose an empty or new location with --output or spec.output.uri")

    def prepare(self, *, overwrite: bool) -> str:
        """Check the output before anything is written; returns its state (see `inspect`)."""
        state = self.inspect()
        if state == "finished" and not overwrite:
            raise OutputInUse(f"output {self.loc.uri} holds a finished run (summary.json status succeeded); "
                              "choose another --output, or pass --overwrite to replace it")
        return state

    def clear(self) -> None:
        """Remove a previous run's files and results (for --overwrite)."""
        for name in (*DRIVER_FILES, *RESULT_FOLDERS):
            storage.remove(self.loc.child(name))
        if self.loc.is_remote:
            shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True, exist_ok=True)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    storage.write_text(storage.Location(str(path), local=path),
                       json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every step line of metrics.jsonl. A last line cut short (the driver was killed while appending)
    is dropped with a warning: the resumed run writes that step again."""
    if not path.exists():
        return []
    out = []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON; the file is damaged (fix or remove that line)")
            log.warning("%s: dropping an incomplete last line (%d bytes)", path, len(line))
    return out


def restore_metrics(path: Path, *, after_step: int, log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rewrite metrics.jsonl for a run resuming at `after_step`.

    Lines past the checkpoint are dropped (the resumed run redoes those steps). Steps the
    killed driver never wrote are rebuilt from the checkpoint's own log history (HF's
    `trainer_state.json`), so the file holds every step exactly once.
    """
    by_step = {m["step"]: m for m in read_metrics(path) if 0 < m.get("step", 0) <= after_step}
    for entry in log_history:
        step = entry.get("step", 0)
        if not 0 < step <= after_step or step in by_step and "loss" in by_step[step]:
            continue
        line = by_step.setdefault(step, {"step": step})
        for key in ("loss", "grad_norm", "learning_rate", "epoch", "eval_loss"):
            if key in entry:
                line[key] = entry[key]
        if "num_input_tokens_seen" in entry:
            line["tokens_seen"] = entry["num_input_tokens_seen"]
    kept = [by_step[s] for s in sorted(by_step)]
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_text(storage.Location(str(path), local=path), "".join(json.dumps(m) + "\n" for m in kept))
    return kept


class MetricsWriter:
    """Appends one object per logged step; values logged at the same step merge into one line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: dict[str, Any] | None = None

    def add(self, step: int, values: dict[str, Any]) -> None:
        if self.pending is not None and self.pending["step"] != step:
            self.flush()
        if self.pending is None:
            self.pending = {"step": step}
        self.pending.update(values)

    def flush(self) -> None:
        if self.pending is not None:
            with self.path.open("a") as fh:
                fh.write(json.dumps(self.pending) + "\n")
            self.pending = None
