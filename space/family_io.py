"""Saving and loading a stitched family: one JSON, the stitches' weights, each anchor's.

A family (:class:`space.StitchedFamily`) is saved as ``<name>.json`` (format
:data:`FAMILY_FORMAT`), ``<name>.safetensors`` (every stitching layer's tensors as
``<layer key>.<tensor>``) and, when the anchors were trained, one ``anchors/<anchor>.safetensors``
file per anchor (its whole state dict), which device exports made from the same family
reference too, so each trained anchor is stored once. The JSON records every anchor as an
export does (:class:`space.AnchorRecord`: how to rebuild the anchor it started from, with the
SHA-256 of its checkpoint, and ``trained``: the trained weights' file and SHA-256), every
member (its candidate, its stitching layer's type and cuts, and its measured metrics), the
active member and what the training did. :func:`load_family` verifies everything as
:func:`space.load_export` does before it is used.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from space.anchor import Anchor
from space.artifact import anchor_from_record, build_layer, fill_layer, read_weights
from space.config import Candidate
from space.family import StitchedFamily
from space.files import atomic_path, atomic_write, file_sha256
from space.manifest import AnchorRecord, ExportError, check_fields, expect, read_json_object
from space.stitching import StitchingLayer

#: The format of a saved family (:func:`save_family`).
FAMILY_FORMAT = "stitchsearch-family/1"
#: The folder (next to the JSON) the trained anchors' weights go into.
ANCHORS_FOLDER = "anchors"
#: The role a family's anchor records carry.
FAMILY_ROLE = "family"
_FIELDS = frozenset(
    {
        "format",
        "anchors",
        "members",
        "weights",
        "sha256",
        "active",
        "measure",
        "training",
        "created",
    }
)
#: Optional: ``data``, the data the members were measured on (as an export's ``data``).
_OPTIONAL = frozenset({"data"})
_MEMBER_FIELDS = frozenset({"name", "candidate", "stitch", "metrics"})
_LAYER_FIELDS = frozenset({"layer", "src", "dst"})


def anchor_weights_name(anchor: Anchor, sha256: str) -> str:
    """The file a trained anchor's weights are saved as, relative to the JSON's folder."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", anchor.name).strip("._") or "anchor"
    return f"{ANCHORS_FOLDER}/{stem}-{sha256[:12]}.safetensors"


def save_anchor_weights(anchor: Anchor, folder: Path) -> tuple[str, str]:
    """Saves an anchor's whole state dict under ``folder/anchors/``; once per content.

    Returns:
        ``(file name relative to folder, SHA-256 of the file)``.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in anchor.model.state_dict().items()}
    tmp_dir = folder / ANCHORS_FOLDER
    tmp_dir.mkdir(parents=True, exist_ok=True)
    scratch = tmp_dir / f".{anchor.weights_sha256[:16]}.safetensors"
    with atomic_path(scratch) as tmp:
        save_file(state, str(tmp), metadata={"format": FAMILY_FORMAT, "anchor": anchor.name})
    digest = file_sha256(scratch)
    name = anchor_weights_name(anchor, digest)
    scratch.replace(folder / name)
    return name, digest


def place_anchor_weights(anchor: Anchor, folder: Path) -> str:
    """Puts a trained anchor's weights under ``folder/anchors/``, once; returns the name.

    The file the anchor was trained into (or loaded from) is copied when it exists, so that
    every export of one family holds the same bytes; otherwise the weights are saved.

    Raises:
        ValueError: The anchor was not trained.
    """
    if anchor.trained_sha256 is None:
        raise ValueError(f"anchor {anchor.name!r} holds no trained weights to place")
    name = anchor_weights_name(anchor, anchor.trained_sha256)
    target = folder / name
    source = anchor.trained_weights
    if target.is_file() and file_sha256(target) == anchor.trained_sha256:
        return name
    if source is not None and source.is_file() and file_sha256(source) == anchor.trained_sha256:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return name
    saved, digest = save_anchor_weights(anchor, folder)
    if digest != anchor.trained_sha256:
        raise ValueError(
            f"anchor {anchor.name!r}: its weights no longer match the trained file "
            f"({digest} != {anchor.trained_sha256})"
        )
    return saved


def save_family(
    family: StitchedFamily,
    path: str | Path,
    *,
    trained: bool = True,
    measure: str = "accuracy",
    training: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | None = None,
) -> Path:
    """Saves a family as ``path`` (JSON), its stitches' weights and its anchors' weights.

    Args:
        family: The family.
        path: The JSON file to write; the weights go next to it.
        trained: Whether the anchors were trained (their weights are then saved; otherwise
            the records rebuild them unchanged).
        measure: What the members' ``accuracy`` metric measures.
        training: What the training did (settings, epochs, time), recorded as is.
        data: The data the members' metrics were measured on (an export's ``data``
            section), so that ``python -m search.export --check`` can measure them again.

    Returns:
        The JSON path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    anchors = []
    for anchor in family.anchors.values():
        name = None
        if trained and anchor.trained_sha256 is not None:
            name = place_anchor_weights(anchor, path.parent)
        elif trained:
            name, digest = save_anchor_weights(anchor, path.parent)
            anchor.mark_trained(source=path.parent / name, sha256=digest)
        anchors.append(AnchorRecord.of(anchor, FAMILY_ROLE, trained=name).to_dict())
    weights = path.with_suffix(".safetensors")
    state = {
        f"{key}.{k}": v.detach().cpu().contiguous()
        for key, layer in family.stitches.items()
        for k, v in layer.state_dict().items()
    }
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FAMILY_FORMAT})
    doc = {
        "format": FAMILY_FORMAT,
        "anchors": anchors,
        "members": [_member_record(family, name) for name in family.names],
        "weights": weights.name,
        "sha256": file_sha256(weights),
        "active": family.active,
        "measure": measure,
        "training": dict(training or {}),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **({"data": dict(data)} if data is not None else {}),
    }
    atomic_write(path, json.dumps(doc, indent=2) + "\n")
    return path


def _member_record(family: StitchedFamily, name: str) -> dict[str, Any]:
    layer = family.stitch_of(name)
    return {
        "name": name,
        "candidate": family.members[name].to_dict(),
        "stitch": None
        if layer is None
        else {
            "layer": type(layer).__name__,
            "src": dataclasses.asdict(layer.src),
            "dst": dataclasses.asdict(layer.dst),
        },
        "metrics": dict(family.metrics.get(name, {})),
    }


def load_family(path: str | Path) -> StitchedFamily:
    """Loads a family saved by :func:`save_family`, verified like :func:`space.load_export`.

    Raises:
        ExportError: Missing or invalid JSON, another format, missing or unknown fields,
            anchors or weights that are missing, altered or outside the folder, or a member
            that does not fit its anchors.
    """
    path = Path(path)
    doc = read_json_object(path)
    if doc.get("format") != FAMILY_FORMAT:
        raise ExportError(
            path,
            f"unsupported format {doc.get('format')!r}; this stitchsearch reads "
            f"{FAMILY_FORMAT!r} here",
            field="format",
        )
    check_fields(path, doc, _FIELDS, None, _OPTIONAL)
    recs = doc["anchors"]
    if not isinstance(recs, list) or not recs:
        raise ExportError(path, "must list the family's anchors", field="anchors")
    anchors: dict[str, Anchor] = {}
    for i, rec in enumerate(recs):
        name = rec.get("id", rec.get("name")) if isinstance(rec, Mapping) else None
        record = AnchorRecord.from_dict(rec, path, index=i, role=FAMILY_ROLE, name=name)
        anchor = anchor_from_record(path, i, record)
        if anchor.name in anchors:
            raise ExportError(path, f"lists {anchor.name!r} twice", field=f"anchors[{i}]")
        anchors[anchor.name] = anchor
    members, stitches, metrics = _members(path, doc["members"], anchors)
    state = read_weights(path, doc["weights"], doc["sha256"], "")
    _fill_stitches(path, stitches, members, state)
    try:
        return StitchedFamily(anchors, members, stitches, metrics=metrics, active=doc["active"])
    except (KeyError, ValueError) as e:
        raise ExportError(path, str(e).strip("'\""), field="active") from None


def _members(
    path: Path, raw: Any, anchors: Mapping[str, Anchor]
) -> tuple[dict[str, Candidate], dict[str, StitchingLayer], dict[str, dict[str, Any]]]:
    if not isinstance(raw, list) or not raw:
        raise ExportError(path, "must list the family's members", field="members")
    members: dict[str, Candidate] = {}
    stitches: dict[str, StitchingLayer] = {}
    metrics: dict[str, dict[str, Any]] = {}
    for i, rec in enumerate(raw):
        where = f"members[{i}]"
        check_fields(path, rec, _MEMBER_FIELDS, where)
        name = expect(path, rec["name"], "str", f"{where}.name")
        if name in members:
            raise ExportError(path, f"member {name!r} is listed twice", field=f"{where}.name")
        try:
            c = Candidate.from_dict(rec["candidate"])
        except ValueError as e:
            raise ExportError(path, str(e), field=f"{where}.candidate") from None
        for a in {c.front, c.back}:
            if a not in anchors:
                raise ExportError(
                    path,
                    f"uses anchor {a!r}, which the family does not list",
                    field=f"{where}.candidate",
                )
        if not isinstance(rec["metrics"], Mapping):
            raise ExportError(path, "must be a JSON object", field=f"{where}.metrics")
        members[name], metrics[name] = c, dict(rec["metrics"])
        if c.is_anchor:
            if rec["stitch"] is not None:
                raise ExportError(path, "must be null for an anchor", field=f"{where}.stitch")
            continue
        check_fields(path, rec["stitch"], _LAYER_FIELDS, f"{where}.stitch")
        config = c.config
        assert not isinstance(config, str)
        try:
            config.validate(anchors[c.front], anchors[c.back])
        except ValueError as e:
            raise ExportError(path, str(e), field=f"{where}.candidate") from None
        stitches[name] = build_layer(
            path, rec["stitch"], anchors[c.front], anchors[c.back], config, f"{where}.stitch"
        )
    return members, stitches, metrics


def _fill_stitches(
    path: Path,
    stitches: Mapping[str, StitchingLayer],
    members: Mapping[str, Candidate],
    state: Mapping[str, torch.Tensor],
) -> None:
    """Loads each stitch's tensors (saved under its layer key) and refuses extra tensors."""
    keys = {name: f"s{i}" for i, name in enumerate(members)}
    known: set[str] = set()
    for name, layer in stitches.items():
        prefix = f"{keys[name]}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        fill_layer(path, layer, part, "weights")
        known |= {prefix + k for k in part}
    extra = sorted(state.keys() - known)
    if extra:
        raise ExportError(
            path, f"the weights hold tensors of no member: {extra[:5]}", field="weights"
        )
