"""Training data: reading sets, rendering records, masking prompts, mixing.

Record formats (chosen per set by `format`, or detected from its fields):

- `prompt_completion`: `{"prompt": ..., "completion": ...}`; strings are plain text,
  lists of `{role, content}` messages go through the tokenizer's chat template.
- `messages`: `{"messages": [{role, content}, ...]}`; the last assistant turn is the
  completion, everything before it (rendered with the chat template and the
  generation prompt) is the prompt.
- `cot`: `{"prompt": ..., "reasoning": ..., "answer": ...}`; the completion is
  `data.cotTemplate` filled in, by default
  `<think>\\n{reasoning}\\n</think>\\n<answer>{answer}</answer>`.

Every example becomes `input_ids` and `labels`; with `completionOnlyLoss`
(the default) the prompt's labels are -100, so only completion tokens are
trained. The end-of-sequence token closes every completion.

Mixing (examples-proportional with a cap): set i contributes
`round(weight_i * min(size_i, maxSamples_i))` examples, drawn without
repetition until the capped set is used up, then again in a new order;
the union is shuffled. Everything is decided by `training.seed`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from posttrain.api.spec import DataSource, DataSpec
from posttrain.jobs.run import storage

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A data set cannot be used; the message starts with the spec field it comes from."""


@dataclass
class DataStats:
    sets: list[dict[str, Any]] = field(default_factory=list)
    train_examples: int = 0
    eval_examples: int = 0
    truncated: int = 0
    dropped: int = 0
    bad: dict[str, int] = field(default_factory=dict)  # preference records left out, by reason


def read_source(src: DataSource, where: str, *, base: Path | None = None):
    """Load one set as a `datasets.Dataset`."""
    import datasets

    try:
        loc = storage.resolve(src.source, base=base)
    except ValueError as exc:
        raise DataError(f"{where}.source: {exc}") from None
    if loc.is_hub:
        name = loc.hub_id.removeprefix("datasets/")  # type: ignore[union-attr]
        return datasets.load_dataset(name, revision=loc.revision, split=src.split)
    try:
        path = storage.fetch(loc)
    except FileNotFoundError as exc:
        raise DataError(f"{where}.source: {exc}") from None
    if not path.exists():
        raise DataError(f"{where}.source: {path} does not exist")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if src.split not in loaded:
                    raise DataError(f"{where}.split: {path} has splits {sorted(loaded)}, not {src.split!r}")
                loaded = loaded[src.split]
            return loaded
        raise DataError(f"{where}.source: {path} is a folder but not one written by datasets.save_to_disk")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{where}.source: {path.name} has an unknown extension; use .jsonl, .json, .parquet or .csv")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - re-raised with the field named
        raise DataError(f"{where}.source: cannot read {path}: {exc}") from None


def detect_format(columns: list[str], src: DataSource, data: DataSpec, where: str) -> str:
    if src.format != "auto":
        needed = {
            "prompt_completion": [data.prompt_field, data.completion_field],
            "messages": [data.messages_field],
            "cot": [data.prompt_field, data.reasoning_field, data.answer_field],
        }[src.format]
        missing = [c for c in needed if c not in columns]
        if missing:
            raise DataError(f"{where}.format: {src.format} records need fields {missing}; the set has {columns}")
        return src.format
    if data.messages_field in columns:
        return "messages"
    if {data.prompt_field, data.reasoning_field, data.answer_field} <= set(columns):
        return "cot"
    if {data.prompt_field, data.completion_field} <= set(columns):
        return "prompt_completion"
    raise DataError(
        f"{where}: cannot tell the record format from fields {columns}; expected "
        f"{data.prompt_field}/{data.completion_field}, {data.messages_field}, or "
        f"{data.prompt_field}/{data.reasoning_field}/{data.answer_field} (or set format and the *Field names)"
    )


def _chat(tokenizer, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("chat records need a tokenizer with a chat template; this tokenizer has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render(record: dict[str, Any], fmt: str, data: DataSpec, tokenizer) -> tuple[str, str, bool]:
    """(prompt text, completion text, whether the text is already chat-templated)."""
    if fmt == "messages":
        msgs = record[data.messages_field]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError("a messages record has no assistant turn to learn from")
        prompt = _chat(tokenizer, msgs[:last], generation_prompt=True)
        full = _chat(tokenizer, msgs[: last + 1], generation_prompt=False)
        if not full.startswith(prompt):
            raise DataError("the chat template renders the prompt differently inside the full chat; cannot mask it")
        return prompt, full[len(prompt) :], True
    prompt = record[data.prompt_field]
    if fmt == "cot":
        completion = data.cot_template.format(reasoning=record[data.reasoning_field], answer=record[data.answer_field])
    else:
        completion = record[data.completion_field]
    if isinstance(prompt, list):  # conversational prompt-completion
        rendered = _chat(tokenizer, prompt, generation_prompt=True)
        if isinstance(completion, list):
            full = _chat(tokenizer, prompt + completion, generation_prompt=False)
            completion = full[len(rendered) :]
        elif isinstance(completion, (int, float)) and not isinstance(completion, bool):
            completion = str(completion)  # a numeric answer field ({prompt, answer} sets) is its text
        elif not isinstance(completion, str):
            raise DataError(f"the completion field {data.completion_field!r} is a {type(completion).__name__}; "
                            "give text, a number or a list of chat messages")
        return rendered, completion, True
    return str(prompt), str(completion), False


def tokenize(prompt: str, completion: str, tokenizer, *, templated: bool, max_len: int, completion_only: bool) -> dict[str, Any]:
    """input_ids and labels for one example; prompt labels are -100 when `completion_only`.

    Prompt and completion are tokenized apart and joined, so the boundary is exact.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    # A chat template closes the turn itself (ChatML renders `...<|im_end|>\n`, eos then a newline):
    # there eos is added only when the template has none, or the target would hold it twice.
    closed = eos in completion_ids if templated else completion_ids[-1:] == [eos]
    if eos is not None and not closed:
        completion_ids = completion_ids + [eos]
    input_ids = (prompt_ids + completion_ids)[:max_len]
    labels = ([-100] * len(prompt_ids) if completion_only else list(prompt_ids)) + completion_ids
    labels = labels[:max_len]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "truncated": len(prompt_ids) + len(completion_ids) > max_len,
    }


def mixture_counts(sizes: list[int], sources: list[DataSource]) -> list[int]:
    """Examples each set contributes: round(weight * min(size, maxSamples)).

    >>> from posttrain.api.spec import DataSource as D
    >>> mixture_counts([100, 10], [D(source="a", maxSamples=20), D(source="b", weight=2.0)])
    [20, 20]
    """
    counts = []
    for n, src in zip(sizes, sources):
        capped = min(n, src.max_samples) if src.max_samples else n
        counts.append(int(round(src.weight * capped)) if capped else 0)
    return counts


def mixture_indices(size: int, count: int, rng: np.random.Generator) -> list[int]:
    """`count` indices into a set of `size`, each used once per pass, a new order each pass."""
    out: list[int] = []
    while len(out) < count:
        out.extend(rng.permutation(size)[: count - len(out)].tolist())
    return out


def mix(pools: list[list[Any]], available: list[int], sources: list[DataSource], seed: int,
        stats: DataStats) -> list[Any]:
    """Draw each set's share from its pool (`mixture_counts`), record it in `stats.sets`, shuffle the union."""
    counts = mixture_counts([len(p) for p in pools], sources)
    rows: list[Any] = []
    for i, (pool, count, src) in enumerate(zip(pools, counts, sources)):
        rng = np.random.default_rng([seed, 1000 + i])
        picked = [pool[j] for j in mixture_indices(len(pool), count, rng)] if pool else []
        rows.extend(picked)
        stats.sets.append({"source": src.source, "available": available[i], "used": len(pool), "drawn": len(picked)})
    order = np.random.default_rng([seed, 7]).permutation(len(rows))
    return [rows[j] for j in order]


def build(data: DataSpec, tokenizer, *, seed: int, max_len: int, base: Path | None = None):
    """The tokenized (train, eval or None, DataStats) of a spec."""
    import datasets

    stats = DataStats()
    eval_rows: list[dict[str, Any]] = []

    def encode(ds, src: DataSource, where: str) -> list[dict[str, Any]]:
        fmt = detect_format(list(ds.column_names), src, data, where)
        rows = []
        for i, record in enumerate(ds):
            try:
                prompt, completion, templated = render(record, fmt, data, tokenizer)
            except (KeyError, TypeError, DataError) as exc:
                raise DataError(f"{where}: record {i}: {exc}") from None
            row = tokenize(prompt, completion, tokenizer, templated=templated, max_len=max_len,
                           completion_only=data.completion_only_loss)
            stats.truncated += row.pop("truncated")
            if all(label == -100 for label in row["labels"]):
                stats.dropped += 1  # nothing left to learn after truncation
                continue
            rows.append(row)
        return rows

    loaded = [read_source(src, f"spec.data.train[{i}]", base=base) for i, src in enumerate(data.train)]
    held_eval = read_source(data.eval, "spec.data.eval", base=base) if data.eval else None

    pools: list[list[dict[str, Any]]] = []
    for i, (ds, src) in enumerate(zip(loaded, data.train)):
        rng = np.random.default_rng([seed, i])
        capped = min(len(ds), src.max_samples) if src.max_samples else len(ds)
        order = rng.permutation(len(ds))[:capped]
        n_eval = math.ceil(data.eval_fraction * capped) if data.eval_fraction else 0
        if n_eval:
            eval_rows.extend(encode(ds.select(order[:n_eval].tolist()), src, f"spec.data.train[{i}]"))
        pools.append(encode(ds.select(order[n_eval:].tolist()), src, f"spec.data.train[{i}]"))

    train_rows = mix(pools, [len(ds) for ds in loaded], data.train, seed, stats)
    if not train_rows:
        raise DataError("spec.data.train: no usable examples (empty sets, or all truncated away by maxSeqLength)")

    if held_eval is not None:
        eval_rows = encode(held_eval, data.eval, "spec.data.eval")  # type: ignore[arg-type]
    stats.train_examples, stats.eval_examples = len(train_rows), len(eval_rows)
    train = datasets.Dataset.from_list(train_rows)
    evaluation = datasets.Dataset.from_list(eval_rows) if eval_rows else None
    return train, evaluation, stats


@dataclass
class Prompt:
    """One RL prompt: its token ids, its text (what rewards see), the record's other fields, and the prompt as
    the record gives it (a string, or chat messages without a trailing assistant answer)."""

    ids: list[int]
    text: str
    fields: dict[str, Any]
    raw: Any = None


def render_prompt(record: dict[str, Any], data: DataSpec, tokenizer) -> tuple[str, bool]:
    """(prompt text, templated) of an RL record: `messages` (every turn up to the last user turn, with the
    generation prompt) or `prompt` (a string as is; a list of messages through the chat template)."""
    if record.get(data.messages_field) is None and data.prompt_field not in record:
        raise DataError(f"an RL record needs a {data.prompt_field!r} or {data.messages_field!r} field "
                        f"(set data.promptField); it has {sorted(record)}")
    prompt = _raw_prompt(record, data)
    if isinstance(prompt, list):
        if not prompt:
            raise DataError("a messages record has no turn before its assistant answer")
        return _chat(tokenizer, prompt, generation_prompt=True), True
    return str(prompt), False


def _raw_prompt(record: dict[str, Any], data: DataSpec) -> Any:
    """The record's prompt as given: `messages` without the trailing assistant answer (a reference answer is
    not part of the prompt), else the `prompt` field."""
    if record.get(data.messages_field) is None:
        return record[data.prompt_field]
    msgs = list(record[data.messages_field])
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    return msgs


def build_prompts(data: DataSpec, tokenizer, *, seed: int, max_prompt_len: int,
                  base: Path | None = None) -> tuple[list[Prompt], DataStats]:
    """The mixed, shuffled prompt list of a grpo/ppo job (same mixing rules as `build`).

    Every field besides the prompt (`answer`, `tests`, ...) is kept and handed to the
    rewards. Prompts longer than `max_prompt_len` tokens are dropped and counted.
    """
    stats = DataStats()
    prompt_keys = {data.prompt_field, data.messages_field}
    pools: list[list[Prompt]] = []
    loaded = [read_source(src, f"spec.data.train[{i}]", base=base) for i, src in enumerate(data.train)]
    for i, (ds, src) in enumerate(zip(loaded, data.train)):
        where = f"spec.data.train[{i}]"
        capped = min(len(ds), src.max_samples) if src.max_samples else len(ds)
        order = np.random.default_rng([seed, i]).permutation(len(ds))[:capped]
        pool = []
        for j in order.tolist():
            record = ds[j]
            try:
                text, templated = render_prompt(record, data, tokenizer)
            except (KeyError, TypeError, DataError) as exc:
                raise DataError(f"{where}: record {j}: {exc}") from None
            ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
            if not ids or len(ids) > max_prompt_len:
                stats.dropped += 1
                continue
            pool.append(Prompt(ids=ids, text=text, fields={k: v for k, v in record.items() if k not in prompt_keys},
                               raw=_raw_prompt(record, data)))
        pools.append(pool)
    prompts = mix(pools, [len(ds) for ds in loaded], data.train, seed, stats)
    if not prompts:
        raise DataError(f"spec.data.train: no usable prompts (empty sets, or every prompt longer than "
                        f"{max_prompt_len} tokens = training.maxSeqLength - rl.maxNewTokens)")
    stats.train_examples = len(prompts)
    return prompts, stats
