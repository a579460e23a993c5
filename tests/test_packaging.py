"""pyproject.toml and requirements.txt describe one package: the Function installs the second, pip the first."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

import lb

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def test_the_package_declares_exactly_what_the_function_installs():
    assert PYPROJECT["project"]["dependencies"] == _requirements(ROOT / "requirements.txt")


def test_the_version_is_kept_in_lb_only():
    assert "version" not in PYPROJECT["project"] and PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lb.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", lb.__version__)


def test_mypy_and_the_test_layers_are_configured_where_make_and_ci_find_them():
    overrides = {tuple(o["module"]): o for o in PYPROJECT["tool"]["mypy"]["overrides"]}
    assert overrides[("lb.*",)]["disallow_untyped_defs"] is True
    markers = {m.split(":")[0] for m in PYPROJECT["tool"]["pytest"]["ini_options"]["markers"]}
    assert markers == {"e2e", "azurite", "bench"}
    assert PYPROJECT["tool"]["pytest"]["ini_options"]["filterwarnings"][0] == "error"
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\bcheck\b", makefile, re.M) and "typecheck:" in makefile and "test-unit:" in makefile
