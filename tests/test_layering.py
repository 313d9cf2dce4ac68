"""The dependency rule, node -> proto <- router, checked on the source: no module of one side imports the
other, and node/ and proto/ never import torch, transformers or onnx."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "node": ("faasmoe.router", "torch", "transformers", "onnx"),
    "proto": ("faasmoe.router", "faasmoe.node", "torch", "transformers", "onnx"),
    "router": ("faasmoe.node",),
}


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_no_forbidden_imports(folder):
    assert len(list((REPO / folder).rglob("*.py"))) > 3
    offenders = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for name in imported_modules(path):
            if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN[folder]):
                offenders.append(f"{path.relative_to(REPO)} imports {name}")
    assert not offenders, "; ".join(offenders)


def test_every_package_is_in_the_wheel():
    """pyproject lists the packages explicitly: a sub-package missing there is missing from every wheel."""
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    roots = {"node": "faasmoe.node", "router": "faasmoe.router", "proto": "faasmoe.proto"}
    found = {roots[init.relative_to(REPO).parts[0]] + "".join("." + p for p in init.parent.relative_to(REPO).parts[1:])
             for root in roots for init in (REPO / root).rglob("__init__.py") if "__pycache__" not in init.parts}
    assert found <= listed, f"missing from pyproject's packages: {sorted(found - listed)}"
