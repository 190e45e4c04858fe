"""`posttrain eval` / `algorithm: evaluate` end to end on tiny models on one local Ray: a base model and the
same base with a LoRA adapter folder, every method, the result files; and bad input refused before anything
is written (no Ray).

    .venv/bin/python -m pytest tests/test_eval_e2e.py -q
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import tiny
from posttrain.jobs import cli


def tasks(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        out.append({"prompt": f"add {a} + {b} =", "answer": a + b})
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    tiny.make_model(root / "model")
    tiny.write_jsonl(root / "tasks.jsonl", tasks(5))
    return root


def make_adapter(model: Path, dest: Path) -> Path:
    """A LoRA adapter with random (non-zero) B matrices, so base + adapter answers differently."""
    import peft
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model)
    config = peft.LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(net, config).save_pretrained(dest)
    return dest


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Poller:
    """Reads a driver's /progress every 0.2 s, as the operator does (every 10 s), keeping the last answer."""

    def __init__(self, url: str) -> None:
        import threading

        self.url, self.last, self.stop = url, None, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import urllib.request

        while not self.stop.wait(0.2):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as answer:
                    self.last = json.loads(answer.read())
            except OSError:
                pass  # not up yet, or gone

    def __enter__(self) -> "Poller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_bad_input_names_the_field_and_writes_nothing(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    base = ["eval", "--data", "tasks.jsonl", "--output", "bad"]
    cases = [
        (["--model", "model", "--method", "direct", "--method", "beam"], "spec.evaluation.methods[1]: unknown method"),
        (["--model", "model", "--method", "self_consistency", "--samples", "0,2"], "spec.evaluation.samples[0]: N = 0"),
        (["--model", "model", "--model", "missing"], "spec.evaluation.models[1].source:"),
        (["--model", "model::nowhere"], "spec.evaluation.models[0].adapter:"),
        (["--model", "model", "--method", "best_of_n"], "spec.rewards: best_of_n scores with spec.rewards"),
        (["--model", "model", "--extract", "nosuch_mod:fn"], "spec.evaluation.answer.extract:"),
    ]
    for extra, message in cases:
        assert cli.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra
    assert not (workdir / "bad").exists()


@pytest.mark.slow
def test_two_models_every_method_and_the_result_files(workdir, ray_local, monkeypatch, capsys):
    make_adapter(workdir / "model", workdir / "adapter")
    monkeypatch.chdir(workdir)
    code = cli.main(["eval", "--model", "base=model", "--model", "tuned=model::adapter", "--data", "tasks.jsonl",
                     *(x for m in ("direct", "cot", "self_consistency", "best_of_n", "refine") for x in ("--method", m)),
                     "--samples", "1,2,4", "--reward", "posttrain.jobs.rewards.builtin:exact_answer",
                     "--engine", "transformers", "--max-new-tokens", "5", "--temperature", "1.0",
                     "--set", "evaluation.refineRounds=1", "--output", "out"])
    assert code == 0, capsys.readouterr().err
    out = workdir / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["algorithm"] == "evaluate"
    assert set(summary["evaluation"]) == {"base", "tuned"}
    assert set(summary["evaluation"]["base"]) == {"direct", "cot", "self_consistency@1", "self_consistency@2",
                                                  "self_consistency@4", "best_of_n@1", "best_of_n@2", "best_of_n@4",
                                                  "refine@0", "refine@1"}
    doc = json.loads((out / "eval" / "eval.json").read_text())
    assert doc["prompts"] == 5 and doc["engine"] == "transformers" and len(doc["results"]) == 2 * 10
    rows = {(r["model"], r["method"], r["n"]): r for r in doc["results"]}
    for model in ("base", "tuned"):
        sc = [rows[(model, "self_consistency", n)] for n in (1, 2, 4)]
        assert [r["tokens"] for r in sc] == sorted(r["tokens"] for r in sc) and sc[0]["tokens"] > 0
        for n in (1, 2, 4):  # one sample set: best_of_n read the very samples self_consistency voted over
            assert rows[(model, "best_of_n", n)]["tokens"] == rows[(model, "self_consistency", n)]["tokens"]
        assert rows[(model, "refine", 1)]["generations"] == 3
        for r in doc["results"]:
            assert 0.0 <= r["ci95"][0] <= r["score"] <= r["ci95"][1] <= 1.0 and r["prompts"] == 5
    # a random tiny model rarely writes a number: failures are counted, not fatal
    assert sum(r["extraction_failures"] for r in doc["results"]) > 0
    samples = read_lines(out / "eval" / "samples.jsonl")
    assert len(samples) == 2 * 5 * 5
    direct = {(s["model"], s["index"]): s["samples"][0]["text"] for s in samples if s["method"] == "direct"}
    assert any(direct[("base", i)] != direct[("tuned", i)] for i in range(5))  # the adapter was merged in
    sc4 = next(s for s in samples if s["method"] == "self_consistency")
    assert len(sc4["samples"]) == 4 and set(sc4["votes"]) == {"1", "2", "4"}
    report_md = (out / "eval" / "report.md").read_text()
    assert "| base | self_consistency N=4 | 4 |" in report_md and "| tuned | refine round 1 | 3 |" in report_md
    for plot in ("accuracy_vs_samples.png", "accuracy_vs_tokens.png"):
        assert (out / "eval" / plot).read_bytes()[:4] == b"\x89PNG"
    metrics = read_lines(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 11))
    assert [m["method"] for m in metrics[:5]] == ["direct", "cot", "self_consistency", "best_of_n", "refine"]
    assert {m["model"] for m in metrics} == {"base", "tuned"}


def test_a_training_jobs_evaluation_is_checked_with_the_job():
    from posttrain.api.load import InvalidJob, parse_job
    from support import jobs

    ok = jobs.document("sft", evaluation={"methods": ["direct"], "data": "held.jsonl"},
                       roles={"rollout": {"engine": "transformers"}})
    assert parse_job(ok).spec.ray_roles() == ("trainer", "rollout")
    cases = [
        (jobs.document("sft", evaluation={"methods": ["direct"]}), "spec.evaluation.data: give the held-out"),
        (jobs.document("sft", evaluation={"data": "h.jsonl", "models": [{"source": "m"}]}), "spec.evaluation.models"),
        (jobs.document("sft", evaluation={"data": "h.jsonl"}, adapter={"type": "prefix"}), "cannot be merged"),
        (jobs.document("sft", evaluation={"data": "h.jsonl", "methods": ["best_of_n"]}), "spec.rewards"),
        (jobs.document("sft", roles={"rollout": {}}), "spec.roles.rollout: is for grpo and ppo"),
    ]
    for doc, message in cases:
        with pytest.raises(InvalidJob) as err:
            parse_job(doc)
        assert message in str(err.value), (message, str(err.value))


@pytest.mark.slow
def test_grpo_with_evaluation_reports_base_and_trained(workdir, ray_local, monkeypatch):
    from posttrain.api.load import parse_job
    from posttrain.jobs import driver
    from support import jobs

    tiny.write_jsonl(workdir / "train.jsonl", [{"prompt": r["prompt"], "answer": r["answer"]} for r in tasks(8, 1)])
    doc = jobs.document("grpo", name="grpo-eval", adapter=jobs.LORA,
                        evaluation={"methods": ["direct", "self_consistency"], "samples": [1, 2],
                                    "data": "tasks.jsonl", "maxNewTokens": 4})
    doc["spec"]["training"]["maxSteps"] = 2
    doc["spec"]["rl"] = {"groupSize": 2, "promptsPerStep": 2, "maxNewTokens": 4}
    port = free_port()
    with Poller(f"http://127.0.0.1:{port}/progress") as poller:  # the operator's role
        summary = driver.run(parse_job(doc, require_available=True),
                             driver.RunOptions(output=str(workdir / "grpo"), base_dir=workdir, metrics_port=port,
                                               metrics_host="127.0.0.1"))
    assert summary["status"] == "succeeded" and summary["steps"] == 2
    assert set(summary["evaluation"]) == {"base", "trained"}
    # the driver waited until the poller had read the final phase and the before/after (the CR status's source)
    assert poller.last["phase"] == "succeeded" and poller.last["step"] == 2
    assert poller.last["evaluation"] == {  # each method at its largest N
        name: {"direct": summary["evaluation"][name]["direct"],
               "self_consistency": summary["evaluation"][name]["self_consistency@2"]} for name in ("base", "trained")}
    assert set(summary["evaluation_before_after"]) == {"direct", "self_consistency@1", "self_consistency@2"}
    doc = json.loads((workdir / "grpo" / "eval" / "eval.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["base", "trained"] and doc["prompts"] == 5
    assert doc["models"][1]["adapter"].endswith("adapter")  # base + the trained LoRA adapter
    # the training's metrics.jsonl has its steps only
    assert [m["step"] for m in read_lines(workdir / "grpo" / "metrics.jsonl")] == [1, 2]


def test_evaluation_scores_reach_progress_metrics_and_the_status():
    from posttrain.jobs.run.progress import Metrics, RunState
    from posttrain.operator.observe import sanitize_progress

    state = RunState(job="ev", algorithm="evaluate", step=3, total_steps=10, score=0.625)
    state.eval_scores[("base", "self_consistency")] = 0.625
    body = state.progress()
    assert body["score"] == 0.625 and sanitize_progress(body)["score"] == 0.625
    text = Metrics(state).exposition().decode()
    assert ('posttrain_eval_score{algorithm="evaluate",job="ev",method="self_consistency",model="base"} 0.625'
            in text)
    assert "score" not in RunState(job="t", algorithm="sft").progress()  # training jobs' /progress is unchanged
    state.eval_scores[("trained", "self_consistency")] = 0.875
    assert sanitize_progress(state.progress())["evaluation"] == {"base": {"self_consistency": 0.625},
                                                                 "trained": {"self_consistency": 0.875}}


def test_the_progress_server_closes_at_once_when_nobody_polls():
    from posttrain.jobs.run.progress import Metrics, ProgressServer, RunState

    server = ProgressServer(Metrics(RunState(job="t", algorithm="sft", phase="succeeded")), 0, "127.0.0.1")
    assert server.close(linger=600) is True  # would wait ten minutes if it lingered without a poller
    assert not server.final_read.is_set()


def test_posttrain_eval_builds_the_evaluate_job():
    from posttrain.api.load import parse_job

    args = cli.build_parser().parse_args([
        "eval", "--model", "hf://org/base@v1", "--model", "tuned=/m/base::/runs/a/adapter", "--data", "t.jsonl",
        "--method", "cot", "--method", "best_of_n", "--samples", "1,4", "--reward", "my.mod:check",
        "--temperature", "0.5", "--engine", "vllm"])
    job = parse_job(cli.eval_document(args), require_available=True)
    ev = job.spec.evaluation
    assert job.spec.algorithm.value == "evaluate" and job.spec.data.train[0].source == "t.jsonl"
    assert [(m.name, m.source, m.adapter) for m in ev.models] == [
        ("model-0", "hf://org/base@v1", None), ("tuned", "/m/base", "/runs/a/adapter")]
    assert ev.methods == ["cot", "best_of_n"] and ev.samples == [1, 4] and ev.temperature == 0.5
    assert [r.function for r in job.spec.rewards] == ["my.mod:check"] and job.spec.roles.rollout.engine == "vllm"
    assert job.spec.ray_roles() == ("rollout", "reward")


def test_a_cluster_must_reach_every_evaluated_model_and_adapter():
    from posttrain.api.cluster import cluster_errors
    from posttrain.api.load import parse_job
    from support import jobs

    doc = jobs.cluster_document("ev", training={}, evaluation={
        "models": [{"source": "hf://org/m"}, {"source": "hf://org/m", "adapter": "runs/adapter"}],
        "data": "held.jsonl"})
    doc["spec"]["algorithm"] = "evaluate"
    paths = [e.path for e in cluster_errors(parse_job(doc))]
    assert "spec.evaluation.models[1].adapter" in paths and "spec.evaluation.data" in paths
