"""`ptj://<job>` references without Ray: the API's checks, resolution, and `posttrain validate` / `run`
refusing a set of jobs before anything runs (a reference to nothing, a cycle, a duplicate name), the
jobs that need a failed job not being run, and adapter folders loading as models (merged into their
base; the last test loads the tiny model, no Ray).

    .venv/bin/python -m pytest tests/test_refs.py -q
"""

from __future__ import annotations

import copy

import pytest
import yaml

from posttrain.api import refs
from posttrain.api.load import InvalidJob, parse_job
from posttrain.jobs import cli
from support import jobs


def doc(name, **spec):
    return jobs.document("sft", name=name, **spec)


def errors(d):
    with pytest.raises(InvalidJob) as exc:
        parse_job(d)
    return [str(e) for e in exc.value.errors]


def test_every_field_that_takes_a_model_or_data_accepts_a_reference():
    d = jobs.document("grpo", name="ppo-c", model={"source": "ptj://sft-a", "tokenizer": "ptj://sft-a/model"},
                      data={"train": [{"source": "x.jsonl"}, {"source": "ptj://gen/pairs.jsonl"}],
                            "eval": {"source": "ptj://gen"}},
                      rewards=[{"model": "ptj://rm-b"}, {"function": "m:f"}])
    found = [(r.path, r.job, r.subpath, r.kind) for r in refs.references(parse_job(d).spec.wire())]
    assert found == [("spec.model.source", "sft-a", "", "model"), ("spec.model.tokenizer", "sft-a", "model", "model"),
                     ("spec.data.train[1].source", "gen", "pairs.jsonl", "data"),
                     ("spec.data.eval.source", "gen", "", "data"), ("spec.rewards[0].model", "rm-b", "", "model")]


@pytest.mark.parametrize("value, says", [
    ("ptj://Sft_A", "does not name a job"),
    ("ptj://", "does not name a job"),
    ("ptj://" + "a" * 64, "at most 63"),
    ("ptj://a/../secrets", "plain relative path"),
    ("ptj://a//x", "plain relative path"),
])
def test_a_malformed_reference_is_an_error_naming_the_field(value, says):
    found = errors(doc("b", data={"train": [{"source": "x.jsonl"}, {"source": value}]}))
    assert len(found) == 1 and found[0].startswith("spec.data.train[1].source: ") and says in found[0]


def test_a_job_cannot_refer_to_itself():
    assert errors(doc("b", model={"source": "ptj://b"})) == [
        "spec.model.source: 'ptj://b' refers to this job itself (b); a job cannot use its own output"]


def test_a_model_reference_resolves_to_what_the_job_published():
    ref = refs.references({"model": {"source": "ptj://a"}})[0]
    assert refs.target(ref, output="pvc://m/a/", dependency={"adapter": {"type": "none"}}) == "pvc://m/a/model"
    assert refs.target(ref, output="s3://b/a", dependency={"adapter": {"type": "lora"}}) == "s3://b/a/adapter"
    merged = {"adapter": {"type": "lora"}, "output": {"mergeAdapter": True}}
    assert refs.target(ref, output="/o/a", dependency=merged) == "/o/a/model"
    data = refs.references({"data": {"train": [{"source": "ptj://g"}]}})[0]
    assert refs.target(data, output="/o/g", dependency={}) == "/o/g/data/train.jsonl"
    sub = refs.references({"rewards": [{"model": "ptj://rm/checkpoints/checkpoint-4"}]})[0]
    assert refs.target(sub, output="/o/rm", dependency={}) == "/o/rm/checkpoints/checkpoint-4"


def test_resolution_rewrites_a_copy_and_the_references_can_be_put_back():
    spec = parse_job(doc("b", model={"source": "ptj://a"})).spec.wire()
    before = copy.deepcopy(spec)
    resolved = refs.resolve(spec, {"spec.model.source": "pvc://m/a/model"})
    assert spec == before and resolved["model"]["source"] == "pvc://m/a/model"
    assert refs.keep_references(resolved, spec) == spec


def test_order_and_cycles():
    edges = {"c": {"a", "b"}, "b": {"a"}, "a": set(), "d": set()}
    assert refs.order(["c", "d", "b", "a"], edges) == ["d", "a", "b", "c"]
    assert refs.find_cycle(edges) is None
    assert refs.find_cycle({"a": {"b"}, "b": {"a"}, "x": set()}) == ["a", "b", "a"]


# --- the command line ------------------------------------------------------------------------------

def write(path, *docs):
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def test_validate_checks_the_references_among_the_files_given(tmp_path, capsys):
    a = write(tmp_path / "a.yaml", doc("a"))
    b = write(tmp_path / "b.yaml", doc("b", model={"source": "ptj://a"}))
    c = write(tmp_path / "c.yaml", doc("c", model={"source": "ptj://nothing"}))
    assert cli.main(["validate", a, b]) == 0
    assert cli.main(["validate", b]) == 1
    assert "spec.model.source: ptj://a names job 'a', which is not among the jobs given" in capsys.readouterr().err
    # On a cluster the job may already exist in the namespace.
    cluster = [write(tmp_path / "bc.yaml", jobs.cluster_document("bc", model={"source": "ptj://a"}))]
    assert cli.main(["validate", "--cluster", *cluster]) == 0
    assert cli.main(["validate", a, b, c]) == 1
    assert "ptj://nothing" in capsys.readouterr().err


def test_run_refuses_a_reference_to_nothing_and_a_cycle_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    both = write(tmp_path / "pipe.yaml", doc("a", data={"train": [{"source": "ptj://b"}]}),
                 doc("b", model={"source": "ptj://a"}), doc("c", model={"source": "ptj://zz"}))
    assert cli.main(["run", both, "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pipe.yaml[2]: spec.model.source: ptj://zz names job 'zz', which is not among the jobs given" in err
    assert "pipe.yaml[0]: spec.data.train[0].source: ptj://b closes a cycle of jobs that need each other's output " \
           "(a -> b -> a)" in err
    assert "pipe.yaml[1]: spec.model.source: ptj://a closes a cycle" in err
    assert not out.exists()


def test_run_refuses_two_jobs_of_one_name(tmp_path, capsys):
    a = write(tmp_path / "a.yaml", doc("a"))
    assert cli.main(["run", a, write(tmp_path / "a2.yaml", doc("a"))]) == 2
    assert "metadata.name: 'a' is also the name of the job in" in capsys.readouterr().err


def test_the_jobs_that_need_a_failed_job_are_not_run(tmp_path, capsys):
    # a fails on its input (its model does not exist: exit 2, nothing written), so b and c, which need it,
    # never start; d needs nothing and runs (and fails the same way, on its own input).
    files = [write(tmp_path / "a.yaml", doc("a")), write(tmp_path / "b.yaml", doc("b", model={"source": "ptj://a"})),
             write(tmp_path / "c.yaml", doc("c", model={"source": "ptj://b"})), write(tmp_path / "d.yaml", doc("d"))]
    assert cli.main(["run", *reversed(files), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "[b] not run: it needs the output of a, which did not succeed" in err
    assert "[c] not run: it needs the output of b, which did not succeed" in err
    assert err.count(f"error: spec.model.source: {tmp_path / 'model'} does not exist") == 2  # a's and d's
    assert err.strip().splitlines()[-1] == "jobs: d bad input, a bad input, b not run, c not run"
    assert not (tmp_path / "out" / "b").exists()


def test_a_reference_left_unresolved_is_refused_by_the_driver(tmp_path):
    from posttrain.jobs import driver

    with pytest.raises(ValueError, match=r"spec.model.source: ptj://a is the output of job a, which this run "):
        driver.run(parse_job(doc("b", model={"source": "ptj://a"})), driver.RunOptions(output=str(tmp_path)))


def test_the_examples_in_the_reference_modules_hold():
    import doctest

    from posttrain.operator import depends

    for module in (refs, depends):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.parametrize("config, provenance, says", [
    ({"peft_type": "LORA", "task_type": "CAUSAL_LM"}, None, "an adapter without posttrain.json naming its base"),
    ({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM"}, {"kind": "adapter", "base_model": "/m"},
     "is a PREFIX_TUNING adapter (CAUSAL_LM); only LoRA-family adapters"),
])
def test_an_adapter_that_cannot_be_merged_is_refused_naming_the_field(tmp_path, config, provenance, says):
    import json

    from posttrain.api.spec import ModelSpec
    from posttrain.jobs.models import ModelSourceError, materialize

    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    if provenance:
        (tmp_path / "posttrain.json").write_text(json.dumps(provenance))
    with pytest.raises(ModelSourceError, match=r"^spec.model.source: ") as exc:
        materialize(ModelSpec(source=str(tmp_path)))
    assert says in str(exc.value)


def test_an_adapter_trained_on_another_jobs_adapter_loads_with_both_merged(tmp_path, tiny_model, cache_dir):
    import json

    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.api.spec import ModelSpec
    from posttrain.jobs.models import materialize

    def adapter(base_folder: str, base_source: str, dest):
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"],
                                 init_lora_weights=False)  # random B: merging must change the weights
        peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base_folder), config).save_pretrained(dest)
        (dest / "posttrain.json").write_text(json.dumps({"kind": "adapter", "base_model": base_source}))
        return dest

    torch.manual_seed(0)
    first = adapter(str(tiny_model), str(tiny_model), tmp_path / "a" / "adapter")  # job a's output
    merged_first = materialize(ModelSpec(source=str(first)))
    second = adapter(merged_first, str(first), tmp_path / "b" / "adapter")  # job b trained on ptj://a
    merged_second = materialize(ModelSpec(source=str(second)))
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(merged_second)(ids).logits
        want = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(merged_first), str(second))(ids).logits
        base = AutoModelForCausalLM.from_pretrained(merged_first)(ids).logits
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, base, atol=1e-3)
