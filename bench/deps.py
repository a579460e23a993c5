"""Installs the benchmarks' own tools (requirements-bench.txt) into the running venv on first use.

They are not in requirements-dev.txt because `make test` times nothing and needs neither; one
`python -m bench all` on a fresh `make install` must still just work.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from bench.procs import ROOT

REQUIREMENTS = ROOT / "requirements-bench.txt"


def _install() -> None:
    print(f"(installing {REQUIREMENTS.name} into {sys.prefix})", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)


def ensure_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        _install()


def py_spy() -> str:
    """Path of the py-spy executable of this venv (or on PATH), installing it if missing."""
    local = Path(sys.executable).parent / "py-spy"
    found = str(local) if local.exists() else shutil.which("py-spy")
    if found is None:
        _install()
        found = str(local)
    return found
