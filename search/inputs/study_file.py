"""Reading a study YAML file: size and alias limits, plain YAML only, one-line errors.

Errors name the file and the field.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from search.inputs.study import Study, StudyError


def _field_path(loc: tuple[Any, ...], data: Any) -> str:
    parts = []
    node = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list):
            parts.append(f"[{item}]")
            node = node[item] if item < len(node) else None
        elif isinstance(item, str) and item in ("function-after", "function-before"):
            continue
        else:
            if isinstance(item, str) and item.startswith(("function-", "tagged-union")):
                continue
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "<top level>"


def _value_at(loc: tuple[Any, ...], data: Any) -> Any:
    node = data
    for item in loc:
        in_dict = isinstance(node, dict) and item in node
        in_list = isinstance(node, list) and isinstance(item, int) and item < len(node)
        if in_dict or in_list:
            node = node[item]
        else:
            return None
    return node


def parse_study(data: Any, *, source: str = "<study>") -> Study:
    """Validates a study definition given as a mapping.

    Raises:
        StudyError: One line naming ``source`` and the first bad field.
    """
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study must be a YAML mapping, got {type(data).__name__}")
    try:
        return Study.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err.get("loc", ()))
        field = _field_path(loc, data)
        msg = re.sub(r"^Value error, ", "", err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            allowed = _allowed_fields(loc[:-1])
            msg = "unknown field" + (f"; known fields: {', '.join(allowed)}" if allowed else "")
        if not loc:  # a check across fields; its message starts with the field it is about
            about = re.match(r"^([a-z_]+(?:\[\d+\])?(?:\.[a-z_]+)+) |^(objective) '", msg)
            if about:
                field = about.group(1) or "objectives"
        # A check across fields echoes its values itself, not the whole study.
        value = _value_at(loc, data) if loc else None
        shown = f" (got {value!r})" if value is not None and err.get("type") != "missing" else ""
        raise StudyError(f"{source}: field '{field}': {msg}{shown}") from None


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Study
    for item in loc:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(str(item))
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


#: The largest study YAML read, and the most values its aliases may expand to (a study
#: holds a few dozen; an "alias bomb" of a few lines expands to billions).
MAX_STUDY_BYTES = 1 << 20
MAX_STUDY_VALUES = 100_000


def _expanded_size(root: yaml.Node | None) -> int:
    """How many values a YAML node graph holds once every alias is expanded (capped)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_STUDY_VALUES + 1  # a recursive alias expands forever
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        sizes[id(node)] = n = min(n, MAX_STUDY_VALUES + 1)
        return n

    return 0 if root is None else size(root)


def load_study(path: str | Path) -> Study:
    """Reads and validates a study YAML file.

    Raises:
        StudyError: Missing/unreadable file, bad YAML, or an invalid field.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(
            f"study file {str(path)!r} does not exist; pass --study PATH to a YAML file "
            "(see studies/default.yaml)"
        )
    size = path.stat().st_size
    if size > MAX_STUDY_BYTES:
        raise StudyError(
            f"{path}: the file is {size / 2**20:.1f} MiB; a study YAML is at most "
            f"{MAX_STUDY_BYTES // 2**20} MiB: pass the study definition, not a data file"
        )
    try:
        text = path.read_text(encoding="utf-8")
        values = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if values > MAX_STUDY_VALUES:
            raise StudyError(
                f"{path}: its aliases (*name) expand to more than {MAX_STUDY_VALUES} values; "
                "write the study without deeply nested aliases"
            )
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "constructor for the tag" in problem:
            problem += "; study files are plain YAML: remove the tag"
        raise StudyError(f"{path}{where}: invalid YAML ({problem})") from None
    return parse_study(data, source=str(path))
