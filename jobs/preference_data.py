"""Preference data: paired `{prompt, chosen, rejected}` (dpo, reward) and unpaired `{prompt, completion, label}` (kto).

    train, evaluation, stats = build_preference(spec.data, algorithm="dpo", seed=0)

Each field is plain text or chat messages (a prompt as a list of `{role, content}`, chosen/rejected/
completion as the assistant turn(s)); a string completion after a chat prompt becomes one assistant
message. Records keep TRL's field names (`prompt`, `chosen`, `rejected`, `completion`, `label`,
`margin`), whatever `data.*Field` calls them in the files, and TRL's trainers tokenize them.

Bad records (a missing or empty field, chosen identical to rejected, a label that is not true/false)
are counted by reason in `stats.bad` and never trained on. A set without one of the required fields,
or whose every record is bad, is an error naming the field, raised before anything is written.
Mixing, caps and the eval split follow `posttrain.jobs.data` (same seeds, same rules).
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.api.spec import DataSource, DataSpec
from posttrain.jobs.data import DataError, DataStats, mix, read_source

# Reason a record is not trained on -> the DataSpec field it concerns (the error names it).
REASON_FIELD = {"missing_prompt": "prompt_field", "missing_chosen": "chosen_field",
                "missing_rejected": "rejected_field", "missing_completion": "completion_field",
                "missing_label": "label_field", "bad_label": "label_field", "missing_margin": "margin_field",
                "identical": "rejected_field"}


def wire_name(attr: str) -> str:
    """`chosen_field` -> `chosenField`, as the spec and its errors spell it."""
    head, *rest = attr.split("_")
    return head + "".join(part.title() for part in rest)


def required(data: DataSpec, *, paired: bool) -> dict[str, str]:
    """TRL's name -> the DataSpec attribute naming the column that holds it."""
    if paired:
        return {"prompt": "prompt_field", "chosen": "chosen_field", "rejected": "rejected_field"}
    return {"prompt": "prompt_field", "completion": "completion_field", "label": "label_field"}


def _empty(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(_empty(m.get("content") if isinstance(m, dict) else m) for m in value)
    return False


def _as_turns(prompt: Any, value: Any) -> Any:
    """A string answer to a chat prompt becomes the assistant's message (TRL wants both in one form)."""
    if isinstance(prompt, list) and isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return value


def _label(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return None


def normalize(record: dict[str, Any], data: DataSpec, *, paired: bool, margin: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(the record in TRL's names, None) or (None, the reason it is bad).

    >>> from posttrain.api.spec import DataSpec
    >>> d = DataSpec(train=[{"source": "x"}])
    >>> normalize({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, d, paired=True, margin=False)
    ({'prompt': '2+2=', 'chosen': '4', 'rejected': '5'}, None)
    >>> normalize({"prompt": "2+2=", "chosen": "4", "rejected": "4"}, d, paired=True, margin=False)
    (None, 'identical')
    """
    out: dict[str, Any] = {}
    for name, attr in required(data, paired=paired).items():
        value = record.get(getattr(data, attr))
        if _empty(value):
            return None, f"missing_{name}"
        out[name] = value
    if paired:
        out["chosen"], out["rejected"] = _as_turns(out["prompt"], out["chosen"]), _as_turns(out["prompt"], out["rejected"])
        if out["chosen"] == out["rejected"]:
            return None, "identical"
    else:
        out["completion"] = _as_turns(out["prompt"], out["completion"])
        label = _label(out["label"])
        if label is None:
            return None, "bad_label"
        out["label"] = label
    if margin:
        value = record.get(data.margin_field)
        if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None, "missing_margin"
        out["margin"] = float(value)
    return out, None


def _check_columns(columns: list[str], data: DataSpec, *, paired: bool, where: str) -> None:
    for attr in required(data, paired=paired).values():
        column = getattr(data, attr)
        if column not in columns:
            raise DataError(f"{where}: records have no {column!r} field (spec.data.{wire_name(attr)}); "
                            f"they have {sorted(columns)}. Rename the field or set data.{wire_name(attr)}")


def _first_record(ds, data: DataSpec, *, paired: bool, where: str) -> None:
    """A missing field on the first record is a wrong field name more often than a bad record: refuse."""
    if len(ds) == 0:
        return
    first = ds[0]
    for attr in required(data, paired=paired).values():
        if first.get(getattr(data, attr)) is None:
            raise DataError(f"{where}: record 0 has no {getattr(data, attr)!r} field (spec.data.{wire_name(attr)}); "
                            f"it has {sorted(k for k, v in first.items() if v is not None)}")


def build_preference(data: DataSpec, *, algorithm: str, seed: int, base: Path | None = None):
    """(train, eval or None, DataStats) for dpo/reward (paired) or kto (unpaired), as `datasets.Dataset`s.

    `stats.bad` counts the records left out by reason, over every set (train and eval).
    """
    import datasets

    paired = algorithm != "kto"
    stats = DataStats()
    bad: Counter[str] = Counter()

    def encode(ds, src: DataSource, where: str, *, margin: bool) -> list[dict[str, Any]]:
        rows, reasons = [], Counter()
        for record in ds:
            row, reason = normalize(record, data, paired=paired, margin=margin)
            if reason:
                reasons[reason] += 1
            else:
                rows.append(row)
        if len(ds) and not rows:
            reason, count = reasons.most_common(1)[0]
            raise DataError(f"{where}: every record is unusable ({dict(reasons)}); the most common problem, {reason} "
                            f"({count}), concerns spec.data.{wire_name(REASON_FIELD[reason])}")
        bad.update(reasons)
        return rows

    loaded = [read_source(src, f"spec.data.train[{i}]", base=base) for i, src in enumerate(data.train)]
    held_eval = read_source(data.eval, "spec.data.eval", base=base) if data.eval else None
    sets = [(ds, f"spec.data.train[{i}]") for i, ds in enumerate(loaded)]
    if held_eval is not None:
        sets.append((held_eval, "spec.data.eval"))
    for ds, where in sets:
        _check_columns(list(ds.column_names), data, paired=paired, where=where)
        _first_record(ds, data, paired=paired, where=where)
    # the margin is used only when every set has it: one Bradley-Terry loss for the whole batch
    margin = algorithm == "reward" and all(data.margin_field in ds.column_names for ds, _ in sets)

    pools: list[list[dict[str, Any]]] = []
    eval_rows: list[dict[str, Any]] = []
    for i, (ds, src) in enumerate(zip(loaded, data.train)):
        where = f"spec.data.train[{i}]"
        capped = min(len(ds), src.max_samples) if src.max_samples else len(ds)
        order = np.random.default_rng([seed, i]).permutation(len(ds))[:capped]
        n_eval = math.ceil(data.eval_fraction * capped) if data.eval_fraction else 0
        if n_eval:
            eval_rows.extend(encode(ds.select(order[:n_eval].tolist()), src, where, margin=margin))
        pools.append(encode(ds.select(order[n_eval:].tolist()), src, where, margin=margin))
    train_rows = mix(pools, [len(ds) for ds in loaded], data.train, seed, stats)
    if not train_rows:
        raise DataError("spec.data.train: no usable records (the sets are empty)")
    if held_eval is not None:
        eval_rows = encode(held_eval, data.eval, "spec.data.eval", margin=margin)  # type: ignore[arg-type]
    stats.train_examples, stats.eval_examples = len(train_rows), len(eval_rows)
    stats.dropped = sum(bad.values())
    stats.bad = dict(sorted(bad.items()))
    return datasets.Dataset.from_list(train_rows), (datasets.Dataset.from_list(eval_rows) if eval_rows else None), stats
