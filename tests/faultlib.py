"""Helpers for the fault catalogue (`tests/test_faults_*.py`): run an entry point on bad input and check
that it fails cleanly (one `error:` line naming the problem, exit 1, no traceback) and changed nothing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}


def snapshot(*roots: Path) -> dict[str, str]:
    """{path: sha256} of every file under `roots` (a missing root is recorded as absent), except a run
    folder's `.lock`, whose holder line every run rewrites."""
    out = {}
    for root in map(Path, roots):
        if not root.exists():
            out[str(root)] = "absent"
            continue
        for f in sorted([root] if root.is_file() else root.rglob("*")):
            if f.is_file() and f.name != ".lock":
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def check_clean(rc: int, err: str, *needles: str) -> str:
    """Assert a clean failure: exit code 1, an `error:` line, no traceback, every needle in the message."""
    assert rc == 1, f"exit code {rc}; stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert lines, f"no 'error:' line in:\n{err[-3000:]}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err[-3000:]}"
    return err


def fails_in_process(main: Callable[[list[str]], int], argv: list[str], capsys, *needles: str,
                     keep: tuple[Path, ...] = ()) -> str:
    """Call a CLI's `main(argv)` in this process; check a clean failure naming `needles` and that nothing
    under `keep` changed. Returns stderr."""
    before = snapshot(*keep)
    rc = main(argv)
    err = capsys.readouterr().err
    check_clean(rc, err, *needles)
    assert snapshot(*keep) == before, "files changed on a failed run"
    return err


def run_cli(args: list[str], cwd: Path | str = REPO, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python ARGS` in a child process with the repository importable, from `cwd`."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def fails_in_child(args: list[str], *needles: str, cwd: Path | str = REPO, keep: tuple[Path, ...] = ()) -> str:
    """As `fails_in_process`, in a child process (for what only a fresh interpreter shows)."""
    before = snapshot(*keep)
    out = run_cli(args, cwd)
    check_clean(out.returncode, out.stderr, *needles)
    assert snapshot(*keep) == before, "files changed on a failed run"
    return out.stderr
