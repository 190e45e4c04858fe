"""Cluster in a box itself: what KubeRay makes of a rendered RayJob, and the pods it runs, seen from every side.

    .venv/bin/python -m pytest tests/test_clusterbox.py -q                # about a minute on 2 cores
    .venv/bin/python -m pytest tests/test_clusterbox.py -q -m "not slow"  # the pure KubeRay-builder checks

The pure tests pin `clusterbox_build` to KubeRay v1.7's behaviour; the slow ones start one cluster
(a rendered SFT RayJob with token auth, as KubeRay 1.7 runs it) and look at it from every pod, and
one RayJob goes through KubeRay's states in the API emulator until it is deleted. PostTrainingJobs
end to end through the operator are in test_clusterbox_jobs.py.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import urllib.error
from pathlib import Path

import pytest

import clusterbox
from support import jobs
import clusterbox_build as build
from posttrain.api.load import parse_job
from posttrain.operator import builders

SETTINGS = builders.BuildSettings(image="ghcr.io/posttrain/runtime:test")


def rendered(doc: dict) -> tuple[dict, dict]:
    """(RayJob, ConfigMap) as the operator builds them for run 0."""
    job = parse_job(doc)
    return (builders.build_rayjob(job, run=0, owner_uid="uid-1", settings=SETTINGS),
            builders.build_configmap(job, owner_uid="uid-1"))


def sft_doc(name: str = "box", **spec) -> dict:
    return jobs.pvc_document(name, **spec)


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
    for flag in (" --num-cpus=0 ", " --memory=8589934592 ", " --dashboard-host=0.0.0.0 "):
        assert flag in command
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
    rayjob, cm = rendered(sft_doc(roles={"trainer": {"replicas": 2}}))
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
    head, worker, replica = cluster.pod("head"), cluster.pod("trainer", 0), cluster.pod("trainer", 1)
    assert [p.name for p in cluster.pods] == [f"{cluster.name}-head", f"{cluster.name}-trainer-worker-0",
                                              f"{cluster.name}-trainer-worker-1"]  # each replica is a pod
    for pod in (head, worker, replica):
        assert pod.exec(f"echo {pod.name} > /tmp/mine").returncode == 0
    for pod in (head, worker, replica):
        assert pod.exec("cat /tmp/mine").stdout == f"{pod.name}\n"
        assert pod.host_path("/tmp/mine").read_text() == f"{pod.name}\n"
    assert worker.exec("echo only-here > /tmp/only-worker-0").returncode == 0
    assert head.exec("test -e /tmp/only-worker-0").returncode == 1
    assert replica.exec("test -e /tmp/only-worker-0").returncode == 1
    assert head.exec("echo $HOME; pwd").stdout.split() == ["/tmp/home", "/tmp/home"]
    assert len({p.exec("readlink /proc/self/ns/mnt").stdout for p in (head, worker, replica)}) == 3


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
    nodes = cluster.alive_nodes()
    head = [n["resources_total"] for n in nodes if n["is_head_node"]]
    workers = [n["resources_total"] for n in nodes if not n["is_head_node"]]
    assert len(head) == 1 and head[0].get("CPU", 0) == 0 and "posttrain_trainer" not in head[0]
    assert [w["posttrain_trainer"] for w in workers] == [1, 1] and all(w["CPU"] >= 1 for w in workers)


@pytest.mark.slow
def test_the_entrypoint_runs_in_the_head_pod_and_tasks_on_their_worker(token_cluster):
    _, cluster, _ = token_cluster
    head, workers = cluster.pod("head"), [cluster.pod("trainer", i) for i in (0, 1)]
    job = {"metadata": {"name": "probe"}, "spec": {"entrypoint": "python /mnt/pvc/data/probe.py"}}
    info = cluster.wait_job(cluster.submit(job, "probe-1"), timeout=180)
    logs = cluster.job_logs("probe-1")
    assert info["status"] == "SUCCEEDED", logs[-3000:]
    seen = json.loads(next(line for line in logs.splitlines() if line.startswith("PROBE "))[len("PROBE "):])
    assert seen["driver"] == head.exec("readlink /proc/self/ns/mnt").stdout.strip()
    ran_on = [w for w in workers if w.exec("readlink /proc/self/ns/mnt").stdout.strip() == seen["task"]]
    assert len(ran_on) == 1, seen
    assert head.host_path("/tmp/written-by-the-driver").exists()
    assert [w.host_path("/tmp/written-by-a-task").exists() for w in workers] == [w in ran_on for w in workers]
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
    assert probe.stdout.strip() == "3", probe.stderr[-2000:]


@pytest.mark.slow
def test_kuberay_walks_a_rayjob_through_its_states_and_deleting_it_removes_the_cluster(tmp_path, pvc_folders):
    if why := clusterbox.available():
        pytest.skip(why)
    import kubeemu
    from clusterbox_kuberay import KubeRay

    rayjob, cm = rendered(sft_doc("walk"))
    for obj in (rayjob, cm):
        del obj["metadata"]["ownerReferences"]  # no PostTrainingJob here: the garbage collector would take them
    rayjob["spec"]["entrypoint"] = "python -c 'import time; print(\"up\", flush=True); time.sleep(600)'"
    with kubeemu.Cluster() as k8s, clusterbox.ClusterBox(tmp_path / "box", pvcs=pvc_folders) as box, \
            KubeRay(k8s, box) as kuberay:
        k8s.create(cm)
        created = k8s.create(rayjob)
        cluster = kuberay.wait_cluster("walk-r0", timeout=240)
        status = k8s.wait_for(lambda: (s := k8s.get(*kubeemu.RAYJOB, "default", "walk-r0")["status"]).get(
            "jobStatus") == "RUNNING" and s, timeout=120, what="jobStatus RUNNING")
        assert status["jobDeploymentStatus"] == "Running" and status["dashboardURL"] == cluster.dashboard_url
        assert status["jobId"].startswith("walk-r0-") and status["rayClusterName"] == cluster.name
        states = [(s.get("jobDeploymentStatus"), s.get("jobStatus")) for s in kuberay.runs["walk-r0"].statuses]
        assert states[:2] == [("Initializing", ""), ("Running", None)]  # Running (dashboardURL) before submitting
        assert [job for _, job in states[2:]] in (["RUNNING"], ["PENDING", "RUNNING"])  # as the dashboard reports
        assert "up" in kuberay.logs("walk-r0")
        raycluster = k8s.get(*kubeemu.RAYCLUSTER, "default", cluster.name)
        assert raycluster["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]

        k8s.delete(*kubeemu.RAYJOB, "default", "walk-r0")
        assert kuberay.runs["walk-r0"].torn_down.wait(60)
        assert all(not p.processes() for p in cluster.pods) and not cluster.folder.exists()
        assert k8s.find(*kubeemu.RAYCLUSTER, "default", cluster.name) is None
