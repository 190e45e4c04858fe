"""dpo, kto and reward end to end on a local Ray with a tiny random Llama, through the driver.

Each run is a real TorchTrainer with TRL's DPOTrainer / KTOTrainer / RewardTrainer inside, on the
same worker path as SFT. The data prefers the right sum in one wording over a wrong one in another
(`tiny.pair_records`), which a tiny model learns in a few steps.

    .venv/bin/python -m pytest tests/test_preference_e2e.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tiny
from posttrain.api.load import parse_job
from posttrain.jobs import driver
from support import jobs

pytestmark = pytest.mark.slow

TRAINING = {"maxSteps": 8, "learningRate": 0.02, "globalBatchSize": 8, "microBatchSize": 4, "maxSeqLength": 64}
BAD = [
    {"prompt": "add 1 + 1 =", "chosen": " the answer is 2"},  # no rejected
    {"prompt": "add 2 + 2 =", "chosen": " the answer is 4", "rejected": " the answer is 4"},  # identical
    {"prompt": "add 3 + 3 =", "chosen": "  ", "rejected": " so value 5 then"},  # empty chosen
]


@pytest.fixture
def workdir(tmp_path, tiny_model, cache_dir) -> Path:
    (tmp_path / "model").symlink_to(tiny_model)
    tiny.write_jsonl(tmp_path / "pairs.jsonl", tiny.pair_records(48)[:1] + BAD + tiny.pair_records(48)[1:])
    tiny.write_jsonl(tmp_path / "kto.jsonl", tiny.unpaired_records(24))
    return tmp_path


def run(workdir: Path, algorithm: str, *, source: str = "pairs.jsonl", progress: list | None = None, **spec) -> dict:
    """Run a job on the tiny model; `progress` collects GET /progress's body after every event."""
    spec.setdefault("training", dict(TRAINING))
    doc = jobs.document(algorithm, name=f"tiny-{algorithm}", data={"train": [{"source": source}], "evalFraction": 0.25},
                        **spec)
    out = workdir / f"out-{algorithm}"
    on_event = (lambda state, event: progress.append(state.progress())) if progress is not None else None
    return driver.run(parse_job(doc, require_available=True),
                      driver.RunOptions(output=str(out), base_dir=workdir, on_event=on_event))


def lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dpo_lora_learns_the_preference_and_reports_it(workdir, ray_local):
    progress: list[dict] = []
    summary = run(workdir, "dpo", adapter=jobs.LORA, preference={"lossType": ["sigmoid"], "beta": 0.5},
                  progress=progress)
    assert summary["status"] == "succeeded" and summary["steps"] == 8
    # the bad records are counted by reason and left out: 48 good of 51
    assert summary["data"]["bad"] == {"identical": 1, "missing_chosen": 1, "missing_rejected": 1}
    assert summary["data"]["train_examples"] + summary["data"]["eval_examples"] == 48
    metrics = lines(workdir / "out-dpo")
    assert [m["step"] for m in metrics] == list(range(1, 9))
    for m in metrics:
        assert {"loss", "rewards_chosen", "rewards_rejected", "rewards_margin", "rewards_accuracy"} <= set(m)
    assert metrics[-1]["eval_rewards_accuracy"] == summary["eval_rewards_accuracy_after"]
    # before training the policy is its reference: every implicit reward is 0
    assert summary["eval_rewards_margin_before"] == 0.0 and summary["eval_loss_before"] == pytest.approx(0.6931, abs=1e-3)
    assert summary["eval_rewards_margin_after"] > 0.5 and summary["eval_rewards_accuracy_after"] >= 0.9
    assert summary["artifact"]["kind"] == "adapter"
    # what /progress (and so the CR status) says at the end: the last step and the last evaluation
    assert progress[-1]["preference"] == {"rewardsChosen": metrics[-1]["rewards_chosen"],
                                          "rewardsRejected": metrics[-1]["rewards_rejected"],
                                          "rewardsMargin": metrics[-1]["rewards_margin"],
                                          "rewardsAccuracy": metrics[-1]["rewards_accuracy"],
                                          "evalRewardsMargin": summary["eval_rewards_margin_after"],
                                          "evalRewardsAccuracy": summary["eval_rewards_accuracy_after"]}


def test_dpo_full_fine_tuning_with_a_weighted_hinge_and_sft_loss(workdir, ray_local):
    summary = run(workdir, "dpo", adapter=jobs.FULL,
                  training={**TRAINING, "learningRate": 2e-3},
                  preference={"lossType": ["hinge", "sft"], "lossWeights": [1.0, 0.1], "beta": 0.5})
    assert summary["status"] == "succeeded"
    # the reference is a frozen copy: before training the margin is exactly 0, after it has moved
    assert summary["eval_rewards_margin_before"] == 0.0
    assert summary["eval_rewards_margin_after"] > 0.2 and summary["eval_rewards_accuracy_after"] >= 0.9
    assert summary["artifact"]["kind"] == "model"
    assert json.loads((workdir / "out-dpo" / "model" / "posttrain.json").read_text())["kind"] == "model"


def test_kto_learns_from_labelled_completions(workdir, ray_local):
    summary = run(workdir, "kto", source="kto.jsonl", adapter=jobs.LORA, preference={"beta": 0.5})
    assert summary["status"] == "succeeded" and "bad" not in summary["data"]
    metrics = lines(workdir / "out-kto")
    assert all({"loss", "rewards_margin", "kl"} <= set(m) for m in metrics)
    assert summary["eval_rewards_margin_before"] == 0.0 and summary["eval_rewards_margin_after"] > 0.5
    assert summary["artifact"]["kind"] == "adapter"


def test_reward_model_output_scores_as_a_grpo_reward(workdir, ray_local):
    from posttrain.jobs.rewards.scorers import RewardModel

    summary = run(workdir, "reward", adapter=jobs.LORA, training={**TRAINING, "maxSteps": 12, "learningRate": 0.01})
    assert summary["status"] == "succeeded"
    before, after = summary["eval_rewards_accuracy_before"], summary["eval_rewards_accuracy_after"]
    assert after == 1.0 and after > before
    assert summary["eval_rewards_margin_after"] > 1.0
    # always a whole model (merged), in the folder a grpo/ppo job's rewards: [{model: ...}] names
    assert summary["artifact"]["kind"] == "merged-model"
    folder = workdir / "out-reward" / "model"
    assert summary["artifact"]["path"] == str(folder)
    # how the pairs were tokenized (text: EOS appended), which the scorer repeats
    assert json.loads((folder / "posttrain.json").read_text())["reward_input"] == {"chat": False, "eos": True}
    scorer = RewardModel(folder)
    assert scorer.eos and not scorer.chat
    pairs = tiny.pair_records(16, seed=5)  # pairs the model never saw
    prompts = [p["prompt"] for p in pairs]
    chosen, rejected = scorer(prompts, [p["chosen"] for p in pairs]), scorer(prompts, [p["rejected"] for p in pairs])
    assert all(c > r for c, r in zip(chosen, rejected)), list(zip(chosen, rejected))
