"""Preference learning without Ray: spec.preference rules, preference data, every adapter under DPO/KTO, metrics.

    .venv/bin/python -m pytest tests/test_preference.py -q
"""

from __future__ import annotations

import json
import math

import pytest

import tiny
from posttrain.api.load import InvalidJob, parse_job
from posttrain.api.spec import DataSpec
from posttrain.jobs.cli import main as cli_main
from posttrain.jobs.data import DataError
from posttrain.jobs.preference_data import build_preference
from support import jobs


def refusal(**spec) -> tuple[str, str]:
    with pytest.raises(InvalidJob) as info:
        parse_job(jobs.document(spec.pop("algorithm", "dpo"), **spec))
    [err] = info.value.errors
    return err.path, err.message


@pytest.mark.parametrize("spec,path,text", [
    ({"preference": {"lossType": ["sigmoidd"]}}, "spec.preference.lossType[0]", "not a dpo loss"),
    ({"algorithm": "kto", "preference": {"lossType": ["sigmoid"]}}, "spec.preference.lossType[0]", "kto, apo_zero_unpaired"),
    ({"algorithm": "kto", "preference": {"lossType": ["kto", "apo_zero_unpaired"]}}, "spec.preference.lossType",
     "one loss"),
    ({"preference": {"lossType": ["sigmoid", "ipo"], "lossWeights": [1.0]}}, "spec.preference.lossWeights", "one weight"),
    ({"algorithm": "kto", "preference": {"labelSmoothing": 0.1}}, "spec.preference.labelSmoothing", "applies to dpo"),
    ({"algorithm": "reward", "preference": {"beta": 0.2}}, "spec.preference.beta", "not reward"),
    ({"algorithm": "sft", "preference": {"beta": 0.2}}, "spec.preference", "remove it for sft"),
    # a reward model is written whole; virtual-token adapters cannot be merged into one
    ({"algorithm": "reward", "adapter": {"type": "prefix"}}, "spec.adapter.type", "use none, lora"),
    ({"algorithm": "simpo", "adapter": {"type": "prompt"}}, "spec.adapter.type", "does not work with prompt tuning"),
    ({"algorithm": "orpo", "preference": {"simpoGamma": 1.0}}, "spec.preference.simpoGamma", "applies to simpo"),
    ({"algorithm": "kto", "training": {"maxSteps": 2, "globalBatchSize": 8, "microBatchSize": 1}},
     "spec.training.microBatchSize", "2 or more"),
    ({"preference": {"lossType": ["exo_pair"]}}, "spec.preference.labelSmoothing", "above 0"),
    ({"data": {"train": [{"source": "a.jsonl"}, {"source": "b.jsonl", "format": "messages"}]}},
     "spec.data.train[1].format", "reads {prompt, chosen, rejected} records"),
    ({"adapter": {"type": "lora", "targetModules": ["q_proj", "lm_head"]}}, "spec.adapter.targetModules",
     "remove lm_head"),
])
def test_preference_settings_are_checked_naming_the_field(spec, path, text):
    got_path, message = refusal(**spec)
    assert got_path == path and text in message, (got_path, message)


def test_preference_settings_reach_the_trl_config():
    from posttrain.jobs.algorithms.methods import METHODS

    job = parse_job(jobs.document("dpo", preference={"lossType": ["sigmoid", "sft"], "lossWeights": [1.0, 0.2],
                                                     "beta": 0.3, "precomputeRefLogProbs": True}))
    assert METHODS["dpo"].options(job.spec) == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.2],
                                                "beta": 0.3, "label_smoothing": 0.0, "precompute_ref_log_probs": True}
    simpo = parse_job(jobs.document("simpo", preference={"beta": 2.0, "simpoGamma": 1.0}))
    assert METHODS["simpo"].options(simpo.spec) == {"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 1.0,
                                                    "cpo_alpha": 0.0}
    kto = parse_job(jobs.document("kto", preference={"desirableWeight": 2.0}))
    assert METHODS["kto"].options(kto.spec)["loss_type"] == "kto"
    assert METHODS["kto"].options(kto.spec)["desirable_weight"] == 2.0


def data_spec(source, **fields) -> DataSpec:
    return DataSpec.model_validate({"train": [{"source": str(source)}], **fields})


def test_chat_records_and_renamed_fields(tmp_path):
    chat = [{"prompt": [{"role": "user", "content": f"add {i} + 1 ="}], "good": f" {i + 1}", "bad": f" {i + 2}",
             "score": 0.5} for i in range(6)]
    path = tiny.write_jsonl(tmp_path / "chat.jsonl", chat)
    train, evaluation, stats = build_preference(
        data_spec(path, chosenField="good", rejectedField="bad", marginField="score"), algorithm="reward", seed=0)
    assert evaluation is None and stats.train_examples == 6 and not stats.bad
    row = train[0]
    assert set(row) == {"prompt", "chosen", "rejected", "margin"}  # TRL's names, whatever the files call them
    assert row["chosen"][0]["role"] == "assistant" and row["margin"] == 0.5  # a string answer to a chat: a turn


def test_unpaired_records_and_bad_labels(tmp_path):
    records = tiny.unpaired_records(4) + [{"prompt": "p", "completion": "c", "label": "maybe"}]
    path = tiny.write_jsonl(tmp_path / "kto.jsonl", [dict(r, label=str(r["label"]).lower()) for r in records])
    train, _, stats = build_preference(data_spec(path), algorithm="kto", seed=0)
    assert stats.train_examples == 8 and stats.bad == {"bad_label": 1}
    assert sorted(train["label"]) == [False] * 4 + [True] * 4


@pytest.mark.parametrize("records,text", [
    # a wrong field name shows on the first record: refused, not counted
    ([{"prompt": "p", "chosen": "a", "reject": "b"}] * 3, "no 'rejected' field (spec.data.rejectedField)"),
    ([{"prompt": "p", "chosen": "a", "rejected": None}, {"prompt": "p", "chosen": "a", "rejected": "b"}],
     "record 0 has no 'rejected' field (spec.data.rejectedField)"),
    ([{"prompt": "p", "chosen": "a", "rejected": "a"}] * 3, "every record is unusable ({'identical': 3})"),
])
def test_unusable_sets_are_errors_naming_the_field(tmp_path, records, text):
    path = tiny.write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(DataError) as info:
        build_preference(data_spec(path), algorithm="dpo", seed=0)
    assert str(info.value).startswith("spec.data.train[0]") and text in str(info.value), str(info.value)


def test_a_set_of_bad_records_fails_the_run_before_anything_is_written(tmp_path, tiny_model, capsys):
    (tmp_path / "model").symlink_to(tiny_model)
    tiny.write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 4)
    doc = jobs.document("dpo", data={"train": [{"source": "pairs.jsonl"}]})
    (tmp_path / "job.yaml").write_text(json.dumps(doc))
    rc = cli_main(["run", str(tmp_path / "job.yaml"), "--output", str(tmp_path / "out")])
    assert rc == 2
    assert "spec.data.train[0]: every record is unusable" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.fixture
def one_process_group(monkeypatch):
    """A torch.distributed group of one (gloo), as a single Ray Train worker has; undone afterwards."""
    import socket

    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("algorithm,adapter", [
    ("dpo", {"type": "qlora", "r": 4}),
    ("dpo", {"type": "dora", "r": 4, "targetModules": ["q_proj", "v_proj"]}),
    ("dpo", {"type": "prefix", "numVirtualTokens": 4}),
    ("kto", {"type": "prompt", "numVirtualTokens": 4}),
    ("reward", {"type": "rslora", "r": 4}),
    ("orpo", {"type": "prefix", "numVirtualTokens": 4}),
    ("simpo", {"type": "lora", "r": 4}),
])
def test_each_adapter_takes_a_step_with_the_preference_trainers(algorithm, adapter, tmp_path, tiny_model,
                                                                one_process_group):
    """What a worker builds (`build_trainer`), one step on this process: every adapter SFT has runs here too."""
    from posttrain.jobs.algorithms.sft_worker import build_trainer
    from posttrain.jobs.models import load_tokenizer

    records = tiny.unpaired_records(8) if algorithm == "kto" else tiny.pair_records(8)
    path = tiny.write_jsonl(tmp_path / "data.jsonl", records)
    job = parse_job(jobs.document(algorithm, model={"source": str(tiny_model)}, adapter=adapter,
                                  data={"train": [{"source": str(path)}]},
                                  training={"maxSteps": 1, "globalBatchSize": 4, "microBatchSize": 4}))
    train, _, _ = build_preference(job.spec.data, algorithm=algorithm, seed=0)
    cfg = {"train": train, "eval": None, "checkpoint_local": str(tmp_path / "ckpt")}
    trainer = build_trainer(job.spec, cfg, str(tiny_model), load_tokenizer(str(tiny_model)), world=1, callbacks=[])
    result = trainer.train()
    assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)
    assert type(trainer).__name__ == {"dpo": "DPOTrainer", "kto": "KTOTrainer", "reward": "RewardTrainer",
                                      "orpo": "ORPOTrainer", "simpo": "CPOTrainer"}[algorithm]


def test_a_single_worker_trains_as_one_plain_process(tmp_path, tiny_model, one_process_group):
    """Ray Train's group of one is closed: no DistributedDataParallel, no gloo gathers per logged metric."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType
    from torch.nn.parallel import DistributedDataParallel

    from posttrain.jobs.algorithms.sft_worker import build_trainer, leave_group_of_one
    from posttrain.jobs.models import load_tokenizer

    path = tiny.write_jsonl(tmp_path / "data.jsonl", tiny.pair_records(8))
    job = parse_job(jobs.document("dpo", model={"source": str(tiny_model)}, adapter={"type": "lora", "r": 4},
                                  data={"train": [{"source": str(path)}]},
                                  training={"maxSteps": 1, "globalBatchSize": 4, "microBatchSize": 4}))
    train, _, _ = build_preference(job.spec.data, algorithm="dpo", seed=0)
    leave_group_of_one(2)  # a real group is left alone
    assert dist.is_initialized()
    leave_group_of_one(1)
    assert not dist.is_initialized()
    cfg = {"train": train, "eval": None, "checkpoint_local": str(tmp_path / "ckpt")}
    trainer = build_trainer(job.spec, cfg, str(tiny_model), load_tokenizer(str(tiny_model)), world=1, callbacks=[])
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.accelerator.distributed_type is DistributedType.NO
    assert not isinstance(trainer.model_wrapped, DistributedDataParallel)


class _Tracker:
    """Stands in for the tracker actor: records each batch `extend.remote` sends."""

    def __init__(self):
        self.batches: list[list[dict]] = []
        self.extend = self
        self.push = None  # one Ray call per event is what the callback must not make

    def remote(self, events):
        self.batches.append(list(events))


def test_step_logs_reach_the_driver_in_batches_and_in_order(tmp_path):
    from posttrain.jobs.algorithms.sft_worker import _callback_class
    from posttrain.jobs.run import storage
    from posttrain.jobs.run.checkpoints import Checkpoints

    tracker = _Tracker()
    ckpts = Checkpoints(storage.resolve(str(tmp_path)))
    report = _callback_class()(tracker, 0, ckpts, 1, flush_seconds=3600)
    for step in (1, 2, 3):
        report.push({"type": "log", "step": step, "loss": 1.0 / step})
    assert tracker.batches == []                                    # short steps wait for the next batch
    report.push({"type": "checkpoint", "step": 3, "path": "x"})     # anything else sends them first, in order
    assert [[e["type"] for e in b] for b in tracker.batches] == [["log", "log", "log", "checkpoint"]]
    report.push({"type": "log", "step": 4, "loss": 0.2})
    report.on_train_end(None, None, None)
    assert tracker.batches[-1] == [{"type": "log", "step": 4, "loss": 0.2}]
    report.on_train_end(None, None, None)                           # nothing pending: no empty batch
    assert len(tracker.batches) == 2
    every = _callback_class()(tracker, 0, ckpts, 1, flush_seconds=0)
    every.push({"type": "log", "step": 5})                          # a slow step is sent at once
    assert tracker.batches[-1] == [{"type": "log", "step": 5}]
    other_rank = _callback_class()(tracker, 1, ckpts, 1, flush_seconds=0)
    other_rank.push({"type": "log", "step": 6})
    assert len(tracker.batches) == 3


def test_preference_metrics_reach_progress_and_prometheus():
    from prometheus_client import generate_latest

    from posttrain.jobs.run.progress import Metrics, RunState

    state = RunState(job="j", algorithm="dpo")
    state.preference.update(rewards_margin=0.25, rewards_accuracy=0.75, eval_rewards_accuracy=1.0)
    assert state.progress()["preference"] == {"rewardsMargin": 0.25, "rewardsAccuracy": 0.75,
                                              "evalRewardsAccuracy": 1.0}
    text = generate_latest(Metrics(state).registry).decode()
    assert 'posttrain_rewards_accuracy{algorithm="dpo",job="j"} 0.75' in text
    assert 'posttrain_eval_rewards_accuracy{algorithm="dpo",job="j"} 1.0' in text


def test_the_run_summary_table_shows_preference_accuracy_and_margin_when_measured():
    from posttrain.jobs.cli import summary_table

    dpo = summary_table({"status": "succeeded", "algorithm": "dpo", "eval_loss_before": 0.69, "eval_loss_after": 0.5,
                         "eval_rewards_accuracy_before": 0.0, "eval_rewards_accuracy_after": 0.9,
                         "eval_rewards_margin_before": 0.0, "eval_rewards_margin_after": 1.2})
    assert "eval preference accuracy before -> after  0.0000 -> 0.9000" in dpo
    assert "eval reward margin before -> after        0.0000 -> 1.2000" in dpo
    assert "preference" not in summary_table({"status": "succeeded", "algorithm": "sft", "eval_loss_before": 0.6})
