"""The package structure: imports point one way, no cycles, one owner of Optuna internals.

Walks the source with :mod:`ast` (nothing is imported), so a violation fails here with the
offending module named, before it turns into an import error at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("space", "evaluators", "search", "tools")
#: What each package may import from the project (besides itself).
ALLOWED = {
    "space": set(),
    "evaluators": {"space"},
    "search": {"evaluators", "space"},
    "tools": {"evaluators", "space"},
}
#: Optuna's storage internals; only this module may touch them.
OPTUNA_INTERNALS = {"_storage", "_study_id", "_trial_id"}
OPTUNA_ADAPTER = "search.optuna_access"


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (``space.anchor.load_anchor`` -> ``space.anchor``)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in MODULES:
            return candidate
    return None


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported project module, line, at module level)`` for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    for node in tree.body:  # ``if TYPE_CHECKING:`` blocks count as module level
        if isinstance(node, ast.If):
            top |= {id(n) for n in node.body}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{a.name}" for a in node.names] or [base]
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                out.append((target, node.lineno, id(node) in top))
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_the_walk_sees_the_project() -> None:
    assert {"space.anchor", "evaluators.cka", "search.run", "search.trials"} <= MODULES.keys()
    assert any(t == "space" for t, _, _ in GRAPH["search.plan"])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module: str) -> None:
    pkg = module.split(".")[0]
    bad = [
        f"{module}:{line} imports {target}"
        for target, line, _ in GRAPH[module]
        if target.split(".")[0] not in ALLOWED[pkg] | {pkg}
    ]
    assert not bad, "; ".join(bad)


def test_no_import_cycles() -> None:
    """No cycle among project modules, counting function-local imports too."""
    edges = {m: sorted({t for t, _, _ in imports}) for m, imports in GRAPH.items()}
    # A package's __init__ re-exports its modules; an edge into a package means its modules.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                if t in stack and not (m.startswith(t + ".") and "." not in t):
                    return [*stack[stack.index(t) :], t]
            elif t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, " -> ".join(cycle)


def test_project_imports_are_at_module_level() -> None:
    """Function-local imports of project modules hide cycles; there are none."""
    local = [
        f"{m}:{line} imports {t} inside a function"
        for m, imports in GRAPH.items()
        for t, line, top in imports
        if not top
    ]
    assert not local, "; ".join(local)


def test_only_the_adapter_touches_optuna_internals() -> None:
    bad = []
    for module, path in MODULES.items():
        if module == OPTUNA_ADAPTER:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in OPTUNA_INTERNALS:
                bad.append(f"{module}:{node.lineno} uses .{node.attr}")
    assert not bad, "; ".join(bad)


def test_benchmarks_use_public_names_only() -> None:
    bad = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _resolve(node.module or ""):
                bad += [
                    f"{path.name}:{node.lineno} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_")
                ]
    assert not bad, "; ".join(bad)


def test_no_private_module_is_imported_from_another_package() -> None:
    """``pkg._private`` modules serve their own package only."""
    bad = [
        f"{m}:{line} imports {t}"
        for m, imports in GRAPH.items()
        for t, line, _ in imports
        if any(p.startswith("_") and not p.startswith("__") for p in t.split("."))
        and t.split(".")[0] != m.split(".")[0]
    ]
    assert not bad, "; ".join(bad)
