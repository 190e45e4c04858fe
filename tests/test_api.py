"""Unit tests of the PostTrainingJob API: examples, validation errors and their field paths,
`--set` overrides, the `posttrain validate` CLI, and field documentation. No Ray, no torch.

    .venv/bin/python -m pytest tests/test_api.py -q
"""

from __future__ import annotations

import re
import copy
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from support import REPO
from support.jobs import BASE_JOB
from posttrain.api.load import InvalidJob, apply_overrides, load_job, parse_job
from posttrain.api.spec import AVAILABLE_ALGORITHMS, AdapterType, PostTrainingJob, PostTrainingJobSpec
from posttrain.jobs.cli import main as cli_main

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
POSTTRAIN = Path(sys.executable).parent / "posttrain"


def _job(**spec_updates) -> dict:
    doc = copy.deepcopy(BASE_JOB)
    doc["spec"].update(spec_updates)
    return doc


def _errors(doc) -> list[tuple[str, str]]:
    with pytest.raises(InvalidJob) as info:
        parse_job(doc)
    return [(e.path, e.message) for e in info.value.errors]


# --- valid documents -------------------------------------------------------------------------


def test_examples_exist():
    names = {p.name for p in EXAMPLES}
    assert {"sft-lora.yaml", "sft-qlora.yaml", "sft-full.yaml", "sft-cot.yaml", "sft-dora-mixed.yaml",
            "sft-gpu-nodepool.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_valid_and_runnable(path: Path):
    text = path.read_text()
    assert text.startswith("#"), "every example starts with a header comment"
    job = load_job(path)  # require_available=True: examples must be runnable in this version
    assert job.spec.algorithm.value in AVAILABLE_ALGORITHMS
    assert job.metadata.name == yaml.safe_load(text)["metadata"]["name"]
    # Round trip: what the model writes back reads as the same job.
    again = PostTrainingJob.model_validate({**yaml.safe_load(text), "spec": job.spec.wire()})
    assert again.spec == job.spec


def test_examples_cover_what_they_claim():
    jobs = {p.stem: load_job(p) for p in EXAMPLES}
    assert jobs["sft-lora"].spec.adapter.type is AdapterType.lora
    assert jobs["sft-lora"].spec.data.train[0].format == "messages"
    assert jobs["sft-qlora"].spec.adapter.type is AdapterType.qlora
    full = jobs["sft-full"].spec
    assert full.adapter.type is AdapterType.none and full.roles.trainer.replicas == 2
    cot = jobs["sft-cot"].spec
    assert cot.data.train[0].format == "cot" and "{answer}" in cot.data.cot_template
    assert cot.data.cot_template != type(cot.data).model_fields["cot_template"].default
    mixed = jobs["sft-dora-mixed"].spec
    assert mixed.adapter.type is AdapterType.dora and len(mixed.data.train) == 2
    assert all(s.max_samples for s in mixed.data.train) and mixed.data.eval_fraction > 0
    assert {s.weight for s in mixed.data.train} == {1.0, 2.0}
    gpu = jobs["sft-gpu-nodepool"].spec
    assert gpu.roles.trainer.gpus > 0 and gpu.roles.trainer.node_selector and gpu.roles.trainer.tolerations
    assert gpu.model.source.startswith("hf://")
    assert gpu.checkpoint.uri.startswith("pvc://") and gpu.output.uri.startswith("pvc://")
    grpo = jobs["grpo-gsm8k-gpu"].spec
    assert grpo.roles.rollout.engine == "vllm" and grpo.roles.rollout.gpus and grpo.roles.learner.gpus
    assert grpo.rl.loss_type == "dapo" and grpo.rl.kl.beta > 0 and len(grpo.rewards) == 2
    ppo = jobs["ppo-lora"].spec
    assert ppo.algorithm.value == "ppo" and ppo.adapter.type is AdapterType.lora and ppo.rewards[0].url
    bneck = jobs["sft-bottleneck"].spec.adapter
    assert (bneck.type, bneck.reduction_factor, bneck.placement) == (AdapterType.bottleneck, 16, "houlsby")
    colocated = jobs["grpo-colocated-async"].spec
    assert colocated.placement == "colocated" and colocated.rl.async_ and colocated.rl.advantage == "dr_grpo"


def test_defaults_fill_in():
    spec = parse_job(_job()).spec
    assert spec.adapter.type is AdapterType.none
    assert spec.roles.trainer.replicas == 1 and spec.roles.rollout is None
    assert spec.data.completion_only_loss is True
    assert spec.gradient_accumulation_steps() == 2  # 8 / (4 x 1)


def test_snake_case_names_are_accepted_too():
    doc = _job()
    doc["spec"]["training"] = {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2}
    assert parse_job(doc).spec.training.max_steps == 3


# --- invalid documents: one table, exact field paths ----------------------------------------


def _set(path: str, value):
    """A mutation of BASE_JOB: set a dotted path (relative to the document) to `value`."""
    def mutate(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    return mutate


def _drop(path: str):
    def mutate(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        del node[last]
    return mutate


BAD = [
    # (id, mutation, expected path, a word the message must contain)
    ("unknown-root", _set("color", "blue"), "color", "unknown field"),
    ("unknown-spec", _set("spec.lerningRate", 1e-4), "spec.lerningRate", "unknown field"),
    ("unknown-in-list", _set("spec.data.train.0.wieght", 2), "spec.data.train[0].wieght", "unknown field"),
    ("unknown-deep", _set("spec.roles", {"trainer": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}}),
     "spec.roles.trainer.tolerations[0].efect", "unknown field"),
    ("wrong-type-int", _set("spec.training.maxSteps", "ten"), "spec.training.maxSteps", "integer"),
    ("wrong-type-list", _set("spec.data.train", "train.jsonl"), "spec.data.train", "list"),
    ("wrong-type-bool", _set("spec.suspend", "maybe"), "spec.suspend", "boolean"),
    ("r-zero", _set("spec.adapter", {"type": "lora", "r": 0}), "spec.adapter.r", "greater than 0"),
    ("alpha-zero", _set("spec.adapter", {"type": "lora", "alpha": 0}), "spec.adapter.alpha", "greater than 0"),
    ("dropout-one", _set("spec.adapter", {"type": "lora", "dropout": 1.0}), "spec.adapter.dropout", "less than 1"),
    ("adapter-type", _set("spec.adapter", {"type": "lorax"}), "spec.adapter.type", "'qlora'"),
    ("algorithm", _set("spec.algorithm", "rlhf"), "spec.algorithm", "'grpo'"),
    ("target-modules-prefix", _set("spec.adapter", {"type": "prefix", "targetModules": ["q_proj"]}),
     "spec.adapter.targetModules", "prefix"),
    ("target-modules-prompt", _set("spec.adapter", {"type": "prompt", "targetModules": ["v_proj"]}),
     "spec.adapter.targetModules", "prompt"),
    ("target-modules-empty", _set("spec.adapter", {"type": "lora", "targetModules": []}),
     "spec.adapter.targetModules", "empty"),
    ("no-steps-or-epochs", _drop("spec.training.maxSteps"), "spec.training.maxSteps", "epochs"),
    ("batch-not-multiple", _set("spec.training.globalBatchSize", 6), "spec.training.globalBatchSize", "4 x 1 = 4"),
    ("batch-not-multiple-replicas", _set("spec.roles", {"trainer": {"replicas": 3}}),
     "spec.training.globalBatchSize", "4 x 3 = 12"),
    ("merge-without-adapter", _set("spec.output", {"mergeAdapter": True}), "spec.output.mergeAdapter",
     "needs an adapter"),
    ("rollout-on-sft", _set("spec.roles", {"rollout": {"replicas": 2}}), "spec.roles.rollout", "grpo and ppo"),
    ("bad-memory", _set("spec.roles", {"trainer": {"memory": "32GB"}}), "spec.roles.trainer.memory", "pattern"),
    ("negative-gpus", _set("spec.roles", {"trainer": {"gpus": -1}}), "spec.roles.trainer.gpus", "greater than or equal"),
    ("node-selector-value", _set("spec.roles", {"trainer": {"nodeSelector": {"pool": 1}}}),
     "spec.roles.trainer.nodeSelector.pool", "string"),
    ("bad-name", _set("metadata.name", "My_Job"), "metadata.name", "pattern"),
    ("eval-and-fraction", _set("spec.data", {"train": [{"source": "t.jsonl"}], "eval": {"source": "e.jsonl"},
                                             "evalFraction": 0.1}), "spec.data.evalFraction", "not both"),
    ("eval-fraction-half", _set("spec.data.evalFraction", 0.5), "spec.data.evalFraction", "less than 0.5"),
    ("cot-without-answer", _set("spec.data.cotTemplate", "{reasoning} so there"), "spec.data.cotTemplate",
     "{answer}"),
    ("cot-extra-placeholder", _set("spec.data.cotTemplate", "{reasoning} {answer} {foo}"), "spec.data.cotTemplate",
     "unknown placeholders ['foo']"),
    ("empty-train", _set("spec.data.train", []), "spec.data.train", "at least 1"),
    ("weight-zero", _set("spec.data.train.0.weight", 0), "spec.data.train[0].weight", "greater than 0"),
    ("data-format", _set("spec.data.train.0.format", "chat"), "spec.data.train[0].format", "'messages'"),
    ("missing-model", _drop("spec.model"), "spec.model", "required"),
    ("toleration-operator", _set("spec.roles", {"trainer": {"tolerations": [{"operator": "Maybe"}]}}),
     "spec.roles.trainer.tolerations[0].operator", "'Exists'"),
    ("api-version", _set("apiVersion", "v1"), "apiVersion", "posttrain.dev/v1alpha1"),
]


@pytest.mark.parametrize(("mutate", "path", "word"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_spec_is_rejected_with_its_path(mutate, path, word):
    doc = copy.deepcopy(BASE_JOB)
    mutate(doc)
    errors = _errors(doc)
    assert [p for p, _ in errors] == [path], errors
    assert word in errors[0][1], errors


def test_merge_adapter_needs_a_lora_family_adapter():
    doc = _job(adapter={"type": "prefix"}, output={"mergeAdapter": True})
    assert _errors(doc) == [("spec.output.mergeAdapter", "works for lora, qlora, dora and rslora, not prefix")]
    assert parse_job(_job(adapter={"type": "dora"}, output={"mergeAdapter": True})).spec.output.merge_adapter


def test_every_error_is_reported_at_once():
    doc = _job(adapter={"type": "lora", "r": -1})
    doc["metadata"]["name"] = "X"
    doc["spec"]["training"]["maxSteps"] = 0
    paths = {p for p, _ in _errors(doc)}
    assert paths == {"metadata.name", "spec.adapter.r", "spec.training.maxSteps"}


def test_invalid_job_message_names_the_source():
    with pytest.raises(InvalidJob) as info:
        parse_job(_job(suspend="maybe"), source="job.yaml")
    assert info.value.source == "job.yaml"
    assert str(info.value).startswith("job.yaml: spec.suspend: ")


def test_a_document_that_is_not_a_mapping():
    with pytest.raises(InvalidJob) as info:
        parse_job(["not", "a", "job"])
    assert info.value.errors[0].path == ""
    assert "mapping" in info.value.errors[0].message


# --- algorithms not shipped in this version --------------------------------------------------


REWARDS = [{"function": "posttrain.jobs.rewards.builtin:exact_answer"}]


def test_unavailable_algorithms_validate_as_models_but_are_refused(unshipped):
    algorithm = unshipped
    doc = _job(algorithm=algorithm, teacher={"source": "/models/tiny"})
    assert parse_job(doc).spec.algorithm.value == algorithm
    with pytest.raises(InvalidJob) as info:
        parse_job(doc, require_available=True)
    [err] = info.value.errors
    assert err.path == "spec.algorithm"
    assert "not available" in err.message and "sft" in err.message


def test_rl_roles_are_accepted_for_grpo():
    spec = parse_job(_job(algorithm="grpo", rewards=REWARDS, roles={"rollout": {"replicas": 2, "gpus": 1}})).spec
    assert spec.roles.rollout.replicas == 2


def test_rl_sections_round_trip_with_their_wire_names():
    doc = _job(algorithm="grpo", rewards=REWARDS + [{"url": "http://verifier:8000/score", "weight": 0.5,
                                                     "onError": "skip"}],
               rl={"groupSize": 4, "lossType": "dapo", "clipHigh": 0.28, "async": True, "kl": {"beta": 0.04}},
               roles={"rollout": {"engine": "vllm"}, "learner": {"strategy": "fsdp2"}}, placement="colocated")
    spec = parse_job(doc).spec
    assert (spec.rl.group_size, spec.rl.loss_type, spec.rl.async_, spec.rl.kl.beta) == (4, "dapo", True, 0.04)
    assert [r.source() for r in spec.rewards] == ["function", "url"]
    wire = spec.wire()
    assert wire["rl"]["async"] is True and wire["rewards"][1]["onError"] == "skip"
    assert parse_job({**doc, "spec": wire}).spec == spec


@pytest.mark.parametrize("changes,path,text", [
    ({"algorithm": "grpo"}, "spec.rewards", "at least one reward"),
    ({"rewards": REWARDS}, "spec.rewards", "are for grpo and ppo"),
    ({"rl": {"groupSize": 4}}, "spec.rl", "is for grpo and ppo"),
    ({"algorithm": "grpo", "rewards": [{"function": "exact_answer"}]}, "spec.rewards[0].function", "module:function"),
    ({"algorithm": "grpo", "rewards": [{"function": "m:f", "url": "http://x"}]}, "spec.rewards[0].function",
     "exactly one of function, model, url or judge"),
    ({"algorithm": "grpo", "rewards": [{"url": "verifier:8000"}]}, "spec.rewards[0].url", "http://"),
    ({"algorithm": "grpo", "rewards": REWARDS, "rl": {"groupSize": 1}}, "spec.rl.groupSize", "greater than or equal to 2"),
    ({"algorithm": "grpo", "rewards": REWARDS, "rl": {"advantage": "gae"}}, "spec.rl.advantage", "needs a critic"),
    ({"algorithm": "ppo", "rewards": REWARDS, "rl": {"advantage": "rloo"}}, "spec.rl.advantage", "ppo uses gae"),
    ({"algorithm": "grpo", "rewards": REWARDS, "rl": {"rolloutCorrectionCap": 3.0}}, "spec.rl.rolloutCorrectionCap",
     "set rolloutCorrection"),
    ({"algorithm": "grpo", "rewards": REWARDS, "rl": {"rolloutCorrection": "tis", "rolloutCorrectionCap": 1.0}},
     "spec.rl.rolloutCorrectionCap", "greater than 1"),
    ({"algorithm": "grpo", "rewards": REWARDS, "roles": {"learner": {"engine": "vllm"}}}, "spec.roles.learner.engine",
     "only roles.rollout"),
    ({"algorithm": "grpo", "rewards": REWARDS, "roles": {"rollout": {"strategy": "fsdp2"}}},
     "spec.roles.rollout.strategy", "only roles.learner"),
    ({"algorithm": "grpo", "rewards": REWARDS, "placement": "colocated", "roles": {"rollout": {"replicas": 2}}},
     "spec.roles.rollout.replicas", "size roles.learner"),
    ({"algorithm": "grpo", "rewards": REWARDS, "roles": {"learner": {"strategy": "ddp"}}},
     "spec.roles.learner.strategy", "fsdp2"),
    ({"algorithm": "grpo", "rewards": REWARDS, "rl": {"loraServing": "adapter"}}, "spec.rl.loraServing",
     "adapter.type is none"),
    ({"algorithm": "grpo", "rewards": REWARDS, "rl": {"loraServing": "adapter"}, "adapter": {"type": "lora"},
      "roles": {"rollout": {"engine": "transformers"}}}, "spec.rl.loraServing", "needs the vLLM engine"),
    ({"algorithm": "grpo", "rewards": REWARDS, "rl": {"loraServing": "always"}}, "spec.rl.loraServing", "'merged'"),
])
def test_bad_rl_sections_name_the_field(changes, path, text):
    [(got_path, message)] = _errors(_job(**changes))
    assert got_path == path and text in message


def test_lora_serving_defaults_to_auto_and_takes_adapter_for_lora_on_vllm():
    job = parse_job(_job(algorithm="grpo", rewards=REWARDS, adapter={"type": "rslora"}, rl={"loraServing": "adapter"},
                         roles={"rollout": {"engine": "vllm"}}))
    assert job.spec.rl.lora_serving == "adapter"
    from posttrain.api.rl import RLSpec

    assert RLSpec().lora_serving == "auto"


# --- --set overrides --------------------------------------------------------------------------


def test_apply_overrides_paths_and_values():
    doc = copy.deepcopy(BASE_JOB)
    out = apply_overrides(doc, [
        "training.maxSteps=5",
        "spec.training.learningRate=3.0e-5",
        "metadata.name=renamed",
        "data.train[0].weight=2.5",
        "data.train[1].source=more.jsonl",
        "adapter.targetModules=[q_proj, v_proj]",
        "suspend=true",
        "image=",
    ])
    assert out is doc
    spec = out["spec"]
    assert spec["training"]["maxSteps"] == 5
    assert spec["training"]["learningRate"] == 3e-5
    assert out["metadata"]["name"] == "renamed"
    assert spec["data"]["train"] == [{"source": "train.jsonl", "weight": 2.5}, {"source": "more.jsonl"}]
    assert spec["adapter"] == {"targetModules": ["q_proj", "v_proj"]}
    assert spec["suspend"] is True
    assert spec["image"] == ""


def test_apply_overrides_nested_list_indexes_append_at_the_end():
    out = apply_overrides({}, ["x[0]=1", "x[1]=2", "x[0]=3", "y[0][0]=a", "y[0][1]=b"])
    assert out["spec"]["x"] == [3, 2]
    assert out["spec"]["y"] == [["a", "b"]]


@pytest.mark.timeout(10)
def test_apply_overrides_refuses_an_index_beyond_the_end_without_allocating_it():
    doc = copy.deepcopy(BASE_JOB)
    with pytest.raises(InvalidJob) as info:
        apply_overrides(doc, ["data.train[100000000].source=x.jsonl"])
    [err] = info.value.errors
    assert err.path == "data.train[100000000].source"
    assert "beyond the end: the list has 1 item(s)" in err.message and "append with [1]" in err.message
    assert len(doc["spec"]["data"]["train"]) == 1, "nothing was appended"
    with pytest.raises(InvalidJob, match=r"the list is empty; append with \[0\]"):
        apply_overrides({}, ["rewards[3].function=m:f"])


@pytest.mark.parametrize(("item", "path", "word"), [
    ("training.maxSteps", "training.maxSteps", "path=value"),
    ("data.train[x].weight=1", "data.train[x].weight", "numbers"),
    ("data.train[-1].weight=1", "data.train[-1].weight", "numbers"),
    ("=5", "", "empty"),
    ("training.maxSteps.limit=1", "training.maxSteps.limit", "int 4, not a mapping"),
    ("data.train.weight=2", "data.train.weight", "a list, not a mapping"),
    ("training[0]=1", "training[0]", "a mapping, not a list"),
])
def test_apply_overrides_errors(item, path, word):
    doc = copy.deepcopy(BASE_JOB)
    with pytest.raises(InvalidJob) as info:
        apply_overrides(doc, [item])
    [err] = info.value.errors
    assert err.path == path
    assert word in err.message


def test_load_job_applies_overrides_then_validates(tmp_path, unshipped):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE_JOB))
    assert load_job(path).spec.training.max_steps == 4
    job = load_job(path, ["training.maxSteps=5", "adapter.type=lora", "adapter.r=4", "training.learningRate=3e-5"])
    assert job.spec.training.max_steps == 5
    assert job.spec.training.learning_rate == 3e-5  # YAML 1.1 reads "3e-5" as a string; validation makes it a float
    assert (job.spec.adapter.type, job.spec.adapter.r) == (AdapterType.lora, 4)
    with pytest.raises(InvalidJob) as info:
        load_job(path, ["training.maxSteps=0"])
    assert info.value.source == str(path)
    assert [e.path for e in info.value.errors] == ["spec.training.maxSteps"]
    with pytest.raises(InvalidJob) as info:
        load_job(path, ["algorithm=distill", "teacher.source=/models/tiny"])
    assert "not available" in info.value.errors[0].message


def test_load_job_file_errors(tmp_path):
    with pytest.raises(InvalidJob, match="no such file"):
        load_job(tmp_path / "missing.yaml")
    two = tmp_path / "two.yaml"
    two.write_text(yaml.safe_dump(BASE_JOB) + "---\n" + yaml.safe_dump(BASE_JOB))
    with pytest.raises(InvalidJob, match="found 2 documents"):
        load_job(two)
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    with pytest.raises(InvalidJob, match="not valid YAML"):
        load_job(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(InvalidJob, match="no YAML document"):
        load_job(empty)


# --- posttrain validate ----------------------------------------------------------------------


@pytest.fixture
def bad_file(tmp_path) -> Path:
    doc = _job(adapter={"type": "lora", "r": 0, "dropot": 0.1})
    doc["metadata"]["name"] = "Bad_Name"
    doc["spec"]["training"]["maxSteps"] = "many"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


BAD_FILE_PATHS = ["metadata.name", "spec.adapter.r", "spec.adapter.dropot", "spec.training.maxSteps"]


def test_cli_validate_good_files(capsys):
    assert cli_main(["validate", *map(str, EXAMPLES)]) == 0
    out = capsys.readouterr().out
    for path in EXAMPLES:
        assert re.search(rf"{re.escape(str(path))}: ok \(({'|'.join(AVAILABLE_ALGORITHMS)}), ", out)


def test_cli_validate_lists_every_error(bad_file, capsys):
    assert cli_main(["validate", str(EXAMPLES[0]), str(bad_file)]) == 1
    captured = capsys.readouterr()
    assert f"{EXAMPLES[0]}: ok" in captured.out
    assert f"{bad_file}: invalid" in captured.err
    listed = [line for line in captured.err.splitlines() if line.startswith("  - ")]
    assert sorted(line[4:].split(":")[0] for line in listed) == sorted(BAD_FILE_PATHS)


def test_cli_validate_refuses_unavailable_algorithm(tmp_path, capsys, unshipped):
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(_job(algorithm="distill", teacher={"source": "/models/tiny"})))
    assert cli_main(["validate", str(path)]) == 1
    assert "spec.algorithm: distill is not available" in capsys.readouterr().err


def test_cli_validate_multi_document_file(tmp_path, capsys):
    path = tmp_path / "both.yaml"
    bad = _job(suspend="maybe")
    path.write_text(yaml.safe_dump(BASE_JOB) + "---\n" + yaml.safe_dump(bad))
    assert cli_main(["validate", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"{path}[0]: ok" in captured.out
    assert f"{path}[1]: invalid" in captured.err and "spec.suspend" in captured.err


def test_cli_validate_subprocess(bad_file):
    good = subprocess.run([str(POSTTRAIN), "validate", *map(str, EXAMPLES)], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert good.returncode == 0, good.stderr
    assert len(re.findall(rf": ok \((?:{'|'.join(AVAILABLE_ALGORITHMS)}), ", good.stdout)) == len(EXAMPLES)
    bad = subprocess.run([str(POSTTRAIN), "validate", str(bad_file)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    for path in BAD_FILE_PATHS:
        assert f"  - {path}: " in bad.stderr, bad.stderr


# --- documentation ---------------------------------------------------------------------------


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_every_spec_field_has_a_description():
    seen: set[type] = set()
    undocumented: list[str] = []

    def walk(model: type[BaseModel], where: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            if not (field.description or "").strip():
                undocumented.append(f"{where}.{name}")
            for sub in _models_in(field.annotation):
                walk(sub, f"{where}.{name}")

    walk(PostTrainingJobSpec, "spec")
    assert undocumented == []
    # The walk really went down: spec, model, adapter, data, source, training, roles, role, toleration, ...
    assert len(seen) >= 10
