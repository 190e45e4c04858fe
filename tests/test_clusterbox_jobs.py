"""PostTrainingJobs end to end on clusterbox: the real operator, the API emulator, KubeRay played by clusterbox.

    .venv/bin/python -m pytest tests/test_clusterbox_jobs.py -q        # about 3 minutes on 2 cores

Each test creates a PostTrainingJob whose model and data sit on PVC folders (`pvc://` URIs); the
kopf operator renders `<job>-r0`, `clusterbox_kuberay.KubeRay` starts its pods as Ray nodes in
their own mount namespaces and submits the entrypoint over HTTP; a worker pod is killed after the
first checkpoint reaches the PVC, and the operator's `<job>-r1` runs as a brand-new cluster where
only the PVC folders survive. A test that fails here names the component that wrote where.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import clusterbox
from support import jobs
import tiny
from posttrain.operator import builders

SETTINGS = builders.BuildSettings(image="ghcr.io/posttrain/runtime:test")


def sft_doc(name: str = "box", **spec) -> dict:
    return jobs.pvc_document(name, **spec)


@pytest.fixture(scope="module")
def shared_inputs(tmp_path_factory) -> dict[str, Path]:
    """The "models" and "data" claims: a tiny model and its data, made once for the module."""
    root = tmp_path_factory.mktemp("inputs")
    tiny.make_model(root / "models" / "tiny")
    tiny.write_jsonl(root / "data" / "train.jsonl", tiny.arith_records(96))
    prompts = [{"prompt": r["prompt"], "answer": r["completion"].split()[-1]} for r in tiny.arith_records(32, seed=1)]
    tiny.write_jsonl(root / "data" / "prompts.jsonl", prompts)
    return {"models": root / "models", "data": root / "data"}


@pytest.fixture
def stack(tmp_path, shared_inputs):
    """(k8s, box, kuberay): the real operator against the emulator, with KubeRay played by clusterbox."""
    if why := clusterbox.available():
        pytest.skip(why)
    import kopf

    import kubeemu
    import opcluster
    from clusterbox_kuberay import KubeRay
    from posttrain.operator import handlers, kube, metrics

    pvcs = {**shared_inputs, "out": tmp_path / "out", "ckpt": tmp_path / "ckpt"}
    for claim in ("out", "ckpt"):
        pvcs[claim].mkdir()
    with kubeemu.Cluster() as k8s, clusterbox.ClusterBox(tmp_path / "box", pvcs=pvcs) as box, \
            KubeRay(k8s, box) as kuberay:
        for claim in pvcs:  # the claims exist and are ReadWriteMany, as the operator checks before a run
            opcluster.claim(k8s, claim)
        registry = kopf.OperatorRegistry()
        config = handlers.OperatorConfig(build=SETTINGS, progress_interval=0.5, progress_timeout=2.0)
        handlers.register(registry, handlers.Controller(config, kube_api=kube.Kube(k8s.api_client()),
                                                        metrics=metrics.OperatorMetrics()))
        with kubeemu.Operator(k8s, registry):
            yield k8s, box, kuberay
    pods = [p for run in kuberay.runs.values() if run.cluster for p in run.cluster.pods]
    assert all(not p.processes() for p in pods), "every pod of every run is gone after the test"


def ptj_status(k8s, name: str) -> dict:
    import kubeemu

    return k8s.get(*kubeemu.PTJ, "default", name).get("status") or {}


def rayjob_status(k8s, name: str) -> dict:
    import kubeemu

    return k8s.get(*kubeemu.RAYJOB, "default", name).get("status") or {}


def first_checkpoint(folder: Path) -> Path | None:
    marked = sorted(folder.glob(f"checkpoint-*/{'.posttrain-complete'}"))
    return marked[0].parent if marked else None


def kill_after_first_checkpoint(k8s, kuberay, *, job: str, ckpt: Path, pod_group: str, timeout: float = 400,
                                before_kill=None):
    """Wait for r0's first complete checkpoint on the PVC, kill one worker pod, and wait for the operator's r1."""
    cluster = kuberay.wait_cluster(f"{job}-r0", timeout=timeout)

    def checkpointed():
        if found := first_checkpoint(ckpt):
            return found
        st = rayjob_status(k8s, f"{job}-r0")
        assert st.get("jobDeploymentStatus") not in ("Complete", "Failed"), \
            f"{job}-r0 ended {st.get('jobStatus')} before its first checkpoint: {st.get('message')}"
        return None

    try:
        k8s.wait_for(checkpointed, timeout=timeout, interval=0.1, what=f"a checkpoint in {ckpt}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ndriver log:\n{kuberay.logs(f'{job}-r0')[-3000:]}") from None
    if before_kill:
        before_kill(cluster)
    victim = cluster.pod(pod_group)
    victim.kill()
    failed = k8s.wait_for(lambda: (s := rayjob_status(k8s, f"{job}-r0")).get("jobDeploymentStatus") == "Failed" and s,
                          timeout=180, what=f"{job}-r0 Failed after its {pod_group} pod was killed")
    assert failed["jobStatus"] == "FAILED" and failed["reason"] == "AppFailed" and failed["message"]
    status = k8s.wait_for(lambda: (s := ptj_status(k8s, job)).get("restarts") == 1 and s, timeout=60,
                          what="the operator's restart")
    assert status["rayJob"] == f"{job}-r1"
    return cluster, victim


def finish(k8s, kuberay, job: str, *, timeout: float = 400) -> dict:
    """Wait for the job to end; on failure say why (status and the last driver log)."""
    def ended():
        s = ptj_status(k8s, job)
        return s if s.get("phase") in ("Succeeded", "Failed") else None

    last = f"{job}-r{ptj_status(k8s, job).get('restarts', 0)}"
    try:
        status = k8s.wait_for(ended, timeout=timeout, interval=0.5, what=f"{job} to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ndriver log of {last}:\n{kuberay.logs(last)[-4000:]}") from None
    broken = {name: run.error for name, run in kuberay.runs.items() if run.error}
    assert not broken, f"the harness itself failed (not the job): {broken}"
    return status


def assert_fresh_cluster(kuberay, first, job: str) -> None:
    """r1 runs on new pods with a new /tmp; r0's pods are gone."""
    second = kuberay.wait_cluster(f"{job}-r1", timeout=300)
    assert second.name != first.name and not {p.name for p in second.pods} & {p.name for p in first.pods}
    assert kuberay.runs[f"{job}-r0"].torn_down.wait(120), "shutdownAfterJobFinishes deletes r0's cluster"
    assert all(not p.processes() for p in first.pods)
    assert not first.folder.exists(), "r0's pod folders (their /tmp) are removed with its cluster"


@pytest.mark.slow
def test_sft_killed_worker_restarts_and_resumes_from_the_checkpoint_on_the_pvc(stack):
    k8s, box, kuberay = stack
    doc = sft_doc("sft", adapter={"type": "lora", "r": 8, "alpha": 16},
                  training={"maxSteps": 40, "learningRate": 5e-3, "globalBatchSize": 8, "microBatchSize": 4,
                            "maxSeqLength": 64},
                  checkpoint={"uri": "pvc://ckpt/sft", "everySteps": 3, "keep": 2},
                  maxRestarts=1, ttlSecondsAfterFinished=0)
    k8s.create(doc)
    first, _ = kill_after_first_checkpoint(k8s, kuberay, job="sft", ckpt=box.host_path("pvc://ckpt/sft"),
                                           pod_group="trainer")
    assert_fresh_cluster(kuberay, first, "sft")
    status = finish(k8s, kuberay, "sft")
    assert status["phase"] == "Succeeded", status

    summary = json.loads((box.host_path("pvc://out/sft") / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 40
    assert summary["resumed_from_step"] and summary["resumed_from_step"] % 3 == 0 and summary["resumed_from_step"] < 40
    adapter = box.host_path(summary["artifact"]["path"])
    assert summary["artifact"]["kind"] == "adapter" and (adapter / "adapter_config.json").exists()
    assert status["progress"]["totalSteps"] == 40  # the operator reached /progress through dashboardURL's host
    assert status["lastCheckpoint"].startswith("/mnt/pvc/ckpt/sft/checkpoint-")
    assert (box.host_path(status["lastCheckpoint"]) / ".posttrain-complete").exists()
    assert rayjob_status(k8s, "sft-r1")["jobDeploymentStatus"] == "Complete"
    assert rayjob_status(k8s, "sft-r1")["jobStatus"] == "SUCCEEDED"


@pytest.mark.slow
def test_grpo_roles_on_their_own_pods_survive_a_killed_learner_and_resume(stack):
    k8s, box, kuberay = stack
    doc = {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
           "metadata": {"name": "grpo", "namespace": "default"},
           "spec": {"algorithm": "grpo", "model": {"source": "pvc://models/tiny"},
                    "data": {"train": [{"source": "pvc://data/prompts.jsonl"}]},
                    "training": {"maxSteps": 12, "learningRate": 0.02, "lrScheduler": "constant", "maxSeqLength": 64,
                                 "seed": 0},
                    "rl": {"groupSize": 4, "promptsPerStep": 2, "maxNewTokens": 8},
                    "rewards": [{"function": "posttrain.jobs.rewards.builtin:exact_answer"}],
                    "roles": {"rollout": {"engine": "transformers"}},
                    "checkpoint": {"uri": "pvc://ckpt/grpo", "everySteps": 2},
                    "output": {"uri": "pvc://out/grpo"},
                    "maxRestarts": 1, "ttlSecondsAfterFinished": 0}}
    k8s.create(doc)
    first = kuberay.wait_cluster("grpo-r0", timeout=300)
    assert sorted(p.group for p in first.pods) == ["headgroup", "learner", "reward", "rollout"]
    actors = {}

    def actor_processes(cluster):  # which role's actors each worker pod runs (Ray titles them ray::<Class>)
        for role in ("rollout", "reward", "learner"):
            titles = cluster.pod(role).exec("ps -eo args").stdout
            actors[role] = {c for c in ("RolloutWorker", "RewardWorker", "LearnerWorker") if f"ray::{c}" in titles}

    first, _ = kill_after_first_checkpoint(k8s, kuberay, job="grpo", ckpt=box.host_path("pvc://ckpt/grpo"),
                                           pod_group="learner", before_kill=actor_processes)
    assert actors == {"rollout": {"RolloutWorker"}, "reward": {"RewardWorker"}, "learner": {"LearnerWorker"}}
    assert_fresh_cluster(kuberay, first, "grpo")
    status = finish(k8s, kuberay, "grpo")
    assert status["phase"] == "Succeeded", status

    out = box.host_path("pvc://out/grpo")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["steps"] == 12
    assert summary["resumed_from_step"] and summary["resumed_from_step"] % 2 == 0
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))
    model = box.host_path(summary["artifact"]["path"]) if summary["artifact"].get("path") else out / "model"
    assert (model / "config.json").exists(), summary["artifact"]
    assert status["progress"]["totalSteps"] == 12
    assert (box.host_path(status["lastCheckpoint"]) / ".posttrain-complete").exists()


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _holds_a_model(folder: Path) -> bool:
    return any((folder / sub / name).exists() for sub in ("", "model", "adapter")
               for name in ("config.json", "adapter_config.json"))


@pytest.mark.slow
def test_a_job_without_an_output_uri_never_succeeds_with_its_model_out_of_reach(stack):
    """Refused before any pod starts, or Succeeded with the model where the status says (on shared storage)."""
    k8s, box, kuberay = stack
    doc = sft_doc("nout", training={"maxSteps": 2, "globalBatchSize": 8, "microBatchSize": 4, "maxSeqLength": 64},
                  maxRestarts=0, ttlSecondsAfterFinished=300)  # keep the finished cluster to look inside it
    del doc["spec"]["output"]
    k8s.create(doc)
    status = finish(k8s, kuberay, "nout")
    if status["phase"] == "Failed":
        assert all(run.cluster is None for run in kuberay.runs.values()), "refused only after pods were started"
        failed = next(c for c in status["conditions"] if c["type"] == "Failed")
        assert "output" in failed["message"], failed
        return
    shared = [s for s in _strings(status) if s.startswith(("pvc://", clusterbox.PVC_ROOT + "/"))]
    reachable = [s for s in shared if _holds_a_model(box.host_path(s))]
    run = kuberay.runs["nout-r0"]
    written = {pod.name: sorted(str(p.relative_to(pod.host_path("/tmp")))
                                for p in pod.host_path("/tmp/posttrain-output").rglob("*") if p.is_file()
                                and p.name in ("summary.json", "run.json", "adapter_config.json", "config.json"))
               for pod in run.cluster.pods} if run.cluster and run.cluster.folder.exists() else "cluster gone"
    assert reachable, (f"nout ended Succeeded, but its status names no model on shared storage ({shared or 'none'}); "
                       f"what the pods wrote to their own /tmp, gone with the cluster: {written}")
