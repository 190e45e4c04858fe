"""GRPO and PPO end to end on a tiny random model: real Ray actors, real rewards, real learners.

    pytest -m slow tests/test_rl_e2e.py

The task is learnable from scratch: the reward is the fraction of digit characters in the
completion (`rl_rewards.py:digits`). A random model starts near 0.12; a few steps of GRPO or
PPO raise it clearly. Runs share one local Ray (module fixture); the kill-and-resume test
starts `posttrain run` as its own process and SIGKILLs it after a checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

import tiny
from support import jobs

ray = pytest.importorskip("ray")
pytest.importorskip("torch")

from posttrain.jobs import driver  # noqa: E402
from posttrain.jobs.rl.workers.sharded import free_port  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl-e2e")
    tiny.make_model(root / "model")
    tiny.write_jsonl(root / "train.jsonl", tiny.arith_records(64))
    jobs.copy_rewards(root)
    return root


def grpo_job(**spec: object) -> dict:
    """The tests' GRPO job on the tiny model, rewarded by `rl_rewards.py:digits`; top-level sections replaced."""
    algorithm = str(spec.pop("algorithm", "grpo"))
    return jobs.document(algorithm, name="tiny-rl", **{"rewards": [{"function": "rl_rewards.py:digits"}], **spec})


run = jobs.run_local


def metrics(root: Path, out: str) -> list[dict]:
    return [json.loads(line) for line in (root / out / "metrics.jsonl").read_text().splitlines()]


def rises(lines: list[dict], margin: float = 0.1) -> tuple[float, float]:
    rewards = [m["reward_mean"] for m in lines]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + margin, f"reward did not rise: {rewards}"
    return first, last


REQUIRED = ("step", "reward_mean", "reward_std", "reward_digits", "kl", "loss", "entropy", "clip_fraction",
            "grad_norm", "response_length_mean", "tokens_per_second", "time_generate", "time_reward",
            "time_train", "time_sync")


def test_grpo_full_finetuning_raises_reward_with_separate_actors(workdir, ray_local):
    port = free_port()
    seen: dict[str, str] = {}

    def scrape(state, event):  # while the run is live: what Prometheus and the operator would read
        if event["type"] == "log" and event["step"] == 2:
            seen["metrics"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            seen["progress"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5).read().decode()

    summary = run(grpo_job(), workdir, "grpo-full", metrics_port=port, metrics_host="127.0.0.1", on_event=scrape)
    lines = metrics(workdir, "grpo-full")
    assert [m["step"] for m in lines] == list(range(1, 11))
    for key in REQUIRED:
        assert all(m.get(key) is not None for m in lines), key
    first, last = rises(lines)
    assert summary["reward_first_steps_mean"] == pytest.approx(first, abs=1e-3)
    roles = summary["roles"]
    assert roles["rollout"]["engine"] == "transformers" and roles["learner"]["strategy"] == "fsdp2"
    assert roles["reward"]["rewards"] == ["digits"]
    processes = [set(roles[r]["processes"]) for r in ("rollout", "reward", "learner")]
    assert all(p for p in processes) and not (processes[0] & processes[1] or processes[0] & processes[2]
                                              or processes[1] & processes[2])
    assert (workdir / "grpo-full" / "model" / "config.json").exists()
    assert 'posttrain_reward_mean{algorithm="grpo",job="tiny-rl"}' in seen["metrics"]
    assert 'posttrain_phase_seconds{algorithm="grpo",job="tiny-rl",phase="sync"}' in seen["metrics"]
    assert 'posttrain_reward_function_mean{algorithm="grpo",function="digits",job="tiny-rl"}' in seen["metrics"]
    progress = json.loads(seen["progress"])
    assert progress["step"] == 2 and progress["reward"] == pytest.approx(lines[1]["reward_mean"], abs=1e-5)
    assert progress["rl"]["time_sync"] >= 0 and progress["rewardFunctions"]["digits"] >= 0


def test_grpo_lora_colocated_two_learners(workdir, ray_local):
    # a random model's logits hardly move through its inner layers: adapt lm_head too
    doc = grpo_job(adapter={"type": "lora", "r": 8, "alpha": 32, "dropout": 0.0,
                            "targetModules": ["lm_head", "q_proj", "v_proj", "up_proj", "down_proj"]},
                   placement="colocated", roles={"rollout": {"engine": "transformers"}, "learner": {"replicas": 2}})
    doc["spec"]["training"]["learningRate"] = 0.05
    summary = run(doc, workdir, "grpo-lora")
    rises(metrics(workdir, "grpo-lora"), margin=0.05)
    roles = summary["roles"]
    assert roles["learner"]["actors"] == 2 and roles["rollout"]["actors"] == 2
    assert roles["rollout"]["placement"] == "colocated with learner"
    # one local node: auto syncs through shared memory on CPU; the transformers engine cannot serve a LoRA
    # adapter, so loraServing auto sends the merged modules
    assert roles["weight_sync"] == {"method": "shared_memory", "transport": "shared_memory", "adapter_only": True,
                                    "lora_serving": "merged"}
    assert (workdir / "grpo-lora" / "adapter" / "adapter_config.json").exists()
    # Its base, named so that a later job can load the adapter (ptj://grpo-lora merges it into that base).
    provenance = json.loads((workdir / "grpo-lora" / "adapter" / "posttrain.json").read_text())
    assert provenance == {"kind": "adapter", "base_model": str((workdir / "model").resolve())}


def test_ppo_raises_reward_with_a_critic(workdir, ray_local):
    doc = grpo_job(algorithm="ppo")
    doc["spec"]["rl"].update({"ppoEpochs": 2, "criticLearningRate": 0.01, "weightSync": "nccl"})
    summary = run(doc, workdir, "ppo")
    lines = metrics(workdir, "ppo")
    rises(lines)
    assert all("value_loss" in m for m in lines)
    assert summary["roles"]["critic"]["actors"] == 1
    # asked for nccl on CPU: the same bucketed broadcast, and the summary says which transport really ran
    assert summary["roles"]["weight_sync"] == {"method": "nccl", "transport": "gloo", "adapter_only": False,
                                               "lora_serving": None}


def test_async_rollouts_are_one_step_stale_and_still_learn(workdir, ray_local):
    doc = grpo_job()
    doc["spec"]["rl"].update({"async": True, "rolloutCorrection": "tis"})
    run(doc, workdir, "grpo-async")
    lines = metrics(workdir, "grpo-async")
    assert [m["staleness"] for m in lines] == [0] + [1] * 9
    rises(lines, margin=0.05)
    # truncated importance sampling against the engines' logprobs: step 1 is on-policy (the same weights in
    # the transformers engine, so only float noise), later steps sample with the previous step's weights
    gaps = [m["rollout_logprob_gap"] for m in lines]
    assert gaps[0] < 1e-3 and min(gaps[1:]) > gaps[0], gaps
    assert all(0 <= m["rollout_corrected_fraction"] <= 1 and m["rollout_ratio_mean"] > 0 for m in lines)


def test_killed_after_a_checkpoint_resumes_with_the_same_metrics(workdir, ray_local):
    doc = grpo_job(checkpoint={"everySteps": 2})
    doc["spec"]["training"].update(maxSteps=5, lrScheduler="linear", warmupRatio=0.2)  # schedule state resumes too
    run(doc, workdir, "uninterrupted")
    expected = metrics(workdir, "uninterrupted")
    assert [m["learning_rate"] for m in expected] == pytest.approx([0.0, 0.02, 0.015, 0.01, 0.005])

    spec_file = workdir / "resume.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    out = workdir / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.jobs.cli", "run", str(spec_file), "--output", str(out)],
                            cwd=workdir, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "checkpoints" / "checkpoint-2" / ".posttrain-complete"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the first run never wrote checkpoint-2"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()

    summary = run(doc, workdir, "killed")
    assert summary["resumed_from_step"] in (2, 4)
    resumed = metrics(workdir, "killed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for a, b in zip(expected, resumed):
        for key in ("reward_mean", "loss", "grad_norm", "entropy", "response_length_mean", "learning_rate"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_a_reward_that_raises_fails_the_step_naming_it_and_keeps_checkpoints(workdir, ray_local):
    (workdir / "FAIL_AT").write_text("3")
    (workdir / "calls.txt").unlink(missing_ok=True)
    doc = grpo_job(rewards=[{"function": "rl_rewards.py:flaky"}], checkpoint={"everySteps": 2})
    doc["spec"]["training"]["maxSteps"] = 4
    with pytest.raises(driver.RunFailed, match=r"reward 'flaky': raised RuntimeError: verifier crashed"):
        run(doc, workdir, "flaky")
    summary = json.loads((workdir / "flaky" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 2
    assert (workdir / "flaky" / "checkpoints" / "checkpoint-2" / ".posttrain-complete").exists()
    (workdir / "FAIL_AT").unlink()
    summary = run(doc, workdir, "flaky")  # the same command again resumes
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 4


@pytest.mark.parametrize("function, match", [
    ("nan_reward", r"reward 'nan_reward': returned nan at index 0"),
    ("short_reward", r"reward 'short_reward': returned 31 values for 32 samples"),
])
def test_bad_reward_values_name_the_function(workdir, ray_local, function, match):
    doc = grpo_job(rewards=[{"function": f"rl_rewards.py:{function}"}])
    doc["spec"]["training"]["maxSteps"] = 1
    with pytest.raises(driver.RunFailed, match=match):
        run(doc, workdir, f"bad-{function}")


def test_on_error_skip_counts_skipped_samples(workdir, ray_local):
    doc = grpo_job(rewards=[{"function": "rl_rewards.py:nan_reward", "onError": "skip"}])
    doc["spec"]["training"]["maxSteps"] = 2
    run(doc, workdir, "skip")
    assert [m["reward_skipped"] for m in metrics(workdir, "skip")] == [1, 1]


def test_unreachable_verifier_retries_then_fails_keeping_checkpoints(workdir, ray_local):
    port = free_port()  # nothing listens there
    doc = grpo_job(rewards=[{"url": f"http://127.0.0.1:{port}/verify", "retries": 2, "timeoutSeconds": 1}])
    doc["spec"]["training"]["maxSteps"] = 1
    with pytest.raises(driver.RunFailed, match=r"reward 'http_verifier'.*3 attempt"):
        run(doc, workdir, "verifier")
    assert json.loads((workdir / "verifier" / "summary.json").read_text())["status"] == "failed"


def test_a_misspelt_reward_function_fails_before_anything_is_written(workdir, ray_local):
    doc = grpo_job(rewards=[{"function": "rl_rewards.py:digitz"}])
    with pytest.raises(ValueError, match=r"spec.rewards\[0\].function: reward '.*rl_rewards.py:digitz'.* has no attribute 'digitz'"):
        run(doc, workdir, "typo")
    assert not (workdir / "typo").exists()


def _vllm_model(root: Path) -> Path:
    folder = root / "model128"
    if not folder.exists():  # vLLM's CPU attention needs a head size of at least 32
        tiny.make_model(folder, hidden=128)
    return folder


def test_grpo_with_vllm_rollouts_learns(workdir, ray_local):
    pytest.importorskip("vllm")
    _vllm_model(workdir)
    doc = grpo_job(model={"source": "model128"}, roles={"rollout": {"engine": "vllm"}})
    doc["spec"]["rl"]["rolloutCorrection"] = "mis"
    summary = run(doc, workdir, "grpo-vllm")
    assert summary["roles"]["rollout"]["engine"] == "vllm"
    lines = metrics(workdir, "grpo-vllm")
    assert all(m["sync_bytes"] > 0 for m in lines)
    rises(lines, margin=0.05)
    # vLLM's sampled-token logprobs reach the learner: close to the trainer's (same weights, other kernels)
    assert all(0 <= m["rollout_logprob_gap"] < 0.05 for m in lines), [m["rollout_logprob_gap"] for m in lines]


def test_grpo_lora_is_served_as_a_vllm_adapter(workdir, ray_local):
    """rl.loraServing adapter on vLLM: each step sends the rsLoRA adapter's tensors alone and the engines serve
    them. With a large learning rate the policy moves far each step, so the engines' logprobs agree with the
    learner's only if the adapter they sample with is the learner's newest (mis computes the gap)."""
    pytest.importorskip("vllm")
    import peft
    from transformers import AutoModelForCausalLM

    folder = _vllm_model(workdir)
    adapter = {"type": "rslora", "r": 8, "alpha": 16, "dropout": 0.0}
    doc = grpo_job(model={"source": "model128"}, adapter=adapter, roles={"rollout": {"engine": "vllm"}})
    doc["spec"]["training"].update(maxSteps=3, learningRate=0.3)
    doc["spec"]["rl"].update(rolloutCorrection="mis", loraServing="adapter")  # auto serves adapters on GPUs only
    summary = run(doc, workdir, "grpo-vllm-lora")
    assert summary["roles"]["weight_sync"]["lora_serving"] == "adapter"
    lines = metrics(workdir, "grpo-vllm-lora")
    peft_model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                                     peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True))
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert [m["sync_bytes"] for m in lines] == [adapter_bytes] * 3  # the adapter alone, fp32 on CPU
    assert all(0 <= m["rollout_logprob_gap"] < 0.05 for m in lines), [m["rollout_logprob_gap"] for m in lines]


@pytest.mark.gpu
def test_grpo_on_gpu_with_vllm_and_nccl_sync(workdir, ray_local):
    pytest.importorskip("vllm")
    import torch

    _vllm_model(workdir)
    two = torch.cuda.device_count() >= 2  # one GPU: the engine shares the learner's (colocated, sleep/wake)
    roles = {"rollout": {"engine": "vllm", "gpus": 1} if two else {"engine": "vllm"}, "learner": {"gpus": 1}}
    doc = grpo_job(model={"source": "model128"}, roles=roles, placement="disaggregated" if two else "colocated")
    summary = run(doc, workdir, "grpo-gpu")
    assert summary["roles"]["learner"]["backend"] == "nccl"
    sync = summary["roles"]["weight_sync"]  # one GPU: NCCL cannot put two ranks on it, the broadcast is Gloo's
    assert (sync["method"], sync["transport"]) == ("nccl", "nccl" if two else "gloo")
    rises(metrics(workdir, "grpo-gpu"), margin=0.05)


@pytest.mark.gpu
def test_grpo_on_one_gpu_colocated_with_a_q_v_lora_in_bf16(workdir, ray_local):
    """The GPU paths together: bf16 compute with fp32 adapter weights, a LoRA on q_proj and v_proj served as
    a vLLM adapter in bf16 (rl.loraServing auto), the engine asleep while the learner trains, its memory
    share sized at start before the learner loads."""
    pytest.importorskip("vllm")
    _vllm_model(workdir)
    doc = grpo_job(model={"source": "model128", "dtype": "auto"}, placement="colocated",
                   adapter={"type": "lora", "r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj"]},
                   roles={"rollout": {"engine": "vllm"}, "learner": {"gpus": 1}})
    summary = run(doc, workdir, "grpo-gpu-colocated")
    assert (summary["roles"]["rollout"]["engine"], summary["roles"]["rollout"]["device"]) == ("vllm", "cuda")
    assert summary["roles"]["weight_sync"]["lora_serving"] == "adapter"
    rises(metrics(workdir, "grpo-gpu-colocated"), margin=0.05)


def test_line_end_tokens_find_the_token_that_ends_each_line(workdir):
    from transformers import AutoTokenizer

    from posttrain.jobs.rl.batch import line_end_tokens

    tok = AutoTokenizer.from_pretrained(workdir / "model")
    text = "add 2 + 3\n\nthe answer\nis 5"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ends = line_end_tokens(ids, tok)
    assert len(ends) == 3 and ends[-1] == len(ids) - 1
    for end, prefix in zip(ends[:2], ["add 2 + 3\n", "add 2 + 3\n\nthe answer\n"]):
        assert tok.decode(ids[:end + 1]).startswith(prefix) and not tok.decode(ids[:end]).endswith("\n")


def test_grpo_with_process_rewards_learns(workdir, ray_local):
    doc = grpo_job(rewards=[{"function": "rl_rewards.py:digit_lines"}])
    doc["spec"]["rl"].update({"advantage": "grpo_process", "maxNewTokens": 12})
    run(doc, workdir, "grpo-process")
    lines = metrics(workdir, "grpo-process")
    assert all("reward_digit_lines" in m for m in lines)
    rises(lines, margin=0.05)
