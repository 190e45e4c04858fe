"""The API side of running on a cluster: shared storage and paths (`cluster_errors`,
`posttrain validate --cluster`), credentials through Secrets (`spec.env`), finite numbers, and
reading stored objects tolerantly (`known_fields`). No Ray, no cluster.

    .venv/bin/python -m pytest tests/test_cluster_spec.py -q
"""

from __future__ import annotations

import copy

import pytest
import yaml

from support import REPO
from support.jobs import BASE_JOB
from posttrain.api.cluster import cluster_errors, pvc_claims
from posttrain.api.load import InvalidJob, known_fields, load_job, parse_job
from posttrain.jobs.cli import main as cli_main

CLUSTER_READY = {"grpo-colocated-async", "grpo-gsm8k-gpu", "ppo-lora", "sft-dora-mixed", "sft-full",
                 "sft-gpu-nodepool", "sft-lora-cluster", "sft-qlora", "rlaif-judge-grpo", "generate-pairs",
                 "evaluate-models", "generate-instructions"}
LOCAL_ONLY = {"sft-lora", "sft-cot", "dpo-lora", "kto", "reward-model", "distill-logits", "distill-on-policy",
              "sft-bottleneck", "ppo-reward-model", "distill-docstrings"}  # relative data and output paths: `posttrain run` on one machine


def cluster_job(**spec):
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"].update({"model": {"source": "hf://org/model"}, "data": {"train": [{"source": "pvc://data/t.jsonl"}]},
                        "output": {"uri": "pvc://models/out"}})
    doc["spec"].update(copy.deepcopy(spec))
    return parse_job(doc)


def problems(**spec) -> dict[str, str]:
    return {e.path: e.message for e in cluster_errors(cluster_job(**spec))}


def test_a_job_on_shared_storage_has_no_cluster_errors():
    assert problems() == {}
    assert problems(output={"uri": "s3://bucket/out"}, checkpoint={"uri": "gs://bucket/ckpt"}) == {}
    for scheme in ("gcs://", "az://", "abfs://"):
        assert problems(output={"uri": f"{scheme}c/out"}) == {}


@pytest.mark.parametrize("output,word", [
    (None, "required on a cluster"),
    ({"uri": "posttrain-output/x"}, "is not shared storage"),
    ({"uri": "/data/out"}, "is not shared storage"),
    ({"uri": "file:///data/out"}, "is not shared storage"),
])
def test_output_must_be_set_and_shared(output, word):
    spec = {"output": output} if output else {"output": {}}
    found = problems(**spec)
    assert list(found) == ["spec.output.uri"]
    assert word in found["spec.output.uri"] and "pvc://" in found["spec.output.uri"] and "s3://" in found["spec.output.uri"]


def test_a_judge_model_is_an_input_that_must_be_reachable_from_every_pod():
    judge = {"model": "judges/local", "mode": "pairwise"}
    found = problems(algorithm="grpo", rewards=[{"judge": judge}], training={"maxSteps": 2})
    assert list(found) == ["spec.rewards[0].judge.model"]
    found = problems(algorithm="generate", generate={"judge": judge}, training={})
    assert list(found) == ["spec.generate.judge.model"]
    assert problems(algorithm="generate", generate={"judge": {**judge, "model": "pvc://judges/j"}}, training={}) == {}


def test_a_set_checkpoint_uri_must_be_shared_and_unset_is_fine():
    found = problems(checkpoint={"uri": "/tmp/ckpt"})
    assert list(found) == ["spec.checkpoint.uri"] and "<output>/checkpoints" in found["spec.checkpoint.uri"]
    assert problems(checkpoint={"everySteps": 5}) == {}


def test_relative_inputs_are_refused_with_the_fix():
    found = problems(model={"source": "models/tiny", "tokenizer": "file://tok"},
                     data={"train": [{"source": "train.jsonl"}, {"source": "/data/baked.jsonl"}],
                           "eval": {"source": "eval.jsonl"}})
    assert set(found) == {"spec.model.source", "spec.model.tokenizer", "spec.data.train[0].source",
                          "spec.data.eval.source"}
    assert "read-only spec mount" in found["spec.model.source"] and "hf://" in found["spec.model.source"]


def test_reward_files_and_models_must_not_be_relative():
    found = problems(algorithm="grpo", rewards=[
        {"function": "rewards.py:score"}, {"function": "lib/rewards.py:score"},
        {"function": "/mnt/pvc/data/rewards.py:score"}, {"function": "posttrain.jobs.rewards.builtin:exact_answer"},
        {"model": "reward-model"}])
    assert set(found) == {"spec.rewards[0].function", "spec.rewards[1].function", "spec.rewards[4].model"}
    assert "/mnt/pvc/<claim>/rewards.py:function" in found["spec.rewards[0].function"]


def test_claims_are_read_or_written():
    job = cluster_job(model={"source": "pvc://models/base"}, checkpoint={"uri": "pvc://ckpt/x"},
                      algorithm="grpo", rewards=[{"function": "/mnt/pvc/code/r.py:f"}])
    assert pvc_claims(job.spec) == {"ckpt": "write", "code": "read", "data": "read", "models": "write"}


@pytest.mark.parametrize("name", sorted(CLUSTER_READY))
def test_cluster_examples_pass_cluster_validation(name):
    assert cluster_errors(load_job(REPO / "examples" / f"{name}.yaml")) == []


def test_every_example_is_either_cluster_ready_or_local_only():
    names = {p.stem for p in (REPO / "examples").glob("*.yaml")}
    assert names == CLUSTER_READY | LOCAL_ONLY
    for name in LOCAL_ONLY:
        assert cluster_errors(load_job(REPO / "examples" / f"{name}.yaml"))


def test_cli_validate_cluster_flag(capsys):
    local = str(REPO / "examples" / "sft-lora.yaml")
    assert cli_main(["validate", local]) == 0
    capsys.readouterr()
    assert cli_main(["validate", "--cluster", local, str(REPO / "examples" / "sft-lora-cluster.yaml")]) == 1
    captured = capsys.readouterr()
    assert "sft-lora-cluster.yaml: ok" in captured.out and f"{local}: invalid" in captured.err
    assert "  - spec.output.uri: 'posttrain-output/sft-lora-chat' is not shared storage" in captured.err
    assert "  - spec.data.train[0].source: relative path 'data/chat.jsonl'" in captured.err


# --- credentials -------------------------------------------------------------------------------

def env_errors(env) -> dict[str, str]:
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"]["env"] = env
    with pytest.raises(InvalidJob) as info:
        parse_job(doc)
    return {e.path: e.message for e in info.value.errors}


@pytest.mark.parametrize("name", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "OPENAI_API_KEY",
                                  "MY_SECRET_THING", "GITHUB_TOKEN"])
def test_credentials_as_plain_values_are_refused_without_echoing_them(name):
    found = env_errors([{"name": name, "value": "s3cr3t-value-123"}])
    assert list(found) == ["spec.env[0].value"]
    assert "valueFrom" in found["spec.env[0].value"] and "secretKeyRef" in found["spec.env[0].value"]
    assert "s3cr3t" not in str(found)


def test_env_values_never_appear_in_type_errors():
    found = env_errors([{"name": "HF_TOKEN", "value": 123456789}])
    assert "123456789" not in str(found)


def test_credentials_from_secrets_and_plain_settings_are_accepted():
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"]["env"] = [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                          {"name": "WANDB_PROJECT", "value": "tuning"},
                          {"name": "TOKENIZERS_PARALLELISM", "value": "false"},
                          {"name": "REGION", "valueFrom": {"configMapKeyRef": {"name": "site", "key": "region"}}}]
    doc["spec"]["envFrom"] = [{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "site"}, "prefix": "SITE_"}]
    doc["spec"]["serviceAccountName"] = "trainer-wi"
    spec = parse_job(doc).spec
    assert [e.name for e in spec.env] == ["HF_TOKEN", "WANDB_PROJECT", "TOKENIZERS_PARALLELISM", "REGION"]
    assert spec.wire()["envFrom"][1] == {"prefix": "SITE_", "configMapRef": {"name": "site"}}


@pytest.mark.parametrize("env,path,word", [
    ([{"name": "RAY_AUTH_MODE", "value": "disabled"}], "spec.env[0].name", "reserved"),
    ([{"name": "POSTTRAIN_RUN", "value": "3"}], "spec.env[0].name", "reserved"),
    ([{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "spec.env[1].name", "set twice"),
    ([{"name": "A"}], "spec.env[0].value", "exactly one of value or valueFrom"),
    ([{"name": "A", "valueFrom": {}}], "spec.env[0].valueFrom.secretKeyRef", "exactly one"),
])
def test_bad_env_entries_name_the_field(env, path, word):
    found = env_errors(env)
    assert path in found and word in found[path], found


def test_env_from_needs_exactly_one_source():
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"]["envFrom"] = [{"secretRef": {"name": "a"}, "configMapRef": {"name": "b"}}]
    with pytest.raises(InvalidJob, match=r"spec.envFrom\[0\].secretRef: give exactly one"):
        parse_job(doc)


# --- finite numbers ------------------------------------------------------------------------------

def test_non_finite_floats_are_refused_everywhere(tmp_path):
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"]["training"]["learningRate"] = float("nan")
    doc["spec"]["algorithm"] = "grpo"
    doc["spec"]["rl"] = {"temperature": float("inf")}
    doc["spec"]["rewards"] = [{"function": "m:f", "kwargs": {"scale": float("-inf")}}]
    with pytest.raises(InvalidJob) as info:
        parse_job(doc)
    paths = {e.path: e.message for e in info.value.errors}
    assert paths["spec.training.learningRate"] == "must be a finite number (got nan)"
    assert paths["spec.rl.temperature"] == "must be a finite number (got inf)"
    assert paths["spec.rewards[0].kwargs.scale"] == "must be a finite number (got -inf)"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE_JOB).replace("learningRate: 0.01", "learningRate: .nan"))
    with pytest.raises(InvalidJob, match="spec.training.learningRate: must be a finite number"):
        load_job(path)


# --- reading stored objects ----------------------------------------------------------------------

def test_known_fields_drops_and_reports_what_this_version_does_not_know():
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"]["training"]["newKnob"] = 3
    doc["spec"]["data"]["train"][0]["shuffleBuffer"] = 10
    doc["spec"]["futureFeature"] = {"enabled": True}
    doc["spec"]["roles"] = {"trainer": {"replicas": 1, "affinity": {"anything": {"goes": 1}}}}
    clean, dropped = known_fields(doc)
    assert dropped == ["spec.data.train[0].shuffleBuffer", "spec.training.newKnob", "spec.futureFeature"]
    assert clean["spec"]["roles"]["trainer"]["affinity"] == {"anything": {"goes": 1}}, "free-form fields stay"
    assert parse_job(clean).spec.training.max_steps == 4
    with pytest.raises(InvalidJob):
        parse_job(doc)  # a file a person wrote stays strict


@pytest.mark.parametrize("folder, order, cluster", [
    ("rlhf", ["rlhf-sft", "rlhf-reward", "rlhf-ppo"], True),
    ("rlaif", ["rlaif-pairs", "rlaif-dpo"], True),
    ("distill-cot", ["cot-traces", "cot-student"], False),  # local first: data that make_data.py writes
    ("distill-compress", ["distill-counting-half", "distill-counting-on-policy"], False),  # make demo's output
])
def test_pipeline_examples_are_a_valid_set_in_dependency_order(folder, order, cluster):
    from posttrain.api import refs
    from posttrain.jobs import pipeline

    files = sorted(str(p) for p in (REPO / "examples" / folder).glob("*.yaml"))
    entries = pipeline.load(files, [])  # valid one by one and as a set: every ptj:// names a job here
    specs = {e.job.metadata.name: e.job.spec.wire() for e in entries}
    assert refs.order(sorted(specs), refs.graph(specs)) == order
    if cluster:
        assert all(cluster_errors(e.job) == [] for e in entries)
        assert cli_main(["validate", "--cluster", *files]) == 0
    else:
        assert cli_main(["validate", *files]) == 0
