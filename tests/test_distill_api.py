"""`spec.teacher`, `spec.distill`, `roles.teacher` and `model.keepLayers`: each field validated with its path.

    .venv/bin/python -m pytest -q tests/test_distill_api.py
"""

from __future__ import annotations

import copy

import pytest

from posttrain.api.distill import KeepEvery, keep_indices
from posttrain.api.load import InvalidJob, parse_job
from posttrain.operator.builders import roles_of
from support import jobs

TEACHER = {"source": "/models/teacher"}


def distill_doc(**spec):
    doc = jobs.document("distill", teacher=copy.deepcopy(TEACHER))
    doc["spec"].update(spec)
    return doc


def errors(doc) -> list[tuple[str, str]]:
    with pytest.raises(InvalidJob) as info:
        parse_job(doc, require_available=True)
    return [(e.path, e.message) for e in info.value.errors]


def test_a_distill_job_validates_with_defaults_and_runs_a_teacher_role():
    job = parse_job(distill_doc(model={"source": "model", "keepLayers": {"every": 2}},
                                roles={"teacher": {"replicas": 2, "gpus": 1}}), require_available=True)
    d = job.spec.distill
    assert d is None and job.spec.teacher.source == "/models/teacher"
    assert job.spec.model.keep_layers == KeepEvery(every=2)
    assert list(roles_of(job.spec)) == ["trainer", "teacher"]
    assert roles_of(job.spec)["teacher"].replicas == 2
    listed = parse_job(distill_doc(model={"source": "model", "keepLayers": [0, 3]}, distill={
        "loss": "jsd", "beta": 0.2, "temperature": 2.0, "alpha": 0.5, "topK": 5}))
    assert listed.spec.model.keep_layers == [0, 3] and listed.spec.distill.top_k == 5
    assert parse_job(listed.model_dump(by_alias=True, exclude_none=True, mode="json")).spec == listed.spec


BAD = [
    (lambda s: s.pop("teacher"), "spec.teacher", "needs a teacher model"),
    (lambda s: s.update(distill={"mode": "offline"}), "spec.distill.mode", "logits"),
    (lambda s: s.update(distill={"loss": "kl"}), "spec.distill.loss", "forward_kl"),
    (lambda s: s.update(distill={"loss": "jsd", "beta": 1.5}), "spec.distill.beta", "less than or equal to 1"),
    (lambda s: s.update(distill={"beta": 0.2}), "spec.distill.beta", "applies to loss jsd"),
    (lambda s: s.update(distill={"temperature": 0}), "spec.distill.temperature", "greater than 0"),
    (lambda s: s.update(distill={"alpha": -0.1}), "spec.distill.alpha", "greater than or equal to 0"),
    (lambda s: s.update(distill={"topK": 0}), "spec.distill.topK", "greater than or equal to 1"),
    (lambda s: s.update(distill={"topk": 3}), "spec.distill.topk", "unknown field"),
    (lambda s: s["model"].update(keepLayers=[]), "spec.model.keepLayers", "selects no layer"),
    (lambda s: s["model"].update(keepLayers=[2, 1]), "spec.model.keepLayers[1]", "ascending order"),
    (lambda s: s["model"].update(keepLayers=[-1]), "spec.model.keepLayers[0]", "start at 0"),
    (lambda s: s["model"].update(keepLayers={"every": 0}), "spec.model.keepLayers.every", "greater than or equal to 1"),
    (lambda s: s["model"].update(keepLayers={"evry": 2}), "spec.model.keepLayers.evry", "unknown field"),
    (lambda s: s["teacher"].update(keepLayers=[0]), "spec.teacher.keepLayers", "belongs on spec.model"),
    (lambda s: s["teacher"].update(source=""), "spec.teacher.source", "at least 1 character"),
    (lambda s: s["teacher"].update(source="ptj://Bad_Name"), "spec.teacher.source", "does not name a job"),
    (lambda s: s["teacher"].update(source="ptj://toy"), "spec.teacher.source", "refers to this job itself"),
    (lambda s: s.update(roles={"teacher": {"engine": "vllm"}}), "spec.roles.teacher.engine", "only roles.rollout"),
    (lambda s: s.update(adapter={"type": "prompt"}), "spec.adapter.type", "line up with the teacher"),
    (lambda s: s.update(model={"source": "model", "keepLayers": [0]}, adapter={"type": "lora"}),
     "spec.model.keepLayers", "train it in full"),
]


@pytest.mark.parametrize("change,path,text", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_distill_fields_name_their_path(change, path, text):
    doc = distill_doc()
    doc["metadata"]["name"] = "toy"
    change(doc["spec"])
    found = errors(doc)
    assert any(p == path and text in m for p, m in found), found


ON_POLICY = {"mode": "on_policy"}
ON_POLICY_BAD = [
    (dict(distill={**ON_POLICY, "alpha": 0.1}), "spec.distill.alpha", "remove alpha (or use mode logits)"),
    (dict(distill={**ON_POLICY, "cache": "pvc://c/x"}), "spec.distill.cache", "nothing is cached"),
    (dict(rl={"lossType": "dapo"}), "spec.rl.lossType", "is a policy-gradient setting"),
    (dict(rl={"kl": {"beta": 0.1}}), "spec.rl.kl", "on_policy minimises distill.loss"),
    (dict(rl={"advantage": "rloo"}), "spec.rl.advantage", "is a policy-gradient setting"),
    (dict(rl={"rolloutCorrection": "tis"}), "spec.rl.rolloutCorrection", "is a policy-gradient setting"),
    (dict(rewards=[{"function": "posttrain.jobs.rewards.builtin:exact_answer"}]), "spec.rewards",
     "learns from the teacher, not from rewards"),
    (dict(roles={"trainer": {"gpus": 1}}), "spec.roles.trainer", "size roles.learner instead"),
    (dict(roles={"reward": {"cpus": 2}}), "spec.roles.reward", "with no reward actors"),
    (dict(adapter={"type": "dora"}), "spec.adapter.type", "takes none, lora, rslora"),
    (dict(roles={"learner": {"engine": "vllm"}}), "spec.roles.learner.engine", "only roles.rollout"),
    (dict(placement="colocated", roles={"rollout": {"gpus": 1}}), "spec.roles.rollout.gpus", "size roles.learner"),
]


@pytest.mark.parametrize("spec,path,text", ON_POLICY_BAD, ids=[b[1] for b in ON_POLICY_BAD])
def test_on_policy_refuses_what_does_not_apply_with_the_field_path(spec, path, text):
    doc = distill_doc(distill=ON_POLICY)
    doc["spec"].update(copy.deepcopy(spec))
    found = errors(doc)
    assert any(p == path and text in m for p, m in found), found


def test_spec_rl_is_refused_in_logits_mode():
    found = errors(distill_doc(rl={"groupSize": 4}))
    assert ("spec.rl", "sets the student's sampling, which only distill mode on_policy does; remove rl, or set "
                       "distill.mode: on_policy") in found


def test_an_on_policy_job_runs_learner_rollout_and_teacher_and_revalidates_when_dumped():
    job = parse_job(distill_doc(model={"source": "model", "keepLayers": {"every": 2}}, distill=ON_POLICY,
                                rl={"groupSize": 4, "promptsPerStep": 2, "maxNewTokens": 16, "temperature": 0.7,
                                    "ppoEpochs": 2, "weightSync": "object_store", "async": True},
                                roles={"learner": {"gpus": 1}, "rollout": {"engine": "vllm"},
                                       "teacher": {"gpus": 1}}), require_available=True)
    assert job.spec.ray_roles() == ("learner", "rollout", "teacher") and job.spec.runs_rl_actors()
    assert list(roles_of(job.spec)) == ["learner", "rollout", "teacher"]
    # the driver reads the spec back with every default written out (the policy-gradient fields among them)
    assert parse_job(job.model_dump(by_alias=True, exclude_none=True, mode="json")).spec == job.spec
    colocated = parse_job(distill_doc(distill=ON_POLICY, placement="colocated"), require_available=True)
    assert list(roles_of(colocated.spec)) == ["learner", "teacher"]  # the engines run on the learners' pods


@pytest.mark.parametrize("algorithm,field,value", [
    ("sft", "teacher", TEACHER), ("dpo", "distill", {"loss": "jsd"}), ("sft", "roles", {"teacher": {"gpus": 1}}),
])
def test_other_algorithms_refuse_the_distill_fields(algorithm, field, value):
    doc = jobs.document(algorithm, **{field: value})
    path = "spec.roles.teacher" if field == "roles" else f"spec.{field}"
    assert any(p == path and "is for algorithm distill" in m for p, m in errors(doc))


def test_keep_layers_is_refused_where_nothing_trains_on_the_trainer():
    doc = jobs.document("grpo", model={"source": "model", "keepLayers": [0]})
    assert ("spec.model.keepLayers", "is for algorithms that train on roles.trainer, not grpo") in errors(doc)


def test_a_teacher_ptj_reference_is_a_model_reference():
    from posttrain.api import refs

    job = parse_job(distill_doc(teacher={"source": "ptj://big-sft"}))
    [ref] = refs.references(job.spec.wire())
    assert (ref.path, ref.job, ref.kind) == ("spec.teacher.source", "big-sft", "model")


def test_keep_indices_against_the_model():
    assert keep_indices(KeepEvery(every=3), 7) == [0, 3, 6]
    assert keep_indices([1, 2], 3) == [1, 2]
    with pytest.raises(ValueError, match=r"spec.model.keepLayers: layer 4 does not exist; the model has 4 decoder"):
        keep_indices([0, 4], 4)


def test_on_a_cluster_the_teacher_is_an_input_and_the_cache_shared_storage():
    from posttrain.api.cluster import cluster_errors, pvc_claims

    doc = distill_doc(model={"source": "pvc://models/student"}, teacher={"source": "pvc://teachers/big"},
                      data={"train": [{"source": "pvc://data/train.jsonl"}]}, output={"uri": "pvc://out/d"},
                      distill={"cache": "/tmp/cache"})
    job = parse_job(doc)
    assert pvc_claims(job.spec)["teachers"] == "read"
    found = [(e.path, e.message) for e in cluster_errors(job)]
    assert [p for p, _ in found] == ["spec.distill.cache"] and "not shared storage" in found[0][1]
    doc["spec"]["distill"]["cache"] = "pvc://out/teacher-cache"
    doc["spec"]["teacher"]["source"] = "teacher"
    assert [e.path for e in cluster_errors(parse_job(doc))] == ["spec.teacher.source"]  # relative: not on the pods
    assert pvc_claims(parse_job(doc).spec)["out"] == "write"


def test_the_module_examples_run():
    import doctest

    from posttrain.api import distill

    result = doctest.testmod(distill)
    assert result.attempted >= 2 and result.failed == 0
