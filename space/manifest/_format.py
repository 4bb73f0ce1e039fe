"""The export format's vocabulary: version, field lists, :class:`ExportError` and field checks.

Shared by the manifest (:mod:`space.manifest`) and the switchable-network files
(:mod:`space.switchable`), which record anchors and cuts the same way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from space.anchor import FeatureInfo
from space.errors import InputError

#: The manifest format (written by ``search.delivery.write_export``, read here).
EXPORT_FORMAT = "stitchsearch-export/1"

#: Top-level manifest fields; all are required.
MANIFEST_FIELDS = frozenset(
    {
        "format",
        "final",
        "device",
        "budget",
        "headroom",
        "candidate",
        "label",
        "anchors",
        "stitch",
        "metrics",
        "data",
        "fit",
        "study",
        "created",
    }
)
#: Top-level fields a manifest may have in addition (none yet; add new ones here).
MANIFEST_OPTIONAL: frozenset[str] = frozenset()
#: Fields of an ``anchors`` record (``timm_kwargs`` is required too unless it is a zoo anchor).
ANCHOR_FIELDS = frozenset(
    {
        "role",
        "name",
        "family",
        "num_blocks",
        "input_size",
        "num_classes",
        "checkpoint",
        "checkpoint_sha256",
        "pretrained",
    }
)
#: Optional: ``weights_sha256`` (Anchor.weights_sha256), verified when present; it makes an
#: anchor without checkpoint (a seeded random initialisation) rebuildable. ``trained``: the
#: anchor was trained with its family, ``{"weights": file, "sha256": ...}`` (the other fields
#: say what it started from).
#: ``id``: the anchor's id (what the candidate calls it) when the study gave one; ``name``
#: is then the timm (or zoo) name it is built from. Exports written before ids had no
#: ``id``: the id is the name.
ANCHOR_OPTIONAL = frozenset({"weights_sha256", "trained", "id"})
#: Fields of an anchor record's ``trained``.
TRAINED_FIELDS = frozenset({"weights", "sha256"})
#: Fields of the ``stitch`` record.
STITCH_FIELDS = frozenset({"layer", "weights", "sha256", "src", "dst"})
#: Fields of ``metrics``; ``validation``, ``validation_remeasured`` and ``test`` hold
#: :data:`SPLIT_METRIC_FIELDS`.
METRIC_FIELDS = frozenset(
    {
        "validation",
        "validation_remeasured",
        "test",
        "macs",
        "params",
        "latency_ms",
        "memory_mb",
        "cka",
    }
)
#: Optional fields of ``metrics``: ``latency`` says where ``latency_ms`` comes from
#: (``{"source": "latency table" | "host-measured", "host_ms": ..., "table": {...}}``, the
#: table's identity when predicted from a device latency table); ``measure`` says what
#: ``top1``/``top5`` measure in a label-free study (``"agreement with <teacher>"``; absent:
#: accuracy).
METRIC_OPTIONAL = frozenset({"latency", "measure"})
SPLIT_METRIC_FIELDS = frozenset({"top1", "top5"})
#: Required fields of ``data``.
DATA_FIELDS = frozenset({"name", "identity", "validation_images", "test_images", "input_size"})
#: Optional fields of ``data``: they make ``--check`` exact in more cases; ``recipe`` is the
#: dataset factory's recipe (a JSON object opaque to space).
DATA_OPTIONAL = frozenset({"calibration_images", "batch_size", "seed", "recipe"})

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ExportError(InputError):
    """An export (manifest or one of its files) is invalid, missing or altered.

    ``str(err)`` is one line: ``export '<file>': field '<field>': <problem>; <fix>``.

    Attributes:
        path: The manifest.
        field: The manifest field at fault (``"anchors[1].checkpoint_sha256"``), or None.
        problem: What is wrong.
        fix: How to fix it, or None.
    """

    def __init__(
        self, path: str | Path, problem: str, *, field: str | None = None, fix: str | None = None
    ) -> None:
        self.path = Path(path)
        self.field = field
        self.problem = problem = " ".join(str(problem).split("\n"))
        self.fix = fix
        text = f"export {str(self.path)!r}"
        if field is not None:
            text += f": field {field!r}"
        text += f": {problem}"
        if fix:
            text += f"; {fix}"
        super().__init__(text)

    def __reduce__(self):
        return (_rebuild_error, (self.path, self.problem, self.field, self.fix))


def _rebuild_error(path: Path, problem: str, field: str | None, fix: str | None) -> ExportError:
    return ExportError(path, problem, field=field, fix=fix)


def read_json_object(path: Path) -> dict[str, Any]:
    """Reads a JSON file that must hold an object (a manifest or a switchable network).

    Raises:
        ExportError: Missing or unreadable file, invalid JSON, or not an object.
    """
    if not path.exists():
        raise ExportError(path, "no such file", fix="pass the path of exports/<device>.json")
    if not path.is_file():
        raise ExportError(path, "is not a file", fix="pass the path of exports/<device>.json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ExportError(
            path,
            "is not UTF-8 text: damaged, or not an export manifest",
            fix="restore the file written by stitchsearch (exports/<device>.json)",
        ) from None
    except OSError as e:
        raise ExportError(path, f"cannot be read ({e.strerror or e})") from None
    return parse_json(text, path)


def parse_json(text: str, path: Path) -> dict[str, Any]:
    """Parses JSON text that must hold an object; ``path`` names it in errors."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ExportError(
            path,
            f"not valid JSON (line {e.lineno} column {e.colno}: {e.msg})",
            fix="restore the file written by stitchsearch",
        ) from None
    if not isinstance(doc, dict):
        raise ExportError(path, f"must be a JSON object, got a {type(doc).__name__}")
    return doc


def check_fields(
    path: Path,
    obj: Any,
    required: frozenset[str],
    where: str | None,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Checks that a manifest section is a mapping with exactly the expected keys.

    Args:
        path: The manifest (for the message).
        obj: The section.
        required: Keys it must have.
        where: The section's field name (``"stitch"``), or None for the top level.
        optional: Keys it may have.

    Raises:
        ExportError: Not a mapping, or a missing or unknown key (named in the message).
    """
    if not isinstance(obj, Mapping):
        raise ExportError(path, f"must be a JSON object, got {obj!r}", field=where)
    missing = sorted(required - obj.keys())
    unknown = sorted(obj.keys() - required - optional)
    if missing:
        name = missing[0] if where is None else f"{where}.{missing[0]}"
        more = f" (also missing: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ExportError(
            path,
            f"missing{more}",
            field=name,
            fix=f"{where or 'the manifest'} must have {', '.join(sorted(required))}",
        )
    if unknown:
        name = unknown[0] if where is None else f"{where}.{unknown[0]}"
        more = f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise ExportError(
            path,
            f"unknown field{more}",
            field=name,
            fix=f"{where or 'the manifest'} has only {', '.join(sorted(required | optional))} in "
            f"format {EXPORT_FORMAT}; remove it or use the stitchsearch version that wrote the "
            "export",
        )


_KINDS = {
    "int": "an integer >= 0",
    "pos_int": "an integer > 0",
    "str": "a non-empty string",
    "str|null": "a non-empty string or null",
    "bool": "true or false",
    "sha256": "a SHA-256 hex digest (64 lowercase hex digits)",
    "sha256|null": "a SHA-256 hex digest or null",
}


def expect(path: Path, value: Any, kind: str, field: str) -> Any:
    """Checks one value's type and returns it.

    ``kind`` is one of int, pos_int, str, str|null, bool, sha256 or sha256|null.

    Raises:
        ExportError: The value is not of that kind.
    """
    is_int = isinstance(value, int) and not isinstance(value, bool)
    is_str = isinstance(value, str) and bool(value)
    is_sha = isinstance(value, str) and bool(_SHA256.match(value))
    ok = {
        "int": is_int and value >= 0,
        "pos_int": is_int and value > 0,
        "str": is_str,
        "str|null": value is None or is_str,
        "bool": isinstance(value, bool),
        "sha256": is_sha,
        "sha256|null": value is None or is_sha,
    }[kind]
    if not ok:
        raise ExportError(path, f"must be {_KINDS[kind]}, got {value!r}", field=field)
    return value


def check_weights_name(path: Path, name: Any, field: str) -> str:
    """Checks a weights file name as written: relative, inside the folder, ``.safetensors``.

    Where the name resolves to on disk is checked when the file is read
    (:func:`space.artifact.weights_path`).

    Raises:
        ExportError: Not a file name, absolute, leaving the folder, or not ``.safetensors``.
    """
    if not isinstance(name, str) or not name:
        raise ExportError(path, f"must be a file name, got {name!r}", field=field)
    fix = "give the weights' file name relative to the export's folder, e.g. 'edge.safetensors'"
    if (
        PurePosixPath(name).is_absolute()
        or PureWindowsPath(name).is_absolute()
        or PureWindowsPath(name).drive
    ):
        raise ExportError(path, f"is an absolute path ({name!r})", field=field, fix=fix)
    if ".." in PureWindowsPath(name).parts:  # splits on both / and \
        raise ExportError(path, f"leaves the export's folder ({name!r})", field=field, fix=fix)
    if not name.endswith(".safetensors"):
        raise ExportError(
            path,
            f"must be a .safetensors file, got {name!r} (other formats could carry pickled code)",
            field=field,
        )
    return name


def feature_info_from(path: Path, raw: Any, where: str) -> FeatureInfo:
    """Parses a recorded cut (``stitch.src``, ``stitch.dst``).

    Raises:
        ExportError: Missing or unknown fields, or invalid values.
    """
    names = frozenset(f.name for f in dataclasses.fields(FeatureInfo))
    check_fields(path, raw, names, where)
    if raw["layout"] not in ("NCHW", "NLC"):
        raise ExportError(
            path, f"must be 'NCHW' or 'NLC', got {raw['layout']!r}", field=f"{where}.layout"
        )
    for key in ("channels", "height", "width"):
        expect(path, raw[key], "pos_int", f"{where}.{key}")
    expect(path, raw["num_prefix_tokens"], "int", f"{where}.num_prefix_tokens")
    return FeatureInfo(**raw)


def number(path: Path, value: Any, where: str) -> float | None:
    """Checks a metric: a finite number or null (``where`` is its field). Returns it."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ExportError(path, f"must be a finite number or null, got {value!r}", field=where)
    return value


def count(path: Path, value: Any, where: str) -> int:
    """Checks an image count: an integer >= 1 (``where`` is its field). Returns it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportError(path, f"must be an integer >= 1, got {value!r}", field=where)
    return value
