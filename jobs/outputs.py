"""The output folder of a run: a public format, documented in the README.

    <output>/
      run.json        what this folder belongs to (job, spec, eval loss before training)
      metrics.jsonl   one JSON object per logged step: step, loss, ... and eval_loss when evaluated
      summary.json    status, steps, wall seconds, tokens/s, first/last loss, eval loss before/after,
                      versions, and where the model or adapter was written
      model/ | adapter/   the trained result (`posttrain.json` inside says which)
      checkpoints/    checkpoint-<step>/ folders, unless spec.checkpoint.uri points elsewhere

A folder that holds a finished run is never overwritten silently: `run`
refuses it unless told `--overwrite`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


class OutputInUse(RuntimeError):
    """The output folder holds something we must not overwrite."""


def inspect(folder: Path) -> str:
    """`fresh`, `resumable` (an unfinished posttrain run) or `finished`; raises for foreign folders."""
    if not folder.exists() or not any(folder.iterdir()):
        return "fresh"
    summary = folder / SUMMARY_FILE
    if summary.exists():
        try:
            status = json.loads(summary.read_text()).get("status")
        except json.JSONDecodeError:
            status = None
        if status == "succeeded":
            return "finished"
    if (folder / RUN_FILE).exists():
        return "resumable"
    raise OutputInUse(
        f"output folder {folder} is not empty and is not a posttrain run; choose an empty or new folder with --output"
    )


def prepare(folder: Path, *, overwrite: bool) -> str:
    """Check the folder before anything is written; returns its state (see `inspect`)."""
    state = inspect(folder)
    if state == "finished" and not overwrite:
        raise OutputInUse(
            f"output folder {folder} holds a finished run (summary.json status succeeded); "
            "choose another --output, or pass --overwrite to replace it"
        )
    return state


def clear(folder: Path) -> None:
    for name in (RUN_FILE, METRICS_FILE, SUMMARY_FILE, "model", "adapter", "checkpoints"):
        target = folder / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)  # readers never see half a file


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    path.write_text("".join(json.dumps(m) + "\n" for m in kept))
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
