"""Two jobs that feed each other on a local Ray: `posttrain run a.yaml b.yaml` trains a LoRA adapter
(job a), then fully fine-tunes job b on `model.source: ptj://sft-a`, which loads as a's adapter merged
into a's base. Running the same command again reuses both finished outputs.

    .venv/bin/python -m pytest tests/test_pipeline_e2e.py -q      # two tiny SFT runs
"""

from __future__ import annotations

import json

import pytest
import yaml

from posttrain.jobs import cli
from support import jobs

pytestmark = pytest.mark.slow


def test_b_trains_on_the_adapter_a_wrote_then_a_rerun_reuses_both(workdir, ray_local, capsys):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    training = {**jobs.SFT_SPEC["training"], "maxSteps": 2}
    a = jobs.document("sft", name="sft-a", adapter=jobs.LORA, training=training)
    b = jobs.document("sft", name="sft-b", model={"source": "ptj://sft-a"}, training=training)
    (workdir / "b.yaml").write_text(yaml.safe_dump(b))
    (workdir / "a.yaml").write_text(yaml.safe_dump(a))
    out = workdir / "out"
    argv = ["run", str(workdir / "b.yaml"), str(workdir / "a.yaml"), "--output", str(out)]

    assert cli.main(argv) == 0
    adapter = out / "sft-a" / "adapter"
    assert json.loads((adapter / "posttrain.json").read_text()) == {"kind": "adapter",
                                                                    "base_model": str((workdir / "model").resolve())}
    run_b = json.loads((out / "sft-b" / "run.json").read_text())
    assert run_b["spec"]["model"]["source"] == str(adapter)  # what ran: the reference resolved
    assert (out / "sft-b" / "model" / "config.json").exists()
    assert json.loads((out / "sft-b" / "summary.json").read_text())["status"] == "succeeded"

    # b started from a's adapter merged into a's base (materialized once into the cache), not from the base.
    from posttrain.jobs.models import materialize
    from posttrain.api.spec import ModelSpec

    merged_folder = materialize(ModelSpec(source=str(adapter)))
    ids = torch.tensor([[5, 17, 42, 9]])
    merged = AutoModelForCausalLM.from_pretrained(merged_folder).eval()
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "model"), str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(workdir / "model").eval()
    with torch.no_grad():
        got, want, plain = (m(ids).logits for m in (merged, expected, base))
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)

    capsys.readouterr()
    assert cli.main(argv) == 0  # the same command again: both outputs hold finished runs of the same specs
    err = capsys.readouterr().err
    assert "[sft-a] already finished in" in err and "[sft-b] already finished in" in err


def test_a_set_prefixed_with_a_job_name_applies_to_that_job_only(tmp_path):
    """`--set JOB:path=value` sets one job of a pipeline (a teacher and its student want other model sources);
    a name no job has is an error naming --set, and a plain path still sets every job."""
    from posttrain.api.load import InvalidJob
    from posttrain.jobs import pipeline

    a = jobs.document("sft", name="sft-a", adapter=jobs.LORA)
    b = jobs.document("sft", name="sft-b", model={"source": "ptj://sft-a"})
    for name, doc in (("a.yaml", a), ("b.yaml", b)):
        (tmp_path / name).write_text(yaml.safe_dump(doc))
    files = [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]
    entries = pipeline.load(files, ["sft-a:model.source=s3://bucket/base", "training.maxSteps=3",
                                    "sft-b:training.learningRate=0.5"])
    spec = {e.job.metadata.name: e.job.spec for e in entries}
    assert spec["sft-a"].model.source == "s3://bucket/base" and spec["sft-b"].model.source == "ptj://sft-a"
    assert spec["sft-a"].training.max_steps == spec["sft-b"].training.max_steps == 3
    assert spec["sft-b"].training.learning_rate == 0.5 != spec["sft-a"].training.learning_rate
    with pytest.raises(InvalidJob, match="--set: sft-c: names no job of"):
        pipeline.load(files, ["sft-c:training.maxSteps=3"])
