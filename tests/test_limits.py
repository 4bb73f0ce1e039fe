"""Size limits: modules and functions stay small enough to read, or say why they are not.

Walks the source with :mod:`ast` (nothing is imported). A module longer than its package's
module limit, or a function or method longer than the function limit (``def`` line to last
line, docstring included, decorators not), fails here with its place named, unless its own
docstring has a line that starts with :data:`MARKER` followed by the reason it is longer.
A marker on something within its limit fails too, so that no stale reason stays behind.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Package -> (most lines of a module, most lines of a function or method).
LIMITS: dict[str, tuple[int, int]] = {
    "space": (500, 100),
    "evaluators": (500, 100),
    "tools": (500, 100),
    "search": (500, 100),
    "benchmarks": (600, 100),
}
#: A docstring line starting with this, then the reason, allows a longer module or function.
MARKER = "Size:"

Function = ast.FunctionDef | ast.AsyncFunctionDef


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LIMITS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            out[".".join(path.relative_to(ROOT).with_suffix("").parts)] = path
    return out


MODULES = _modules()


def size_reason(node: ast.Module | Function) -> str | None:
    """The reason after :data:`MARKER` in a docstring line, or None (no marker, no reason)."""
    for line in (ast.get_docstring(node) or "").splitlines():
        text = line.strip()
        if text.startswith(MARKER) and text[len(MARKER) :].strip():
            return text[len(MARKER) :].strip()
    return None


def size_problems(source: str, module_limit: int, function_limit: int) -> list[str]:
    """``"<line>: <what>"`` for every part of ``source`` over its limit without a reason.

    Also lists every reason given where none is needed.
    """
    tree = ast.parse(source)
    parts: list[tuple[str, ast.Module | Function, int, int]] = [
        ("module", tree, len(source.splitlines()), module_limit)
    ]
    for node in ast.walk(tree):
        if isinstance(node, Function):
            length = node.end_lineno - node.lineno + 1
            parts.append((f"{node.lineno}: {node.name}()", node, length, function_limit))
    problems = []
    for what, node, length, limit in parts:
        reason = size_reason(node)
        if length > limit and reason is None:
            problems.append(
                f"{what} has {length} lines, more than {limit}: split it by job, or say why "
                f"in a docstring line starting with {MARKER!r}"
            )
        elif length <= limit and reason is not None:
            problems.append(f"{what} has {length} lines, within {limit}: drop its {MARKER!r} line")
    return problems


def test_the_walk_sees_the_packages() -> None:
    assert {"space.anchor", "evaluators.cka", "evaluators.data.images"} <= MODULES.keys()
    assert {m.split(".")[0] for m in MODULES} == set(LIMITS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_are_within_their_limits(module: str) -> None:
    module_limit, function_limit = LIMITS[module.split(".")[0]]
    problems = size_problems(MODULES[module].read_text(), module_limit, function_limit)
    assert not problems, f"{MODULES[module].relative_to(ROOT)}: " + "; ".join(problems)


def _function(lines: int, doc: str) -> str:
    body = "\n".join("    x = 1" for _ in range(lines - 2))
    return f'def f():\n    """{doc}"""\n{body}\n'


def test_only_the_marker_with_a_reason_allows_more() -> None:
    assert size_problems(_function(10, "Short."), 500, 10) == []
    assert len(size_problems(_function(11, "Short."), 500, 10)) == 1
    prose = "It is longer than the limit because it must be.\n\n    Args: none."
    assert len(size_problems(_function(12, prose), 500, 10)) == 1
    assert len(size_problems(_function(12, "Long.\n\n    Size:\n    "), 500, 10)) == 1
    marked = "Long.\n\n    Size: one table of 12 cases reads best in one place.\n    "
    assert size_problems(_function(13, marked), 500, 10) == []
    assert len(size_problems(_function(3, marked), 500, 10)) == 1  # a stale reason


def test_the_module_docstring_speaks_for_the_module() -> None:
    marked = '"""A module.\n\nSize: a generated table.\n"""\n' + "x = 1\n" * 8
    assert size_problems(marked, 10, 100) == []
    assert len(size_problems(marked.replace("Size:", "Note:"), 10, 100)) == 1
