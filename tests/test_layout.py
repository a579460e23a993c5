"""The package's one-way flow, checked from the source: proxy -> objects / routing / metering -> attempt.

No module imports another's private names, no test reads or calls a private attribute (tests drive
lb through the names its modules publish), and the object router never reaches back into the proxy:
both policies go through `lb.attempt`'s public surface.
"""

from __future__ import annotations

import ast
from pathlib import Path

LB = Path(__file__).resolve().parent.parent / "lb"
TESTS = Path(__file__).resolve().parent
# Private attributes of what is not lb that a test may use, spelled as in the source.
NOT_LB = {"sys._getframe"}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text())
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lb"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names if a.name.startswith("lb"))
    return found


def test_no_module_imports_another_modules_private_names():
    private = [
        f"{path.relative_to(LB.parent)}: from {module} import {name}"
        for path in LB.rglob("*.py")
        for module, names in _imports(path)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert private == []


def test_no_test_uses_a_private_attribute():
    # Types are not known from the source, so every `x._name` counts (stricter than "of lb objects"),
    # except on `self` or `cls`: a test's own helper class may use its own private names.
    private = [
        f"{path.relative_to(TESTS.parent)}:{node.lineno}: {ast.unparse(node)}"
        for path in TESTS.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        and ast.unparse(node) not in NOT_LB
    ]
    assert private == []


def test_the_object_path_and_the_attempt_never_import_the_proxy():
    for path in [*(LB / "objects").rglob("*.py"), LB / "attempt.py"]:
        assert all(module != "lb.proxy" for module, _ in _imports(path)), path
