"""The algorithm seam: one table maps spec.algorithm to a module's run(ctx), and the API lists the same names.

A toy algorithm, registered from this test, runs end to end through the driver on a tiny model with
the run context doing everything shared (output, run.json, metrics, Ray, summary); unregistered,
the same job is refused before anything is written.
"""

from __future__ import annotations

import json
import math

import pytest

import tiny
from posttrain.api.load import parse_job
from posttrain.api.spec import AVAILABLE_ALGORITHMS
from posttrain.jobs import driver
from posttrain.jobs.algorithms import ALGORITHMS
from posttrain.jobs.run.context import RunContext
from support import jobs


def test_the_table_and_the_api_list_the_same_algorithms():
    assert set(ALGORITHMS.names()) == set(AVAILABLE_ALGORITHMS)
    for name in ALGORITHMS.names():
        assert callable(ALGORITHMS.load(name)), name  # every entry imports


def toy(ctx: RunContext) -> dict:
    """A whole method in a few lines: score the data with the model on a Ray worker, two 'steps'."""
    import ray

    def mean_nll(model_path: str, texts: list[str]) -> float:  # in a Ray task: the model loaded on that worker
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        with torch.no_grad():
            losses = [model(**tok(t, return_tensors="pt"), labels=tok(t, return_tensors="pt")["input_ids"]).loss.item()
                      for t in texts]
        return sum(losses) / len(losses)

    from posttrain.jobs import models

    ctx.prepare()
    ctx.tokenizer()  # bad model sources fail here, before anything is written
    texts = [json.loads(line)["prompt"] for line in (ctx.base_dir / "train.jsonl").read_text().splitlines()[:4]]
    ctx.begin(total_steps=2, summary={"toy": True})
    try:
        with ctx.ray():
            model = models.materialize(ctx.spec.model, base=ctx.base_dir)
            nll = ray.get(ray.remote(mean_nll).remote(model, texts))
            for step in (1, 2):
                ctx.log(step, {"loss": nll / step})
    except BaseException as exc:  # noqa: BLE001
        return ctx.finish(exc)
    return ctx.finish(mean_nll=nll)


@pytest.fixture
def workdir(tmp_path, tiny_model, tiny_train, cache_dir):
    (tmp_path / "model").symlink_to(tiny_model)
    (tmp_path / "train.jsonl").symlink_to(tiny_train)
    return tmp_path


@pytest.mark.slow
def test_a_toy_algorithm_is_one_function_and_one_table_entry(workdir):
    job = parse_job(jobs.document("distill", name="toy", teacher={"source": "model"}))
    shipped = ALGORITHMS.get("distill")
    ALGORITHMS.remove("distill")  # the toy takes the name's place in the table
    try:
        ALGORITHMS.add("distill", toy)
        try:
            summary = driver.run(job, driver.RunOptions(output=str(workdir / "out"), base_dir=workdir))
        finally:
            ALGORITHMS.remove("distill")
        out = workdir / "out"
        assert summary["status"] == "succeeded" and summary["toy"] and summary["steps"] == 2
        assert math.isfinite(summary["mean_nll"]) and summary["mean_nll"] > 1.0  # a random tiny model is unsure
        assert json.loads((out / "summary.json").read_text())["mean_nll"] == summary["mean_nll"]
        assert json.loads((out / "run.json").read_text())["spec"]["algorithm"] == "distill"
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(m["step"], m["loss"]) for m in lines] == [(1, summary["mean_nll"]), (2, summary["mean_nll"] / 2)]

        with pytest.raises(ValueError, match=r"spec.algorithm: unknown algorithm 'distill'; choose one of: dpo, evaluate, generate, grpo, kto, orpo, ppo, reward, sft, simpo"):
            driver.run(job, driver.RunOptions(output=str(workdir / "again"), base_dir=workdir))
        assert not (workdir / "again").exists(), "a refused algorithm writes nothing"
    finally:
        ALGORITHMS.add("distill", shipped)
