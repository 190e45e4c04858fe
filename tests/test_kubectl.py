"""The real kubectl (.venv/bin/kubectl, v1.32) against the API emulator, used as a user would.

Run: `.venv/bin/python -m pytest tests/test_kubectl.py -q` (no cluster; about 30 s). Each test
starts a `kubeemu.Cluster`, runs kubectl with the kubeconfig the Cluster writes, and asserts
what kubectl prints and what the emulator stored.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import kubeemu
from support import REPO

EXAMPLE = REPO / "examples" / "sft-lora.yaml"
JOB = "sft-lora-chat"


def _kubectl_binary() -> str:
    path = Path(sys.executable).parent / "kubectl"
    found = str(path) if path.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl is missing: run `bash scripts/install-test-tools.sh`")
    return found


@pytest.fixture
def k8s():
    with kubeemu.Cluster() as cluster:
        yield cluster


@pytest.fixture
def kubectl(k8s, tmp_path):
    """`kubectl(*args, ok=True)`: run kubectl against `k8s`; fails the test on an unexpected exit code."""
    binary, cache = _kubectl_binary(), tmp_path / "kube-cache"

    def run(*args: str, ok: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([binary, "--kubeconfig", str(k8s.kubeconfig_path), "--cache-dir", str(cache), *args],
                              capture_output=True, text=True, timeout=60, input=stdin)
        if ok != (proc.returncode == 0):
            pytest.fail(f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def write(tmp_path: Path, name: str, doc: dict[str, Any]) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_create_namespace(k8s, kubectl):
    assert kubectl("create", "namespace", "team").stdout == "namespace/team created\n"  # a protobuf body
    ns = k8s.get("v1", "namespaces", None, "team")
    assert ns["status"]["phase"] == "Active" and ns["spec"]["finalizers"] == ["kubernetes"]
    assert kubectl("get", "namespaces", "-o", "name").stdout.split() == ["namespace/default", "namespace/team"]
    k8s.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}}, "team")
    assert kubectl("delete", "namespace", "team").stdout == 'namespace "team" deleted\n'  # waits until it is gone
    assert k8s.find("v1", "namespaces", None, "team") is None and k8s.find("v1", "configmaps", "team", "cm") is None


def test_apply_client_side_with_validation_on(k8s, kubectl, tmp_path):
    assert kubectl("apply", "-f", str(EXAMPLE)).stdout == f"posttrainingjob.posttrain.dev/{JOB} created\n"
    stored = k8s.get(*kubeemu.PTJ, "default", JOB)
    assert stored["spec"]["training"]["maxSteps"] == 200 and stored["spec"]["placement"] == "disaggregated"  # defaulted
    assert json.loads(stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])[
        "metadata"]["labels"] == {"team": "assistants"}

    relabelled = example()
    relabelled["metadata"]["labels"] = {"team": "research"}
    assert kubectl("apply", "-f", write(tmp_path, "relabel.yaml", relabelled)).stdout == \
        f"posttrainingjob.posttrain.dev/{JOB} configured\n"
    assert k8s.get(*kubeemu.PTJ, "default", JOB)["metadata"]["labels"] == {"team": "research"}

    # kubectl leaves validation to the server (fieldValidation=Strict), which refuses the unknown field.
    typo = example()
    typo["metadata"]["name"] = "typo"
    typo["spec"]["training"]["maxStep"] = 3
    proc = kubectl("apply", "-f", write(tmp_path, "typo.yaml", typo), ok=False)
    assert ('PostTrainingJob in version "v1alpha1" cannot be handled as a PostTrainingJob: strict decoding error: '
            'unknown field "spec.training.maxStep"') in proc.stderr
    assert k8s.find(*kubeemu.PTJ, "default", "typo") is None
    warned = kubectl("apply", "--validate=warn", "-f", write(tmp_path, "typo.yaml", typo))
    assert 'Warning: unknown field "spec.training.maxStep"' in warned.stderr
    assert "maxStep" not in k8s.get(*kubeemu.PTJ, "default", "typo")["spec"]["training"]  # pruned


def test_apply_server_side_creates_then_merges_with_managed_fields(k8s, kubectl, tmp_path):
    assert kubectl("apply", "--server-side", "-f", str(EXAMPLE)).stdout == \
        f"posttrainingjob.posttrain.dev/{JOB} serverside-applied\n"
    created = k8s.get(*kubeemu.PTJ, "default", JOB)
    (entry,) = created["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["fieldsType"]) == ("kubectl", "Apply", "FieldsV1")
    assert entry["fieldsV1"]["f:spec"]["f:training"]["f:maxSteps"] == {}
    assert "f:placement" not in entry["fieldsV1"]["f:spec"]  # a default is the server's, not kubectl's

    k8s.patch(*kubeemu.PTJ, "default", JOB, {"metadata": {"annotations": {"note": "set by someone else"}}})
    again = example()
    del again["metadata"]["labels"]  # no longer applied by kubectl: removed
    again["spec"]["suspend"] = True
    kubectl("apply", "--server-side", "-f", write(tmp_path, "again.yaml", again))
    merged = k8s.get(*kubeemu.PTJ, "default", JOB)
    assert "labels" not in merged["metadata"] or not merged["metadata"]["labels"]
    assert merged["metadata"]["annotations"] == {"note": "set by someone else"}  # not kubectl's field: kept
    assert merged["spec"]["suspend"] is True and merged["metadata"]["generation"] == 2
    assert merged["metadata"]["uid"] == created["metadata"]["uid"]


def test_get_shows_the_crds_printer_columns(k8s, kubectl):
    k8s.create(example())
    k8s.patch_status(*kubeemu.PTJ, "default", JOB, {"phase": "Running", "progress": {"step": 42, "reward": 0.61}})
    listed = kubectl("get", "ptj")
    assert listed.stderr == ""  # `ptj` names one resource: discovery lists posttrainingjobs/status without names
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "ALGORITHM", "MODEL", "PHASE", "STEP", "REWARD", "ACCURACY", "AGE"]
    assert row.split()[:6] == [JOB, "sft", "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "Running", "42", "0.61"]
    assert row.split()[6].endswith("s")  # an age: "0s", "1s"
    k8s.create(dict(example(), metadata={"name": "fresh"}))
    fresh = next(line for line in kubectl("get", "posttrainingjobs").stdout.splitlines() if line.startswith("fresh"))
    assert fresh.split()[1:3] == ["sft", "hf://HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert len(fresh.split()) == 4  # no status yet: Phase, Step and Reward are null cells, printed blank
    shown = yaml.safe_load(kubectl("get", "ptj", JOB, "-o", "yaml").stdout)
    assert shown["status"]["progress"] == {"step": 42, "reward": 0.61} and shown["spec"]["algorithm"] == "sft"


def test_get_watch_prints_a_row_per_change(k8s, kubectl, tmp_path):
    k8s.create(example())
    cmd = [_kubectl_binary(), "--kubeconfig", str(k8s.kubeconfig_path), "--cache-dir", str(tmp_path / "cache"),
           "get", "ptj", "--watch", "--request-timeout=20s"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as watching:
        try:
            assert watching.stdout.readline().split()[:4] == ["NAME", "ALGORITHM", "MODEL", "PHASE"]
            assert watching.stdout.readline().split()[0] == JOB
            k8s.patch_status(*kubeemu.PTJ, "default", JOB, {"phase": "Running"})
            assert watching.stdout.readline().split()[:4] == [JOB, "sft", "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
                                                              "Running"]
        finally:
            watching.terminate()


def test_server_side_dry_run_writes_nothing(k8s, kubectl):
    assert kubectl("apply", "--dry-run=server", "-f", str(EXAMPLE)).stdout == \
        f"posttrainingjob.posttrain.dev/{JOB} created (server dry run)\n"
    assert k8s.find(*kubeemu.PTJ, "default", JOB) is None
    kubectl("apply", "-f", str(EXAMPLE))
    kubectl("delete", "ptj", JOB, "--dry-run=server")
    kubectl("patch", "ptj", JOB, "--dry-run=server", "--type", "merge", "-p", '{"spec":{"suspend":true}}')
    assert k8s.get(*kubeemu.PTJ, "default", JOB)["spec"]["suspend"] is False


def test_describe_shows_the_job_and_its_events(k8s, kubectl):
    job = k8s.create(example())
    k8s.create({"apiVersion": "v1", "kind": "Event", "metadata": {"generateName": f"{JOB}-"}, "type": "Normal",
                "reason": "Provisioning", "message": "created RayJob sft-lora-chat-r0",
                "involvedObject": {"apiVersion": job["apiVersion"], "kind": job["kind"], "name": JOB,
                                   "namespace": "default", "uid": job["metadata"]["uid"]}})
    text = kubectl("describe", "ptj", JOB).stdout
    assert "Name:         sft-lora-chat" in text and "Algorithm:             sft" in text
    events = text.split("Events:", 1)[1].splitlines()
    assert events[1].split()[:2] == ["Type", "Reason"]
    assert "Provisioning" in events[3] and "created RayJob sft-lora-chat-r0" in events[3]


def test_explain_shows_our_field_descriptions(kubectl):
    schema = kubeemu.load_crd(kubeemu.PTJ_CRD)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    training = schema["properties"]["spec"]["properties"]["training"]
    text = kubectl("explain", "ptj.spec.training").stdout
    assert "KIND:       PostTrainingJob" in text and "FIELD: training <Object>" in text
    assert " ".join(training["description"].split()) in " ".join(text.split())  # kubectl wraps at 80 columns
    assert "maxSteps\t<integer>" in text and training["properties"]["maxSteps"]["description"] in text
    assert "lrScheduler\t<string>\n  enum: linear, cosine, constant, constant_with_warmup" in text


def test_an_immutable_field_patch_is_refused_by_the_cel_rule(k8s, kubectl):
    kubectl("apply", "-f", str(EXAMPLE))
    proc = kubectl("patch", "ptj", JOB, "--type", "merge", "-p", '{"spec":{"training":{"maxSteps":5}}}', ok=False)
    assert proc.stderr.strip() == (f'The PostTrainingJob "{JOB}" is invalid: spec.training: Invalid value: "object": '
                                   "spec.training cannot change after creation; create a new PostTrainingJob")
    assert k8s.get(*kubeemu.PTJ, "default", JOB)["spec"]["training"]["maxSteps"] == 200
    assert kubectl("patch", "ptj", JOB, "--type", "merge", "-p", '{"spec":{"suspend":true}}').stdout == \
        f"posttrainingjob.posttrain.dev/{JOB} patched\n"


def test_delete(k8s, kubectl):
    kubectl("apply", "-f", str(EXAMPLE))
    assert kubectl("delete", "ptj", JOB).stdout == f'posttrainingjob.posttrain.dev "{JOB}" deleted\n'
    assert k8s.find(*kubeemu.PTJ, "default", JOB) is None
    assert kubectl("get", "ptj", JOB, ok=False).stderr.strip() == \
        f'Error from server (NotFound): posttrainingjobs.posttrain.dev "{JOB}" not found'


def test_applying_a_newer_crd_defaults_and_shows_what_it_adds_on_stored_jobs(k8s, kubectl, tmp_path):
    kubectl("apply", "-f", str(EXAMPLE))
    newer = copy.deepcopy(dict(kubeemu.load_crd(kubeemu.PTJ_CRD)))
    version = newer["spec"]["versions"][0]
    version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["queue"] = {
        "type": "string", "default": "batch", "description": "Kueue queue of the job's pods."}
    version["additionalPrinterColumns"].insert(0, {"name": "Queue", "type": "string", "jsonPath": ".spec.queue"})
    assert "serverside-applied" in kubectl("apply", "--server-side", "-f", write(tmp_path, "crd.yaml", newer)).stdout
    assert kubectl("get", "ptj", JOB, "-o", "jsonpath={.spec.queue}").stdout == "batch"  # defaulted on read
    header, row = kubectl("get", "ptj").stdout.splitlines()
    assert header.split()[:3] == ["NAME", "QUEUE", "ALGORITHM"] and row.split()[:3] == [JOB, "batch", "sft"]
    assert "queue\t<string>" in kubectl("explain", "ptj.spec").stdout
    stored = k8s.emulator.objects[kubeemu.PTJ[0] + "/" + kubeemu.PTJ[1], "default", JOB]
    assert "queue" not in stored["spec"]  # storage is untouched: the server defaults what it reads
