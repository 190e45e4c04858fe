"""Cluster in a box: the RayJobs the operator renders run as real Ray nodes, one mount namespace per pod.

    .venv/bin/python -m pytest tests/test_clusterbox.py -q              # all (about 8 minutes on 2 cores)
    .venv/bin/python -m pytest tests/test_clusterbox.py -q -m "not slow"  # the pure KubeRay-builder checks

The first group checks the box itself on one cluster (a rendered SFT RayJob with token auth, as
KubeRay 1.7 would run it); the rest run PostTrainingJobs end to end: the real kopf operator against
the API emulator, `clusterbox_kuberay.KubeRay` playing KubeRay, a pod killed mid-run, and the
operator's restart running as a brand-new cluster where only the PVC folders survive.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import urllib.error
from pathlib import Path

import pytest

import clusterbox
import clusterbox_build as build
import tiny
from posttrain.api.load import parse_job
from posttrain.operator import builders

SETTINGS = builders.BuildSettings(image="ghcr.io/posttrain/runtime:test")


def rendered(doc: dict) -> tuple[dict, dict]:
    """(RayJob, ConfigMap) as the operator builds them for run 0."""
    job = parse_job(doc)
    return (builders.build_rayjob(job, run=0, owner_uid="uid-1", settings=SETTINGS),
            builders.build_configmap(job, owner_uid="uid-1"))


def sft_doc(name: str = "box", **spec) -> dict:
    doc = {"apiVersion": "posttrain.dev/v1alpha1", "kind": "PostTrainingJob",
           "metadata": {"name": name, "namespace": "default"},
           "spec": {"algorithm": "sft", "model": {"source": "pvc://models/tiny"}, "adapter": {"type": "lora"},
                    "data": {"train": [{"source": "pvc://data/train.jsonl"}]}, "training": {"maxSteps": 4},
                    "output": {"uri": f"pvc://out/{name}"}}}
    doc["spec"].update(spec)
    return doc


# --- KubeRay's pod building (pure) ------------------------------------------------------------------

def test_ray_start_command_is_what_kuberay_writes_and_resources_survive_the_shell():
    rayjob, _ = rendered(sft_doc())
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    command = build.ray_start_command(worker["rayStartParams"], head=False, resources={},
                                      head_address="10.0.0.1:6379")
    assert command == ('ray start --address=10.0.0.1:6379  --block  --dashboard-agent-listen-port=52365 '
                       ' --metrics-export-port=8080  --resources="{\\"posttrain_trainer\\": 1}" ')
    argv = subprocess.run(["bash", "-c", f"printf '%s\\n' {command[len('ray start'):]}"], capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert '--resources={"posttrain_trainer": 1}' in argv, argv  # one JSON object after bash's quote removal

    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    resources = head["template"]["spec"]["containers"][0]["resources"]
    command = build.ray_start_command(head["rayStartParams"], head=True, resources=resources, head_address=None)
    assert " --num-cpus=0 " in command and " --memory=8589934592 " in command and " --dashboard-host=0.0.0.0 " in command
    moved = build.with_ports(command, build.node_ports(21000, head=True))
    assert " --dashboard-agent-listen-port=21003 " in moved and "52365" not in moved and " --port=21006 " in moved


def test_token_auth_env_and_secret_follow_kuberay():
    container = {"name": "ray-head", "env": [{"name": "A", "value": "1"}]}
    assert build.auth_secret_name({"authOptions": {"mode": "token"}}, "tune-r0-x7k2p") == "tune-r0-x7k2p"
    assert build.auth_secret_name({"authOptions": {"mode": "disabled"}}, "c") is None
    assert build.auth_secret_name({}, "c") is None
    env = build.with_token_auth(container, "tune-r0-x7k2p")["env"]
    assert env[1:] == [{"name": "RAY_AUTH_MODE", "value": "token"},
                       {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {"name": "tune-r0-x7k2p",
                                                                                 "key": "auth_token"}}}]
    resolved = build.resolve_env(env, secrets={"tune-r0-x7k2p": {"auth_token": "s3cret"}}, configmaps={},
                                 pod_fields={}, where="c")
    assert resolved == {"A": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "s3cret"}
    with pytest.raises(build.Unsupported, match=r"c\.env\[2\]\.valueFrom\.secretKeyRef: no key 'auth_token'"):
        build.resolve_env(env, secrets={}, configmaps={}, pod_fields={}, where="c")


def test_mount_plan_gives_every_pod_a_private_tmp_and_refuses_unmapped_claims(tmp_path):
    rayjob, cm = rendered(sft_doc())
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    pvcs = {c: tmp_path / c for c in ("models", "data", "out")}
    mounts, files = build.mount_plan(head, head["containers"][0], pod_dir=tmp_path / "pod", pvcs=pvcs,
                                     configmaps={"box-spec": cm["data"]}, secrets={}, where="head")
    by_target = {m["target"]: m for m in mounts}
    assert by_target["/tmp"]["source"] == str(tmp_path / "pod" / "volumes" / "tmp")
    assert by_target["/dev/shm"]["kind"] == "tmpfs"
    assert by_target["/mnt/pvc/models"]["source"] == str(tmp_path / "models")
    assert by_target["/etc/posttrain"]["readOnly"] is True
    assert files[by_target["/etc/posttrain"]["source"]] == cm["data"]
    assert [m["target"] for m in mounts].index("/dev/shm") < [m["target"] for m in mounts].index("/mnt/pvc/data")
    with pytest.raises(build.Unsupported, match="PersistentVolumeClaim 'out' has no host folder"):
        build.mount_plan(head, head["containers"][0], pod_dir=tmp_path / "pod", pvcs={"models": tmp_path,
                         "data": tmp_path}, configmaps={"box-spec": {}}, secrets={}, where="head")


# --- one cluster, looked at from every side -----------------------------------------------------------

PROBE = '''
import json, os, ray
ray.init()

@ray.remote(num_cpus=0, resources={"posttrain_trainer": 1})
def on_trainer():
    open("/tmp/written-by-a-task", "w").write("task")
    return os.readlink("/proc/self/ns/mnt")

open("/tmp/written-by-the-driver", "w").write("driver")
print("PROBE " + json.dumps({"driver": os.readlink("/proc/self/ns/mnt"), "task": ray.get(on_trainer.remote())}))
'''


@pytest.fixture(scope="module")
def pvc_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pvcs")
    folders = {claim: root / claim for claim in ("models", "data", "out", "ckpt")}
    for folder in folders.values():
        folder.mkdir()
    return folders


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory, pvc_folders):
    if why := clusterbox.available():
        pytest.skip(why)
    rayjob, cm = rendered(sft_doc())
    rayjob["spec"]["rayClusterSpec"]["authOptions"] = {"mode": "token"}  # as KubeRay 1.7's RayJobs may ask
    (pvc_folders["data"] / "probe.py").write_text(PROBE)
    box = clusterbox.ClusterBox(tmp_path_factory.mktemp("box"), pvcs=pvc_folders)
    with box:
        cluster = box.start(rayjob, configmaps={cm["metadata"]["name"]: cm["data"]})
        yield box, cluster, cm
        pods = list(cluster.pods)
        session = cluster.head.host_path("/tmp/ray/session_latest").resolve().name
    assert all(not p.processes() for p in pods), "a pod's processes outlived teardown"
    assert not cluster.folder.exists(), "pod folders (their /tmp) are removed"
    assert session.startswith("session_") and not (Path("/tmp/ray") / session).exists()


@pytest.mark.slow
def test_tmp_is_private_to_each_pod(token_cluster):
    _, cluster, _ = token_cluster
    head, worker = cluster.pod("head"), cluster.pod("trainer")
    assert head.exec("echo from-head > /tmp/only-head").returncode == 0
    assert worker.exec("echo from-worker > /tmp/only-worker").returncode == 0
    assert worker.exec("test -e /tmp/only-head").returncode == 1
    assert head.exec("test -e /tmp/only-worker").returncode == 1
    assert head.host_path("/tmp/only-head").read_text() == "from-head\n"
    assert not worker.host_path("/tmp/only-head").exists()
    assert head.exec("echo $HOME; pwd").stdout.split() == ["/tmp/home", "/tmp/home"]
    assert head.exec("readlink /proc/self/ns/mnt").stdout != worker.exec("readlink /proc/self/ns/mnt").stdout


@pytest.mark.slow
def test_a_pvc_is_shared_between_pods_and_the_host(token_cluster, pvc_folders):
    _, cluster, _ = token_cluster
    assert cluster.pod("head").exec("echo shared > /mnt/pvc/out/from-head").returncode == 0
    assert cluster.pod("trainer").exec("cat /mnt/pvc/out/from-head").stdout == "shared\n"
    assert (pvc_folders["out"] / "from-head").read_text() == "shared\n"


@pytest.mark.slow
def test_the_spec_configmap_is_mounted_read_only_on_the_head_only(token_cluster):
    _, cluster, cm = token_cluster
    head = cluster.pod("head")
    assert head.exec("cat /etc/posttrain/job.json").stdout == cm["data"]["job.json"]
    touched = head.exec("touch /etc/posttrain/job.json")
    assert touched.returncode != 0 and "Read-only file system" in touched.stderr
    assert cluster.pod("trainer").exec("test -e /etc/posttrain").returncode == 1
    assert not Path("/etc/posttrain").exists(), "mount points are made inside the pod, not on the host"


@pytest.mark.slow
def test_nodes_offer_the_resources_of_their_ray_start_params(token_cluster):
    _, cluster, _ = token_cluster
    nodes = {n["is_head_node"]: n["resources_total"] for n in cluster.alive_nodes()}
    assert nodes[True].get("CPU", 0) == 0 and "posttrain_trainer" not in nodes[True]
    assert nodes[False]["posttrain_trainer"] == 1 and nodes[False]["CPU"] >= 1


@pytest.mark.slow
def test_the_entrypoint_runs_in_the_head_pod_and_tasks_on_their_worker(token_cluster):
    _, cluster, _ = token_cluster
    head, worker = cluster.pod("head"), cluster.pod("trainer")
    job = {"metadata": {"name": "probe"}, "spec": {"entrypoint": "python /mnt/pvc/data/probe.py"}}
    info = cluster.wait_job(cluster.submit(job, "probe-1"), timeout=180)
    logs = cluster.job_logs("probe-1")
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    seen = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[len("PROBE "):])
    assert seen["driver"] == head.exec("readlink /proc/self/ns/mnt").stdout.strip()
    assert seen["task"] == worker.exec("readlink /proc/self/ns/mnt").stdout.strip()
    assert head.host_path("/tmp/written-by-the-driver").exists()
    assert worker.host_path("/tmp/written-by-a-task").exists()
    assert not head.host_path("/tmp/written-by-a-task").exists()


@pytest.mark.slow
def test_token_auth_guards_the_dashboard_and_every_pod_has_the_token(token_cluster):
    box, cluster, _ = token_cluster
    token = box.secrets[build.check_name(cluster.name)]["auth_token"]
    cluster.token = None
    try:
        with pytest.raises(urllib.error.HTTPError) as missing:
            cluster.request("GET", "/api/jobs/")
        with pytest.raises(urllib.error.HTTPError) as wrong:
            cluster.request("GET", "/api/jobs/", token="not-the-token")
    finally:
        cluster.token = token
    assert (missing.value.code, wrong.value.code) == (401, 403)
    assert isinstance(cluster.request("GET", "/api/jobs/"), list)
    for pod in cluster.pods:
        env = dict(line.split("=", 1) for line in pod.exec("env").stdout.splitlines() if "=" in line)
        assert (env["RAY_AUTH_MODE"], env["RAY_AUTH_TOKEN"]) == ("token", token), pod.name
    probe = cluster.pod("head").exec(f"python -c {shlex.quote('import ray; ray.init(); print(len(ray.nodes()))')}")
    assert probe.stdout.strip() == "2", probe.stderr[-2000:]


# --- PostTrainingJobs end to end: operator, emulator, KubeRay played by clusterbox ---------------------

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
    from clusterbox_kuberay import KubeRay
    from posttrain.operator import handlers, kube, metrics

    pvcs = {**shared_inputs, "out": tmp_path / "out", "ckpt": tmp_path / "ckpt"}
    for claim in ("out", "ckpt"):
        pvcs[claim].mkdir()
    with kubeemu.Cluster() as k8s, clusterbox.ClusterBox(tmp_path / "box", pvcs=pvcs) as box, \
            KubeRay(k8s, box) as kuberay:
        registry = kopf.OperatorRegistry()
        config = handlers.OperatorConfig(build=SETTINGS, progress_interval=0.5, progress_timeout=2.0)
        handlers.register(registry, handlers.Controller(config, kube_api=kube.Kube(k8s.api_client()),
                                                        metrics=metrics.OperatorMetrics()))
        with kubeemu.Operator(k8s, registry):
            yield k8s, box, kuberay
    pods = [p for run in kuberay.runs.values() if run.cluster for p in run.cluster.pods]
    assert pods and all(not p.processes() for p in pods), "every pod of every run is gone after the test"


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
        return k8s.wait_for(ended, timeout=timeout, interval=0.5, what=f"{job} to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\ndriver log of {last}:\n{kuberay.logs(last)[-4000:]}") from None


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
            actors[role] = {cls for cls in ("RolloutWorker", "RewardWorker", "LearnerWorker") if f"ray::{cls}" in titles}

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
