"""The export manifest as a typed value: :class:`ExportManifest`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from space.config import CANDIDATE_FIELDS, CANDIDATE_OPTIONAL_FIELDS, Candidate
from space.manifest._format import (
    DATA_FIELDS,
    DATA_OPTIONAL,
    EXPORT_FORMAT,
    MANIFEST_FIELDS,
    MANIFEST_OPTIONAL,
    METRIC_FIELDS,
    METRIC_OPTIONAL,
    SPLIT_METRIC_FIELDS,
    ExportError,
    check_fields,
    count,
    number,
    parse_json,
    read_json_object,
)
from space.manifest._records import AnchorRecord, StitchRecord, anchor_records_from


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _json_default(o: Any) -> Any:
    if isinstance(o, tuple):
        return list(o)
    return str(o)  # Path and anything else the writer passed


#: Optional fields of ``metrics.latency`` (``source`` is required).
_LATENCY_OPTIONAL = frozenset({"host_ms", "table"})


@dataclass(frozen=True, kw_only=True)
class ExportManifest:
    """One device's export manifest (format :data:`EXPORT_FORMAT`; layout in :mod:`space.manifest`).

    Build one from parts and write it with :meth:`to_json`; read one with :meth:`read` or
    :meth:`from_json`. Sections owned by the search (``budget``, ``headroom``, ``metrics``,
    ``data``, ``fit``, ``study``) are JSON objects kept as they are.

    Attributes:
        device: The target device.
        candidate: The exported candidate.
        anchors: Its anchors' records: the front, then (for a stitch) the back.
        stitch: The stitching layer's record; None for a bare anchor.
        budget: The device's budget row.
        headroom: Slack of each metric against the budget.
        metrics: Measured validation/test accuracy, MACs, params, latency, memory, CKA
            (:data:`METRIC_FIELDS`).
        data: The dataset (:data:`DATA_FIELDS`, optionally :data:`DATA_OPTIONAL`).
        fit: How the stitching layer was fitted.
        study: The study it came from.
        final: Whether the study was complete.
        label: Human-readable candidate (default: ``candidate.label``).
        created: UTC time, ``YYYY-MM-DDTHH:MM:SSZ`` (default: now).
        path: The file it was read from (not part of the JSON; None when built).
    """

    format: ClassVar[str] = EXPORT_FORMAT

    device: str
    candidate: Candidate
    anchors: tuple[AnchorRecord, ...]
    stitch: StitchRecord | None
    budget: dict[str, Any]
    headroom: dict[str, Any]
    metrics: dict[str, Any]
    data: dict[str, Any]
    fit: dict[str, Any]
    study: dict[str, Any]
    final: bool = True
    label: str | None = None
    created: str = field(default_factory=_utc_now)
    path: Path | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "anchors", tuple(self.anchors))
        if self.label is None:
            object.__setattr__(self, "label", self.candidate.label)
        n = 1 if self.candidate.is_anchor else 2
        if len(self.anchors) != n:
            raise ValueError(
                f"a {'bare-anchor' if n == 1 else 'stitch'} export has {n} anchor record(s), "
                f"got {len(self.anchors)}"
            )
        if (self.stitch is None) != self.candidate.is_anchor:
            raise ValueError(
                "stitch must be None for a bare anchor and a StitchRecord for a stitch, got "
                f"{self.stitch!r} for {self.candidate.label}"
            )

    @property
    def where(self) -> Path:
        """The path errors name: the source file, or ``<manifest>`` when built in memory."""
        return self.path if self.path is not None else Path("<manifest>")

    @property
    def recipe(self) -> dict[str, Any] | None:
        """``data.recipe``: the dataset factory's recipe, or None when not recorded."""
        data = self.data
        return data.get("recipe") if isinstance(data, Mapping) else None

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON form, fields in the written order."""
        return {
            "format": EXPORT_FORMAT,
            "final": self.final,
            "device": self.device,
            "budget": self.budget,
            "headroom": self.headroom,
            "candidate": self.candidate.to_dict(),
            "label": self.label,
            "anchors": [a.to_dict() for a in self.anchors],
            "stitch": None if self.stitch is None else self.stitch.to_dict(),
            "metrics": self.metrics,
            "data": self.data,
            "fit": self.fit,
            "study": self.study,
            "created": self.created,
        }

    def to_json(self) -> str:
        """The file's text: indented JSON and a final newline (tuples and paths as JSON)."""
        return json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"

    # ------------------------------------------------------------------ reading
    @classmethod
    def read(cls, path: str | Path) -> ExportManifest:
        """Reads and validates a manifest file.

        Raises:
            ExportError: See :meth:`from_dict`; also a missing file or invalid JSON.
        """
        path = Path(path)
        return cls.from_dict(read_json_object(path), path)

    @classmethod
    def from_json(cls, source: str | Path, *, path: str | Path | None = None) -> ExportManifest:
        """Parses a manifest: a :class:`~pathlib.Path` is read, a ``str`` is the JSON text.

        Args:
            source: The manifest file (a ``Path``) or its text (a ``str``).
            path: The name errors give a text source (default ``<manifest>``).

        Raises:
            ExportError: See :meth:`read`.
        """
        if isinstance(source, Path):
            return cls.read(source)
        where = Path(path) if path is not None else Path("<manifest>")
        return cls.from_dict(parse_json(source, where), where)

    @classmethod
    def from_dict(cls, doc: Any, path: str | Path) -> ExportManifest:
        """Validates a parsed manifest and builds the value.

        Checks the format version, the top-level fields, the candidate, the anchor records
        (and that they match the candidate) and the stitch record; the files they name are
        checked when the export is loaded (:func:`space.read_export`).

        Args:
            doc: The parsed JSON.
            path: The manifest file (named in errors; recorded as :attr:`path`).

        Raises:
            ExportError: Another format version, or missing, unknown or invalid fields; the
                message names the field.
        """
        path = Path(path)
        if not isinstance(doc, dict):
            raise ExportError(path, f"must be a JSON object, got a {type(doc).__name__}")
        if "format" not in doc:
            raise ExportError(
                path,
                "missing",
                field="format",
                fix=f"an export manifest has format {EXPORT_FORMAT!r}",
            )
        if doc["format"] != EXPORT_FORMAT:
            raise ExportError(
                path,
                f"unsupported format {doc['format']!r}; this stitchsearch reads {EXPORT_FORMAT!r}",
                field="format",
                fix="use the stitchsearch version that wrote the export, or export again",
            )
        check_fields(path, doc, MANIFEST_FIELDS, None, MANIFEST_OPTIONAL)
        candidate = candidate_from(path, doc["candidate"])
        names = [candidate.front] if candidate.is_anchor else [candidate.front, candidate.back]
        kind = "anchor" if candidate.is_anchor else "stitch"
        anchors = anchor_records_from(path, doc["anchors"], kind, names)
        if candidate.is_anchor:
            if doc["stitch"] is not None:
                raise ExportError(
                    path,
                    "must be null for a bare-anchor export",
                    field="stitch",
                    fix="a bare anchor has no stitching layer",
                )
            stitch = None
        else:
            if doc["stitch"] is None:
                raise ExportError(
                    path, "is null for a stitched candidate", field="stitch", fix="export again"
                )
            stitch = StitchRecord.from_dict(doc["stitch"], path)
        return cls(
            device=doc["device"],
            candidate=candidate,
            anchors=anchors,
            stitch=stitch,
            budget=doc["budget"],
            headroom=doc["headroom"],
            metrics=doc["metrics"],
            data=doc["data"],
            fit=doc["fit"],
            study=doc["study"],
            final=doc["final"],
            label=doc["label"],
            created=doc["created"],
            path=path,
        )

    # ------------------------------------------------------------------ the search's sections
    def check_metrics(self) -> dict[str, Any]:
        """Validates ``metrics`` (as ``--check`` reads it) and returns it.

        Raises:
            ExportError: Missing or unknown fields, or a value that is not a finite number
                or null.
        """
        path, m = self.where, self.metrics
        check_fields(path, m, METRIC_FIELDS, "metrics", METRIC_OPTIONAL)
        if "latency" in m:
            check_fields(
                path, m["latency"], frozenset({"source"}), "metrics.latency", _LATENCY_OPTIONAL
            )
        if "measure" in m and not (isinstance(m["measure"], str) and m["measure"]):
            raise ExportError(
                path,
                f"must be a text such as 'agreement with <teacher>', got {m['measure']!r}",
                field="metrics.measure",
            )
        for split in ("validation", "validation_remeasured", "test"):
            check_fields(path, m[split], SPLIT_METRIC_FIELDS, f"metrics.{split}")
            for k in ("top1", "top5"):
                number(path, m[split][k], f"metrics.{split}.{k}")
        for k in ("macs", "params", "latency_ms", "memory_mb", "cka"):
            number(path, m[k], f"metrics.{k}")
        return m

    def check_data(self) -> dict[str, Any]:
        """Validates ``data`` (as ``--check`` reads it) and returns it (:func:`check_data`)."""
        return check_data(self.where, self.data)


def check_data(path: Path, data: Any) -> dict[str, Any]:
    """Validates a manifest's ``data`` section (as ``--check`` reads it) and returns it.

    Raises:
        ExportError: Missing or unknown fields, image counts that are not integers >= 1, an
            ``input_size`` that is not ``[C, H, W]``, or a ``recipe`` that is not a JSON
            object.
    """
    check_fields(path, data, DATA_FIELDS, "data", DATA_OPTIONAL)
    count(path, data["validation_images"], "data.validation_images")
    count(path, data["test_images"], "data.test_images")
    size = data["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size)):
        raise ExportError(path, f"must be [C, H, W], got {size!r}", field="data.input_size")
    if data.get("calibration_images") is not None:
        count(path, data["calibration_images"], "data.calibration_images")
    if "recipe" in data and not isinstance(data["recipe"], Mapping):
        raise ExportError(
            path, f"must be a JSON object, got {data['recipe']!r}", field="data.recipe"
        )
    return dict(data)


def candidate_from(path: Path, cand: Any) -> Candidate:
    """Parses ``candidate`` with :meth:`space.Candidate.from_dict`, as an :class:`ExportError`.

    Raises:
        ExportError: Not an object, an unknown kind, missing or unknown fields, or invalid
            values (field ``candidate``).
    """
    if not isinstance(cand, Mapping):
        raise ExportError(path, f"must be a JSON object, got {cand!r}", field="candidate")
    kind = cand.get("kind")
    if kind not in CANDIDATE_FIELDS:
        raise ExportError(
            path, f"must be 'anchor' or 'stitch', got {kind!r}", field="candidate.kind"
        )
    check_fields(path, cand, CANDIDATE_FIELDS[kind], "candidate", CANDIDATE_OPTIONAL_FIELDS)
    try:
        return Candidate.from_dict(dict(cand))
    except ValueError as e:
        field = "candidate.resolution" if "'resolution'" in str(e) else "candidate"
        raise ExportError(path, str(e), field=field) from None
