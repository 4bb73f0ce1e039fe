"""Imports point one way (search -> evaluators -> space), and space/ imports at module level."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SPACE = Path(__file__).resolve().parents[2] / "space"
FILES = sorted(SPACE.rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[ast.stmt, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append((node, node.module or ""))
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SPACE)))
def test_space_imports_neither_evaluators_nor_search(path: Path) -> None:
    for _, module in _imports(ast.parse(path.read_text())):
        assert module.split(".")[0] not in ("evaluators", "search", "tools"), (path, module)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SPACE)))
def test_space_imports_only_at_module_level(path: Path) -> None:
    tree = ast.parse(path.read_text())
    allowed = {id(s) for s in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks hold type-only imports
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            allowed |= {id(s) for s in node.body}
    for node, module in _imports(tree):
        assert id(node) in allowed, f"{path}:{node.lineno}: function-local import of {module}"
