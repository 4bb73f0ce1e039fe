"""The export manifest (``exports/<device>.json``) as a typed value: the one owner of its format.

A search writes, per device, a manifest of format :data:`EXPORT_FORMAT` and, for a stitched
network, the fitted stitching layer as ``<device>.safetensors``. :class:`ExportManifest`
holds the manifest, :meth:`ExportManifest.to_json` writes it, :meth:`ExportManifest.read` /
:meth:`ExportManifest.from_dict` parse and validate it; :mod:`space.artifact` loads the files
it names. Every problem raises one :class:`ExportError` naming the file and the field.

Layout (all top-level fields required)::

    {"format": "stitchsearch-export/1", "final": true, "device": "edge",
     "budget": {...}, "headroom": {...},          # the device's budget row and slack
     "candidate": {"kind": "stitch", ...},        # space.Candidate's JSON form
     "label": "a[:2] -> b[1:]",
     "anchors": [AnchorRecord, ...],              # front (and back for a stitch)
     "stitch": StitchRecord | null,               # null for a bare anchor
     "metrics": {...}, "data": {...}, "fit": {...}, "study": {...},
     "created": "2025-01-01T00:00:00Z"}

``budget``, ``headroom``, ``fit`` and ``study`` are opaque here (the search owns them);
``metrics`` and ``data`` are checked by :meth:`ExportManifest.check_metrics` and
:meth:`ExportManifest.check_data` when they are used (``--check``), not when an export loads.
``data.recipe`` (optional) is the dataset factory's recipe, a JSON object opaque to space.

Modules: ``_format`` (version, field lists, :class:`ExportError`, field checks), ``_records``
(:class:`AnchorRecord`, :class:`StitchRecord`), ``_manifest`` (:class:`ExportManifest`).
"""

from space.manifest._format import (
    ANCHOR_FIELDS,
    ANCHOR_OPTIONAL,
    DATA_FIELDS,
    DATA_OPTIONAL,
    EXPORT_FORMAT,
    MANIFEST_FIELDS,
    MANIFEST_OPTIONAL,
    METRIC_FIELDS,
    SPLIT_METRIC_FIELDS,
    STITCH_FIELDS,
    ExportError,
    check_fields,
    check_weights_name,
    expect,
    feature_info_from,
    read_json_object,
)
from space.manifest._manifest import ExportManifest, candidate_from, check_data
from space.manifest._records import (
    AnchorRecord,
    StitchRecord,
    anchor_record,
    anchor_records_from,
)

__all__ = [
    "ANCHOR_FIELDS",
    "ANCHOR_OPTIONAL",
    "DATA_FIELDS",
    "DATA_OPTIONAL",
    "EXPORT_FORMAT",
    "MANIFEST_FIELDS",
    "MANIFEST_OPTIONAL",
    "METRIC_FIELDS",
    "SPLIT_METRIC_FIELDS",
    "STITCH_FIELDS",
    "AnchorRecord",
    "ExportError",
    "ExportManifest",
    "StitchRecord",
    "anchor_record",
    "anchor_records_from",
    "candidate_from",
    "check_data",
    "check_fields",
    "check_weights_name",
    "expect",
    "feature_info_from",
    "read_json_object",
]
