"""End to end on a local Ray: every adapter type trains a tiny model and writes loadable outputs.

Each run is a real `TorchTrainer` with TRL's SFTTrainer inside; Ray is started
once for the module and shared by the runs.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir(tmp_path, tiny_model, tiny_train, cache_dir) -> Path:
    (tmp_path / "model").symlink_to(tiny_model)
    (tmp_path / "train.jsonl").symlink_to(tiny_train)
    return tmp_path


def run_job(workdir: Path, doc: dict, **opts):
    from posttrain.api.load import parse_job
    from posttrain.jobs import driver

    job = parse_job(doc, require_available=True)
    options = driver.RunOptions(output=str(workdir / "out"), base_dir=workdir, **opts)
    return driver.run(job, options)


def metric_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


ADAPTERS = {
    # type: (adapter spec, learning rate, extra spec)
    "none": ({"type": "none"}, 3e-3, {"model": {"source": "model", "gradientCheckpointing": True}}),
    "lora": ({"type": "lora", "r": 8, "alpha": 16}, 1e-2, {"roles": {"trainer": {"replicas": 2}}}),
    "qlora": ({"type": "qlora", "r": 8, "alpha": 16}, 1e-2, {}),
    "dora": ({"type": "dora", "r": 8, "alpha": 16, "targetModules": ["q_proj", "v_proj", "up_proj"]}, 1e-2, {}),
    "rslora": ({"type": "rslora", "r": 8, "alpha": 8}, 1e-2, {}),
    "prefix": ({"type": "prefix", "numVirtualTokens": 8}, 5e-2, {}),
    "prompt": ({"type": "prompt", "numVirtualTokens": 8}, 5e-2, {"training": {"epochs": 1}}),
}


@pytest.mark.parametrize("adapter_type", list(ADAPTERS))
def test_each_adapter_trains_and_writes_a_loadable_result(adapter_type, workdir, job_dict, ray_local):
    adapter, lr, extra = ADAPTERS[adapter_type]
    spec = job_dict["spec"]
    spec["adapter"] = adapter
    spec["training"].update({"learningRate": lr, "maxSteps": 6})
    for key, value in extra.items():
        if key == "training":
            spec["training"].pop("maxSteps")
            spec["training"].update(value)
        else:
            spec[key] = value
    summary = run_job(workdir, job_dict)

    out = workdir / "out"
    assert summary["status"] == "succeeded"
    lines = metric_lines(out)
    losses = [m["loss"] for m in lines if "loss" in m]
    assert [m["step"] for m in lines] == list(range(1, summary["steps"] + 1))
    assert summary["steps"] == summary["total_steps"] >= 4
    assert losses[-1] < losses[0], f"{adapter_type}: loss did not go down: {losses}"
    assert summary["first_loss"] == losses[0] and summary["last_loss"] == losses[-1]
    assert summary["tokens_per_second"] > 0 and summary["train_tokens"] > 0
    assert summary["versions"]["torch"] and summary["versions"]["trl"]

    kind = "model" if adapter_type == "none" else "adapter"
    assert summary["artifact"]["kind"] == kind
    written = out / kind
    assert json.loads((written / "posttrain.json").read_text())["kind"] == kind
    assert not (written / "training_args.bin").exists()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(written)
    if kind == "model":
        net = AutoModelForCausalLM.from_pretrained(written)
    else:
        import peft

        net = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "model"), written)
        assert net.peft_config["default"].peft_type.value.lower().startswith(
            {"qlora": "lora", "dora": "lora", "rslora": "lora"}.get(adapter_type, adapter_type)
        )
    ids = tok("add 2 + 3 =", return_tensors="pt")
    with torch.no_grad():
        logits = net(**ids).logits
    assert torch.isfinite(logits).all()


def test_merged_lora_gives_the_same_logits_as_base_plus_adapter(workdir, job_dict, ray_local):
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = job_dict["spec"]
    spec["adapter"] = {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0}
    spec["output"] = {"mergeAdapter": True}
    spec["training"]["learningRate"] = 5e-2  # move the weights well away from the base
    summary = run_job(workdir, job_dict)
    out = workdir / "out"
    assert summary["artifact"]["kind"] == "merged-model"
    assert Path(summary["artifact"]["adapter_path"]) == out / "adapter"

    tok = AutoTokenizer.from_pretrained(out / "model")
    ids = tok(["add 4 + 5 = the answer is 9", "add 1 + 1 ="], return_tensors="pt", padding=True)
    base = AutoModelForCausalLM.from_pretrained(workdir / "model")
    with torch.no_grad():
        base_logits = base(**ids).logits
        composed = peft.PeftModel.from_pretrained(base, out / "adapter").eval()(**ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()(**ids).logits
    assert not torch.allclose(base_logits, composed, atol=1e-3), "the adapter changed nothing"
    torch.testing.assert_close(merged, composed, atol=1e-4, rtol=1e-4)


def test_progress_and_metrics_are_served_while_running(workdir, job_dict, ray_local):
    seen: dict = {}

    def probe(state, event):
        if event["type"] == "log" and "loss" in event and "progress" not in seen:
            port = seen["port"]
            seen["progress"] = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress").read())
            seen["metrics"] = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()

    # Port 0 picks a free port; find it through the server the driver starts.
    from posttrain.jobs.run import progress

    original = progress.ProgressServer.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen["port"] = self.port

    progress.ProgressServer.__init__ = remember
    try:
        job_dict["spec"]["adapter"] = {"type": "lora"}
        run_job(workdir, job_dict, metrics_port=0, metrics_host="127.0.0.1", on_event=probe)
    finally:
        progress.ProgressServer.__init__ = original

    body = seen["progress"]
    assert body["phase"] == "training"
    assert body["step"] >= 1 and body["totalSteps"] == 4
    assert body["loss"] > 0 and body["tokensPerSecond"] > 0
    text = seen["metrics"]
    for name in ("posttrain_step", "posttrain_total_steps", "posttrain_loss", "posttrain_tokens_per_second",
                 'posttrain_phase{algorithm="sft",job="tiny-sft",phase="training"} 1.0'):
        assert name in text
    assert all(line.startswith(("#", "posttrain_")) for line in text.splitlines() if line)


def test_a_finished_output_is_refused_then_replaced_with_overwrite(workdir, job_dict, ray_local):
    from posttrain.jobs.run.outputs import OutputInUse

    job_dict["spec"]["adapter"] = {"type": "lora"}
    job_dict["spec"]["training"]["maxSteps"] = 2
    run_job(workdir, job_dict)
    out = workdir / "out"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputInUse, match="finished run"):
        run_job(workdir, job_dict)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    summary = run_job(workdir, job_dict, overwrite=True)
    assert summary["status"] == "succeeded" and summary["resumed_from_step"] is None
