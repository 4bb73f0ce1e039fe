"""The package structure: imports point one way, no cycles, one owner of Optuna internals.

Walks the source with :mod:`ast` (nothing is imported), so a violation fails here with the
offending module named, before it turns into an import error at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("space", "evaluators", "search", "tools", "benchmarks")
#: What each package may import from the project (besides itself).
ALLOWED = {
    "space": set(),
    "evaluators": {"space"},
    "search": {"evaluators", "space"},
    "tools": {"evaluators", "space"},
    "benchmarks": {"search", "evaluators", "space", "tools"},
}
#: The layers of ``search``, lowest first: a subpackage imports only those before it (and
#: ``space`` and ``evaluators``); the commands on top (``search.run``, ``search.export``,
#: ``search.profile``) may import any of them.
SEARCH_LAYERS = (
    "search.core",
    "search.inputs",
    "search.store",
    "search.strategy",
    "search.workers",
    "search.execution",
    "search.delivery",
)
SEARCH_COMMANDS = {"search.run", "search.export", "search.profile"}
#: Modules another layer may import directly instead of through their package's face, and
#: why: the face of ``search.workers`` stays free of torch so that Ray's worker processes
#: do not load it; the evaluation process's module (its ``TrialContext``) and the family's
#: Ray Train loop, which both import torch, are imported directly.
FACE_EXEMPT = {"search.workers.evaluation", "search.workers.family"}
#: Optuna's storage internals; only this module may touch them.
OPTUNA_INTERNALS = {"_storage", "_study_id", "_trial_id"}
OPTUNA_ADAPTER = "search.store.optuna_access"
#: The benchmarks' library; its face is all the scripts import of ``benchmarks``.
BENCHMARK_LIB = "benchmarks.lib"


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
    assert {"space.anchor", "evaluators.cka", "search.run", "search.core.trials"} <= MODULES.keys()
    assert {"benchmarks.run_all", "benchmarks.bench_search", BENCHMARK_LIB} <= MODULES.keys()
    assert any(t == "space" for t, _, _ in GRAPH["search.inputs.plan"])
    assert {m for m in MODULES if m.count(".") == 1 and m.startswith("search.")} == (
        set(SEARCH_LAYERS) | SEARCH_COMMANDS
    ), "a search module outside the layers: put it in one (and in SEARCH_LAYERS)"


def _face_all(face: str) -> set[str]:
    """The names a face lists in ``__all__``."""
    for node in ast.parse(MODULES[face].read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    return set()


def _face_modules(face: str) -> set[str]:
    """Modules a face exports as such (``from search.store import optuna_access``)."""
    return {f"{face}.{name}" for name in _face_all(face) if f"{face}.{name}" in MODULES}


def _layer(module: str) -> str | None:
    """The search layer a module belongs to (``search.core.trials`` -> ``search.core``)."""
    return next((p for p in SEARCH_LAYERS if module == p or module.startswith(p + ".")), None)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m)))
def test_search_layers_import_downwards_through_faces(module: str) -> None:
    """A layer imports lower layers only, through their faces (``search.core``)."""
    own = _layer(module)
    assert own is not None
    below = set(SEARCH_LAYERS[: SEARCH_LAYERS.index(own)])
    bad = []
    for target, line, _ in GRAPH[module]:
        theirs = _layer(target)
        if target in SEARCH_COMMANDS or target == "search":
            bad.append(f"{module}:{line} imports the command or package {target}")
        elif theirs is None or theirs == own:
            continue
        elif theirs not in below:
            bad.append(f"{module}:{line} imports {target}, a layer above or beside {own}")
        elif target != theirs and target not in FACE_EXEMPT | _face_modules(theirs):
            bad.append(f"{module}:{line} imports {target}; import it from its face {theirs}")
    assert not bad, "; ".join(bad)


def test_the_commands_are_thin() -> None:
    """The commands import the layers' faces, never one another or a layer's modules."""
    bad = [
        f"{cmd}:{line} imports {target}"
        for cmd in SEARCH_COMMANDS
        for target, line, _ in GRAPH[cmd]
        if target in SEARCH_COMMANDS or (_layer(target) and target != _layer(target))
    ]
    assert not bad, "; ".join(bad)


def test_ray_workers_do_not_load_torch() -> None:
    """``search.workers``' face and its Ray-side module import nothing of the project."""
    for module in ("search", "search.workers", "search.workers.ray_worker"):
        reached = {t for t, _, _ in GRAPH[module]} - {"search.workers.ray_worker"}
        assert not reached, f"{module} imports {sorted(reached)}"


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


def test_faces_export_what_they_import() -> None:
    """Every layer's ``__init__`` lists in ``__all__`` each name it imports."""
    bad = []
    for face in SEARCH_LAYERS:
        tree = ast.parse(MODULES[face].read_text())
        imported = {
            a.asname or a.name
            for node in tree.body
            if isinstance(node, ast.ImportFrom)
            for a in node.names
        }
        listed = _face_all(face)
        if imported != listed:
            bad.append(
                f"{face}: imported {sorted(imported - listed)}, listed {sorted(listed - imported)}"
            )
    assert not bad, "; ".join(bad)


def _is_benchmark_lib(module: str) -> bool:
    return module == BENCHMARK_LIB or module.startswith(BENCHMARK_LIB + ".")


#: What the benchmarks may import from the other packages: their public faces and the commands
#: (``tools`` modules by name).
BENCHMARK_FACES = {"space", "evaluators", "evaluators.data", *SEARCH_LAYERS, *SEARCH_COMMANDS}
BENCHMARK_MODULES = sorted(m for m in MODULES if m.split(".")[0] == "benchmarks")


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_benchmarks_import_public_faces_only(module: str) -> None:
    """``space``, ``evaluators``, ``evaluators.data``, the search layers' faces, the commands
    and ``tools.<module>``; never a layer's module (``search.core.trials``)."""
    bad = [
        f"{module}:{line} imports {target}; import it from its face"
        for target, line, _ in GRAPH[module]
        if target.split(".")[0] != "benchmarks"
        and target not in BENCHMARK_FACES
        and not (target.startswith("tools.") and target.count(".") == 1)
    ]
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_bench_scripts_share_code_through_the_library_only(module: str) -> None:
    """A script imports ``benchmarks.lib`` (its face), never another script; the library's
    modules import one another, never a script."""
    bad = []
    for target, line, _ in GRAPH[module]:
        if target.split(".")[0] != "benchmarks" or target == BENCHMARK_LIB:
            continue
        if not (_is_benchmark_lib(module) and _is_benchmark_lib(target)):
            bad.append(f"{module}:{line} imports {target}; share it through {BENCHMARK_LIB}")
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_benchmarks_use_public_names_only(module: str) -> None:
    """No name starting with ``_`` from another project module."""
    bad = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.ImportFrom) and _resolve(node.module or ""):
            bad += [
                f"{module}:{node.lineno} imports {node.module}.{a.name}"
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
