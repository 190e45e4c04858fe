"""Dependencies point one way: api <- operator, api <- jobs; the operator never pulls the training stack.

import-linter checks the contracts in `.importlinter`. The folders map onto
`posttrain.*` through setuptools' package-dir, which an editable install
serves with an import hook that import-linter cannot follow, so the test
lays the package out with symlinks first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SITE = next(p for p in sys.path if p.endswith("site-packages"))  # where PyYAML is, without running its .pth files


def test_import_contracts_hold(tmp_path):
    pkg = tmp_path / "posttrain"
    pkg.mkdir()
    for folder in ("api", "operator", "jobs"):
        (pkg / folder).symlink_to(REPO / folder)
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is a dev dependency; run `make test` to install it"
    result = subprocess.run([lint, "--config", str(REPO / ".importlinter"), "--no-cache"], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 kept, 0 broken" in result.stdout


def test_api_and_operator_import_without_the_training_stack():
    code = (
        "import sys; import posttrain.api.load, posttrain.api.crd, posttrain.operator.__main__; "
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'peft', 'trl') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_package_folder_is_listed_for_the_wheel():
    """setuptools' package-dir mapping needs each subpackage named; a missing one would be absent from images."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"posttrain.operator"}  # a namespace package on purpose (see the next test)
    for root in ("api", "operator", "jobs"):
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO)
            found.add(".".join(("posttrain", *rel.parts)))
    assert found == listed, f"pyproject packages {sorted(listed)} != package folders {sorted(found)}"


def test_the_operator_folder_does_not_shadow_the_standard_library_operator():
    """A Python started in the repo root puts the root first on sys.path: `operator/` must not be a regular
    package there, or it hides the standard module (`import yaml` then fails on `from operator import or_`).
    `-S` skips site-packages' .pth files, as a plain venv without our editable install would."""
    code = "import operator, yaml; print(operator.__file__); assert operator.or_(1, 2) == 3"
    result = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.append({SITE!r}); {code}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip().startswith(str(REPO)), result.stdout
    assert not (REPO / "operator" / "__init__.py").exists()
    # ... while posttrain.operator still imports, as a namespace package mapped onto the folder
    check = subprocess.run([sys.executable, "-c", "import posttrain.operator.vocab as v; print(v.__file__)"],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == str(REPO / "operator" / "vocab.py"), check.stderr
