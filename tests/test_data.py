"""Training data: rendering, prompt masking, truncation, mixing, held-out eval, reading files.

Uses the tiny model's tokenizer (byte-level BPE, ChatML template, eos `<|im_end|>`, no bos);
no Ray, no model weights are loaded.

    .venv/bin/python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from posttrain.api.spec import DataSource, DataSpec
from posttrain.jobs.data import DataError, build, detect_format, mixture_counts, read_source, render, tokenize

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tiny_model):
    from posttrain.jobs.models import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    assert tok.eos_token == EOS and tok.bos_token is None  # what the assertions below rely on
    return tok


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep the `datasets` cache of files read here out of the home folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets-cache")


def data_spec(**fields) -> DataSpec:
    fields.setdefault("train", [{"source": "unused.jsonl"}])
    return DataSpec.model_validate(fields)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def add_records(n: int, word: str = "add", k: int = 1) -> list[dict[str, str]]:
    """Distinct prompt/completion records: `add 3 + 1 =` -> ` the answer is 4`."""
    return [{"prompt": f"{word} {i} + {k} =", "completion": f" the answer is {i + k}"} for i in range(n)]


def encode(tok, record, fmt, data, *, max_len=256, completion_only=True):
    prompt, completion, templated = render(record, fmt, data, tok)
    row = tokenize(prompt, completion, tok, templated=templated, max_len=max_len, completion_only=completion_only)
    return prompt, completion, templated, row


def trained_text(tok, row) -> str:
    return tok.decode([t for t in row["labels"] if t != -100])


def texts(tok, ds) -> list[str]:
    return [tok.decode(ids) for ids in ds["input_ids"]]


# --- rendering and masking -------------------------------------------------------------------


def test_a_chat_prompt_with_a_numeric_answer_learns_its_text_and_other_types_name_the_field(tok):
    """{prompt: chat, answer: 99} sets (GRPO's, evaluation's) train with completionField: answer."""
    data = data_spec(completionField="answer")
    record = {"prompt": [{"role": "user", "content": "How many?"}], "answer": 99}
    prompt, completion, templated, row = encode(tok, record, "prompt_completion", data)
    assert completion == "99" and templated and trained_text(tok, row).startswith("99")
    with pytest.raises(DataError, match="the completion field 'answer' is a dict; give text, a number"):
        render({**record, "answer": {"n": 99}}, "prompt_completion", data, tok)


def test_prompt_completion_masks_exactly_the_prompt(tok):
    record = {"prompt": "add 3 + 4 =", "completion": " the answer is 7"}
    prompt, completion, templated, row = encode(tok, record, "prompt_completion", data_spec())
    assert (prompt, completion, templated) == ("add 3 + 4 =", " the answer is 7", False)
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == p + c + [tok.eos_token_id]
    assert row["labels"] == [-100] * len(p) + c + [tok.eos_token_id]
    assert row["labels"][len(p):] == row["input_ids"][len(p):]
    assert trained_text(tok, row) == " the answer is 7" + EOS
    assert row["truncated"] is False


def test_eos_is_not_doubled_when_the_completion_ends_with_it(tok):
    record = {"prompt": "add 3 + 4 =", "completion": " the answer is 7" + EOS}
    _, _, _, row = encode(tok, record, "prompt_completion", data_spec())
    assert row["input_ids"].count(tok.eos_token_id) == 1 and row["input_ids"][-1] == tok.eos_token_id


def test_messages_train_only_the_last_assistant_turn(tok):
    chat = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "add 1 + 2"},
        {"role": "assistant", "content": "3"},
        {"role": "user", "content": "and 2 + 2"},
        {"role": "assistant", "content": "4"},
    ]
    prompt, completion, templated, row = encode(tok, {"messages": chat}, "messages", data_spec())
    assert templated is True
    assert prompt == tok.apply_chat_template(chat[:4], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n") and "3<|im_end|>" in prompt  # first answer is context
    assert completion == "4<|im_end|>\n"
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert -100 not in row["labels"][n_prompt:]
    # The template closes the turn with eos; the target holds it exactly once.
    assert trained_text(tok, row) == "4<|im_end|>\n"
    assert row["labels"].count(tok.eos_token_id) == 1
    assert tok.decode(row["input_ids"]) == tok.apply_chat_template(chat, tokenize=False)


def test_messages_without_an_assistant_turn_are_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"^spec\.data\.train\[0\]: record 0: .*no assistant turn"):
        build(data_spec(train=[{"source": str(path)}]), tok, seed=0, max_len=64)


def test_conversational_prompt_completion(tok):
    record = {"prompt": [{"role": "user", "content": "add 1 + 2"}],
              "completion": [{"role": "assistant", "content": "3"}]}
    prompt, completion, templated, row = encode(tok, record, "prompt_completion", data_spec())
    assert templated and prompt == "<|im_start|>user\nadd 1 + 2<|im_end|>\n<|im_start|>assistant\n"
    assert completion == "3<|im_end|>\n"
    assert trained_text(tok, row) == "3<|im_end|>\n"


def test_cot_fills_the_default_template(tok):
    record = {"prompt": "add 2 + 3 =", "reasoning": "first 2 then 3", "answer": "5"}
    prompt, completion, _, row = encode(tok, record, "cot", data_spec())
    assert prompt == "add 2 + 3 ="
    expected = "<think>\nfirst 2 then 3\n</think>\n<answer>5</answer>"
    assert completion == expected
    assert trained_text(tok, row) == expected + EOS
    n_prompt = len(tok(prompt)["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt and -100 not in row["labels"][n_prompt:]


def test_cot_with_custom_template_and_field_names(tok, tmp_path):
    data = data_spec(promptField="question", reasoningField="why", answerField="final",
                     cotTemplate="Reasoning: {reasoning}\nAnswer: {answer}")
    record = {"question": "add 2 + 3 =", "why": "2 and 3 is 5", "final": "5"}
    assert detect_format(list(record), DataSource(source="x"), data, "w") == "cot"
    _, _, _, row = encode(tok, record, "cot", data)
    assert trained_text(tok, row) == "Reasoning: 2 and 3 is 5\nAnswer: 5" + EOS
    # The same through build(), from a file.
    path = write_jsonl(tmp_path / "cot.jsonl", [record])
    data = data.model_copy(update={"train": [DataSource(source=str(path))]})
    train, _, _ = build(data, tok, seed=0, max_len=256)
    assert trained_text(tok, train[0]) == "Reasoning: 2 and 3 is 5\nAnswer: 5" + EOS


def test_completion_only_loss_off_trains_the_prompt_too(tok, tmp_path):
    record = add_records(1)[0]
    _, _, _, row = encode(tok, record, "prompt_completion", data_spec(), completion_only=False)
    assert row["labels"] == row["input_ids"]
    path = write_jsonl(tmp_path / "a.jsonl", [record])
    train, _, _ = build(data_spec(train=[{"source": str(path)}], completionOnlyLoss=False), tok, seed=0, max_len=64)
    assert train[0]["labels"] == train[0]["input_ids"]
    assert -100 not in train[0]["labels"]


def test_truncation_to_max_seq_length(tok, tmp_path):
    record = {"prompt": "add 3 + 4 =", "completion": " the answer is 7 then the sum is 7 so the value is 7"}
    _, _, _, full = encode(tok, record, "prompt_completion", data_spec())
    n_prompt = full["labels"].count(-100)
    max_len = n_prompt + 3
    assert len(full["input_ids"]) > max_len
    _, _, _, row = encode(tok, record, "prompt_completion", data_spec(), max_len=max_len)
    assert row["truncated"] is True
    assert row["input_ids"] == full["input_ids"][:max_len]
    assert row["labels"] == full["labels"][:max_len]
    assert row["input_ids"][-1] != tok.eos_token_id  # the cut falls inside the completion

    # build(): a truncated row stays, a row with no completion token left is dropped.
    short = {"prompt": "add", "completion": " 1"}
    path = write_jsonl(tmp_path / "t.jsonl", [record, short])
    train, _, stats = build(data_spec(train=[{"source": str(path)}]), tok, seed=0, max_len=n_prompt)
    assert (stats.truncated, stats.dropped, stats.train_examples) == (1, 1, 1)
    assert all(len(ids) <= n_prompt for ids in train["input_ids"])
    assert tok.decode(train[0]["input_ids"]) == "add 1" + EOS
    with pytest.raises(DataError, match="no usable examples"):
        build(data_spec(train=[{"source": str(path)}]), tok, seed=0, max_len=1)


# --- mixing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("sizes", "sources", "expected"), [
    ([10], [{}], [10]),
    ([10, 8], [{}, {"weight": 2.0, "maxSamples": 3}], [10, 6]),
    ([100, 10], [{"maxSamples": 20}, {"weight": 2.0}], [20, 20]),
    ([10], [{"weight": 0.3}], [3]),
    ([10], [{"weight": 0.25}], [2]),  # round(2.5): Python rounds half to even
    ([5], [{"maxSamples": 50}], [5]),  # a cap above the size changes nothing
    ([0, 4], [{"weight": 3.0}, {}], [0, 4]),
])
def test_mixture_counts(sizes, sources, expected):
    srcs = [DataSource.model_validate({"source": f"s{i}", **s}) for i, s in enumerate(sources)]
    assert mixture_counts(sizes, srcs) == expected


@pytest.fixture
def two_sets(tmp_path) -> tuple[Path, Path]:
    return (write_jsonl(tmp_path / "a.jsonl", add_records(10, "add")),
            write_jsonl(tmp_path / "b.jsonl", add_records(8, "sum", k=2)))


def mixed_spec(a: Path, b: Path, **extra) -> DataSpec:
    return data_spec(train=[{"source": str(a)}, {"source": str(b), "weight": 2.0, "maxSamples": 3}], **extra)


def test_build_respects_weights_and_caps(tok, two_sets):
    train, evaluation, stats = build(mixed_spec(*two_sets), tok, seed=0, max_len=64)
    assert evaluation is None
    drawn = Counter(texts(tok, train))
    a = {t: n for t, n in drawn.items() if t.startswith("add ")}
    b = {t: n for t, n in drawn.items() if t.startswith("sum ")}
    assert len(train) == 16 and sum(a.values()) + sum(b.values()) == 16
    assert len(a) == 10 and set(a.values()) == {1}  # every record of A once
    assert len(b) == 3 and set(b.values()) == {2}  # 3 records of B (the cap), each twice (weight 2)
    assert stats.train_examples == 16 and stats.eval_examples == 0
    assert [(s["available"], s["used"], s["drawn"]) for s in stats.sets] == [(10, 10, 10), (8, 3, 6)]


def test_build_fractional_weight_draws_without_repetition(tok, two_sets):
    data = data_spec(train=[{"source": str(two_sets[0]), "weight": 0.5}])
    train, _, _ = build(data, tok, seed=3, max_len=64)
    assert len(train) == 5 and len(set(texts(tok, train))) == 5


def test_build_is_deterministic_for_a_seed_and_differs_across_seeds(tok, two_sets):
    def run(seed):
        train, _, _ = build(mixed_spec(*two_sets), tok, seed=seed, max_len=64)
        return texts(tok, train)

    first, again, other = run(1), run(1), run(2)
    assert first == again
    assert first != other
    b_first = {t for t in first if t.startswith("sum ")}
    b_others = [{t for t in run(s) if t.startswith("sum ")} for s in (2, 3, 4, 5)]
    assert any(b != b_first for b in b_others)  # the capped subset of B depends on the seed


# --- held-out evaluation ---------------------------------------------------------------------


def test_eval_fraction_holds_out_the_right_count(tok, two_sets):
    a, b = two_sets
    train, evaluation, stats = build(mixed_spec(a, b, evalFraction=0.25), tok, seed=0, max_len=64)
    # A: 10 records, ceil(0.25 * 10) = 3 held out, 7 train.  B: capped at 3, ceil(0.75) = 1 held out,
    # 2 left, drawn twice (weight 2) = 4.
    assert (len(evaluation), len(train)) == (4, 11)
    assert (stats.eval_examples, stats.train_examples) == (4, 11)
    eval_texts, train_texts = set(texts(tok, evaluation)), set(texts(tok, train))
    assert len(eval_texts) == 4 and not eval_texts & train_texts
    assert sum(t.startswith("add ") for t in eval_texts) == 3
    assert len({t for t in train_texts | eval_texts if t.startswith("add ")}) == 10
    assert len({t for t in train_texts | eval_texts if t.startswith("sum ")}) == 3


def test_eval_set_is_read_whole(tok, tmp_path, two_sets):
    held = write_jsonl(tmp_path / "eval.jsonl", add_records(4, "sum", k=7))
    data = data_spec(train=[{"source": str(two_sets[0])}], eval={"source": str(held)})
    train, evaluation, _ = build(data, tok, seed=0, max_len=64)
    assert len(train) == 10
    assert sorted(texts(tok, evaluation)) == sorted(f"sum {i} + 7 = the answer is {i + 7}{EOS}" for i in range(4))


# --- reading sets ----------------------------------------------------------------------------

RECORDS = add_records(5)


def _write(kind: str, folder: Path) -> Path:
    import datasets
    import pandas as pd

    frame = pd.DataFrame(RECORDS)
    if kind == "jsonl":
        return write_jsonl(folder / "d.jsonl", RECORDS)
    if kind == "json":
        path = folder / "d.json"
        path.write_text(json.dumps(RECORDS))
        return path
    if kind == "parquet":
        frame.to_parquet(folder / "d.parquet", index=False)
        return folder / "d.parquet"
    if kind == "csv":
        frame.to_csv(folder / "d.csv", index=False)
        return folder / "d.csv"
    if kind == "save_to_disk":
        datasets.Dataset.from_list(RECORDS).save_to_disk(str(folder / "saved"))
        return folder / "saved"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv", "save_to_disk"])
def test_read_source_formats(tmp_path, kind):
    path = _write(kind, tmp_path)
    ds = read_source(DataSource(source=str(path)), "spec.data.train[0]")
    assert ds.to_list() == RECORDS


def test_read_source_file_uri_and_relative_path(tmp_path):
    path = _write("jsonl", tmp_path)
    assert read_source(DataSource(source=f"file://{path}"), "w").to_list() == RECORDS
    assert read_source(DataSource(source="d.jsonl"), "w", base=tmp_path).to_list() == RECORDS


def test_read_source_dataset_dict_split(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS),
                          "test": datasets.Dataset.from_list(RECORDS[:2])}).save_to_disk(str(folder))
    assert read_source(DataSource(source=str(folder), split="test"), "w").to_list() == RECORDS[:2]
    with pytest.raises(DataError) as info:
        read_source(DataSource(source=str(folder), split="validation"), "spec.data.train[0]")
    assert str(info.value).startswith("spec.data.train[0].split: ")
    assert "['test', 'train']" in str(info.value)


def test_build_reads_every_format(tok, tmp_path):
    sources = [{"source": str(_write(kind, tmp_path))} for kind in ("jsonl", "parquet", "csv", "save_to_disk")]
    train, _, stats = build(data_spec(train=sources), tok, seed=0, max_len=64)
    assert len(train) == 20 and [s["drawn"] for s in stats.sets] == [5, 5, 5, 5]
    assert Counter(texts(tok, train)) == Counter({f"{r['prompt']}{r['completion']}{EOS}": 4 for r in RECORDS})


@pytest.mark.parametrize(("make", "word"), [
    (lambda d: d / "missing.jsonl", "does not exist"),
    (lambda d: (d / "notes.txt").write_text("hi") and d / "notes.txt", "unknown extension"),
    (lambda d: (d / "plain").mkdir() or d / "plain", "not one written by datasets.save_to_disk"),
    (lambda d: (d / "broken.parquet").write_text("not parquet") and d / "broken.parquet", "cannot read"),
    (lambda d: Path("ftp://host/x.jsonl"), "unsupported URI scheme"),
])
def test_unreadable_sources_name_the_field(tok, tmp_path, make, word):
    bad = make(tmp_path)
    with pytest.raises(DataError) as info:
        read_source(DataSource(source=str(bad).replace("ftp:/", "ftp://")), "spec.data.train[0]")
    assert str(info.value).startswith("spec.data.train[0].source: ")
    assert word in str(info.value)


def test_build_names_the_set_that_fails(tok, tmp_path, two_sets):
    data = data_spec(train=[{"source": str(two_sets[0])}, {"source": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(DataError, match=r"^spec\.data\.train\[1\]\.source: .*nope\.jsonl does not exist"):
        build(data, tok, seed=0, max_len=64)
    data = data_spec(train=[{"source": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(DataError, match=r"^spec\.data\.train\[0\]\.source: "):
        build(data, tok, seed=0, max_len=64)


# --- record format detection -----------------------------------------------------------------


@pytest.mark.parametrize(("columns", "fields", "expected"), [
    (["prompt", "completion"], {}, "prompt_completion"),
    (["messages"], {}, "messages"),
    (["messages", "prompt", "completion"], {}, "messages"),
    (["prompt", "reasoning", "answer"], {}, "cot"),
    (["prompt", "completion", "reasoning", "answer"], {}, "cot"),
    (["instruction", "output", "id"], {"promptField": "instruction", "completionField": "output"},
     "prompt_completion"),
    (["conversation"], {"messagesField": "conversation"}, "messages"),
])
def test_detect_format(columns, fields, expected):
    assert detect_format(columns, DataSource(source="x"), data_spec(**fields), "w") == expected


def test_explicit_format_checks_its_fields():
    src = DataSource(source="x", format="cot")
    assert detect_format(["prompt", "reasoning", "answer"], src, data_spec(), "w") == "cot"
    with pytest.raises(DataError) as info:
        detect_format(["prompt", "completion"], src, data_spec(), "spec.data.train[0]")
    assert str(info.value).startswith("spec.data.train[0].format: cot records need fields ['reasoning', 'answer']")


def test_undetectable_records_are_an_error(tok, tmp_path):
    with pytest.raises(DataError, match="cannot tell the record format"):
        detect_format(["question", "response"], DataSource(source="x"), data_spec(), "w")
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "add 1 + 1 =", "response": "2"}])
    with pytest.raises(DataError) as info:
        build(data_spec(train=[{"source": str(path)}]), tok, seed=0, max_len=64)
    message = str(info.value)
    assert message.startswith("spec.data.train[0]: cannot tell the record format")
    assert "question" in message and "response" in message
