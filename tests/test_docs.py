"""The manual (README.md and docs/) against the code it describes.

- README.md stays a short page; the manual lives in docs/ (built by ``mkdocs build --strict``).
- Every ``python -m search.<cli> ...`` command shown uses only flags that CLI's parser knows.
- The study reference lists exactly the fields of the study's pydantic models, and the export
  manifest reference exactly the fields of the manifest format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import re
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

# The study's models; the import path may move with the search/ subpackages.
from search.inputs import Study

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
STUDY_REFERENCE = DOCS / "reference" / "study.md"
MANIFEST_REFERENCE = DOCS / "reference" / "export-manifest.md"
MAX_README_LINES = 220
#: The command-line modules (``python -m search.<name>``).
CLIS = ("run", "export", "profile")

#: ``python -m search.<cli>`` followed by its arguments, up to the end of the line or of the
#: inline code span; a name followed by ``:`` is a program name in an error message.
_COMMAND = re.compile(r"python3?\s+-m\s+search\.(\w+)(?=[\s`]|$)([^\n`]*)")
_FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
#: Where a shell command ends: a comment, or the next command.
_COMMAND_END = re.compile(r"\s#|&&|\|\||;|\s\|\s")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _commands(path: Path) -> list[tuple[int, str, str]]:
    """``(line, cli, arguments)`` of every ``python -m search.<cli>`` command in a page."""
    text = path.read_text(encoding="utf-8")
    joined = text.replace("\\\n", "  ")  # line continuations; offsets stay the same
    out = []
    for m in _COMMAND.finditer(joined):
        args = _COMMAND_END.split(m.group(2), maxsplit=1)[0]
        out.append((text.count("\n", 0, m.start()) + 1, m.group(1), args))
    return out


def _parser_flags(cli: str) -> set[str]:
    """The option strings ``python -m search.<cli>`` accepts.

    From the module's ``build_parser()`` when it has one, else from the ``--help`` text of
    its ``main``.
    """
    module = importlib.import_module(f"search.{cli}")
    build = getattr(module, "build_parser", None)
    if callable(build):
        parser = build()
        return {s for action in parser._actions for s in action.option_strings}
    main = module.main
    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        main(["--help"])
    return set(_FLAG.findall(text.getvalue()))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move the detail into "
        "a page under docs/ and link it"
    )


def test_commands_use_known_flags():
    flags = {cli: _parser_flags(cli) for cli in CLIS}
    seen: set[str] = set()
    bad = []
    for page in _pages():
        for line, cli, args in _commands(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            if cli not in flags:
                bad.append(f"{where}: python -m search.{cli} is not a command ({', '.join(CLIS)})")
                continue
            seen.add(cli)
            for flag in _FLAG.findall(args):
                if flag.split("=", 1)[0] not in flags[cli]:
                    bad.append(f"{where}: python -m search.{cli} has no flag {flag}")
    assert not bad, "\n".join(bad)
    # The pattern must keep finding the commands, or this test checks nothing.
    assert seen == set(CLIS), f"no command shown for {sorted(set(CLIS) - seen)}"


def _documented(page: Path) -> set[str]:
    """The first cell (one backticked path) of every row of the page's ``field`` tables."""
    paths: set[str] = set()
    in_table = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            in_table = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "field":
            in_table = True
            continue
        m = re.fullmatch(r"`([\w.\[\]]+)`", cells[0])
        if in_table and m:
            paths.add(m.group(1))
    return paths


def _submodel(annotation: typing.Any) -> tuple[type[BaseModel], bool] | None:
    """The pydantic model inside an annotation, and whether it is the item of a list."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        found = _submodel(arg)
        if found is not None:
            model, in_list = found
            return model, in_list or origin is list
    return None


def _model_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every field path of a model, nested models included (``finetune.promote.front``)."""
    paths = set()
    for name, field in model.model_fields.items():
        path = prefix + name
        paths.add(path)
        found = _submodel(field.annotation)
        if found is not None:
            sub, in_list = found
            paths |= _model_paths(sub, path + ("[]." if in_list else "."))
    return paths


def test_study_reference_matches_the_models():
    documented = _documented(STUDY_REFERENCE)
    fields = _model_paths(Study)
    assert "finetune.promote.per_device" in fields and "anchors[].checkpoint" in fields
    missing = sorted(fields - documented)
    unknown = sorted(documented - fields)
    assert not missing, f"{STUDY_REFERENCE.relative_to(ROOT)} lacks study fields {missing}"
    assert not unknown, f"{STUDY_REFERENCE.relative_to(ROOT)} lists unknown fields {unknown}"


def _children(paths: set[str], parent: str) -> set[str]:
    """The direct children documented under ``parent`` (``""``: the top level)."""
    if not parent:
        return {p for p in paths if "." not in p}
    prefix = parent + "."
    return {p[len(prefix) :] for p in paths if p.startswith(prefix) and "." not in p[len(prefix) :]}


def test_manifest_reference_matches_the_format():
    from space.anchor import FeatureInfo
    from space.config import CANDIDATE_FIELDS, CANDIDATE_OPTIONAL_FIELDS
    from space.manifest import (
        ANCHOR_FIELDS,
        ANCHOR_OPTIONAL,
        DATA_FIELDS,
        DATA_OPTIONAL,
        MANIFEST_FIELDS,
        MANIFEST_OPTIONAL,
        METRIC_FIELDS,
        SPLIT_METRIC_FIELDS,
        STITCH_FIELDS,
    )

    manifest_format = importlib.import_module("space.manifest._format")
    metric_optional = getattr(manifest_format, "METRIC_OPTIONAL", frozenset())
    expected = {
        "": MANIFEST_FIELDS | MANIFEST_OPTIONAL,
        "candidate": frozenset().union(*CANDIDATE_FIELDS.values()) | CANDIDATE_OPTIONAL_FIELDS,
        "anchors[]": ANCHOR_FIELDS | ANCHOR_OPTIONAL | {"timm_kwargs"},
        "stitch": STITCH_FIELDS,
        "stitch.src": {f.name for f in dataclasses.fields(FeatureInfo)},
        "metrics": METRIC_FIELDS | metric_optional,
        "metrics.validation": SPLIT_METRIC_FIELDS,
        "data": DATA_FIELDS | DATA_OPTIONAL,
    }
    documented = _documented(MANIFEST_REFERENCE)
    bad = []
    for parent, fields in expected.items():
        shown = _children(documented, parent)
        name = parent or "the top level"
        if set(fields) - shown:
            bad.append(f"{name}: lacks {sorted(set(fields) - shown)}")
        if shown - set(fields):
            bad.append(f"{name}: lists unknown {sorted(shown - set(fields))}")
    assert not bad, f"{MANIFEST_REFERENCE.relative_to(ROOT)}: " + "; ".join(bad)


def test_pages_are_in_the_nav():
    """Every page under docs/ is reachable from mkdocs.yml's nav (and every nav entry exists)."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", config, flags=re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert nav == pages, f"not in nav: {sorted(pages - nav)}; missing files: {sorted(nav - pages)}"


def test_study_walk_sees_nested_models():
    """The walk above finds models inside ``X | None``, ``list[X]`` and plain annotations."""

    class Inner(BaseModel):
        a: int = 0

    class Outer(BaseModel):
        one: Inner
        maybe: Inner | None = None
        many: list[Inner] = []
        plain: int = 0

    assert _model_paths(Outer) == {
        "one",
        "one.a",
        "maybe",
        "maybe.a",
        "many",
        "many[].a",
        "plain",
    }
