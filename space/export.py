"""Loading an export: the stitched network a search chose for one device, in a few lines.

A search writes, per device, ``exports/<device>.json`` (the manifest, format
:data:`EXPORT_FORMAT`) and, for a stitched network, ``exports/<device>.safetensors`` (the
fitted stitching layer). :func:`load_export` rebuilds the network from them::

    from space import load_export

    model = load_export("runs/default/exports/edge.json")  # eval mode, CPU
    logits = model(images)  # images: (B, C, H, W) at the front anchor's input size

Everything is verified before it is used: every anchor checkpoint and the stitch weights by
their SHA-256, a zoo anchor's shipped weights against the zoo manifest *and* the export, the
anchors' shapes and the stitching layer's type and cuts against the manifest. Nothing is
unpickled: anchor ``.pth`` files are read with ``torch.load(weights_only=True)``, stitch
weights must be ``.safetensors``. Any problem raises one :class:`ExportError` (a
``ValueError``) naming the file and the field.

Where anchor checkpoints are looked for: the absolute path recorded in the manifest, then a
file of the same name in the export's folder (so an export folder can be moved to another
machine together with its checkpoints); the SHA-256 decides either way.

:class:`SwitchableStitchedNet` holds several stitch points of one anchor pair and switches
between them at run time (SN-Net's instant switching); :func:`save_switchable` and
:func:`load_switchable` store it as one JSON (format :data:`SWITCHABLE_FORMAT`) and one
safetensors file, verified the same way.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from space._io import atomic_path, atomic_write
from space.anchor import Anchor, FeatureInfo, file_sha256, load_anchor
from space.config import StitchConfig
from space.stitched import StitchedNet
from space.stitching import StitchingLayer, make_stitching_layer

#: The manifest format this module reads (written by ``search.finish.write_export``).
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
_ANCHOR_FIELDS = frozenset(
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
# Optional: ``weights_sha256`` (Anchor.weights_sha256), verified when present; it makes an
# anchor without checkpoint (a seeded random initialisation) rebuildable.
_ANCHOR_OPTIONAL = frozenset({"weights_sha256"})
_STITCH_FIELDS = frozenset({"layer", "weights", "sha256", "src", "dst"})
_CANDIDATE_FIELDS = {
    "anchor": frozenset({"kind", "anchor"}),
    "stitch": frozenset({"kind", "front", "back", "front_block", "back_block"}),
}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ExportError(ValueError):
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


@dataclass(frozen=True)
class LoadedExport:
    """A verified export and the network rebuilt from it.

    Attributes:
        path: The manifest file.
        manifest: The parsed manifest.
        model: The network in eval mode: a :class:`space.StitchedNet`, or the anchor's timm
            model for a bare-anchor export.
        anchors: The anchors by role (``"front"``, and ``"back"`` for a stitch; a
            self-stitch holds the same object twice).
        config: The stitch configuration, or None for a bare anchor.
    """

    path: Path
    manifest: dict[str, Any]
    model: nn.Module
    anchors: dict[str, Anchor]
    config: StitchConfig | None

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` images the model takes (the front anchor's input)."""
        return tuple(self.anchors["front"].input_size)

    @property
    def is_stitch(self) -> bool:
        """Whether the export is a stitched network (not a bare anchor)."""
        return self.config is not None


def load_export(path: str | Path) -> nn.Module:
    """Rebuilds the network of an export, verified, in eval mode.

    Args:
        path: The export's manifest, ``exports/<device>.json``.

    Returns:
        A :class:`space.StitchedNet` for a stitched export, or the anchor's timm model for a
        bare-anchor export; on the CPU.

    Raises:
        ExportError: The manifest is missing, not valid JSON, of another format version, has
            missing, unknown or invalid fields, or a file it names is missing, altered
            (SHA-256 mismatch), outside the export's folder or does not fit; the message
            names the file and the field.
    """
    return read_export(path).model


def read_export(path: str | Path) -> LoadedExport:
    """Like :func:`load_export`, but also returns the manifest, the anchors and the config."""
    path = Path(path)
    doc = read_manifest(path)
    _anchor_records(path, doc)
    cand = doc["candidate"]
    if cand["kind"] == "anchor" and doc["stitch"] is not None:
        raise ExportError(
            path,
            "must be null for a bare-anchor export",
            field="stitch",
            fix="a bare anchor has no stitching layer",
        )
    loaded: dict[str, Anchor] = {}
    anchors: dict[str, Anchor] = {}
    for i, rec in enumerate(doc["anchors"]):
        role = rec["role"]
        if rec["name"] in loaded:
            _check_same_anchor(path, doc, i, rec)
            anchors[role] = loaded[rec["name"]]
            continue
        anchors[role] = loaded[rec["name"]] = _load_anchor(path, i, rec)
    if cand["kind"] == "anchor":
        model = anchors["front"].model.eval()
        return LoadedExport(path, doc, model, anchors, None)
    config = _config(path, cand)
    try:
        config.validate(anchors["front"], anchors["back"])
    except ValueError as e:
        raise ExportError(path, str(e), field="candidate") from None
    stitch = _load_stitch(path, doc["stitch"], anchors["front"], anchors["back"], config)
    net = StitchedNet(anchors["front"], anchors["back"], config, stitch)
    return LoadedExport(path, doc, net.eval(), anchors, config)


# ---------------------------------------------------------------------- manifest
def read_manifest(path: str | Path) -> dict[str, Any]:
    """Reads an export manifest and checks its format version and top-level fields.

    Raises:
        ExportError: Missing file, invalid JSON, another format version, or missing or
            unknown top-level fields.
    """
    path = Path(path)
    doc = _read_json(path)
    if "format" not in doc:
        raise ExportError(
            path, "missing", field="format", fix=f"an export manifest has format {EXPORT_FORMAT!r}"
        )
    if doc["format"] != EXPORT_FORMAT:
        raise ExportError(
            path,
            f"unsupported format {doc['format']!r}; this stitchsearch reads {EXPORT_FORMAT!r}",
            field="format",
            fix="use the stitchsearch version that wrote the export, or export again",
        )
    check_fields(path, doc, MANIFEST_FIELDS, None, MANIFEST_OPTIONAL)
    return doc


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ExportError(path, "no such file", fix="pass the path of exports/<device>.json")
    if not path.is_file():
        raise ExportError(path, "is not a file", fix="pass the path of exports/<device>.json")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExportError(path, f"cannot be read ({e})") from None
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


def _expect(path: Path, value: Any, kind: str, field: str) -> Any:
    """Checks one value's type; ``kind`` is int, pos_int, str, bool, sha256 or sha256|null."""
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
        "pos_int": isinstance(value, int) and not isinstance(value, bool) and value > 0,
        "str": isinstance(value, str) and bool(value),
        "str|null": value is None or (isinstance(value, str) and bool(value)),
        "bool": isinstance(value, bool),
        "sha256": isinstance(value, str) and bool(_SHA256.match(value)),
        "sha256|null": value is None or (isinstance(value, str) and bool(_SHA256.match(value))),
    }[kind]
    if not ok:
        what = {
            "int": "an integer >= 0",
            "pos_int": "an integer > 0",
            "str": "a non-empty string",
            "str|null": "a non-empty string or null",
            "bool": "true or false",
            "sha256": "a SHA-256 hex digest (64 lowercase hex digits)",
            "sha256|null": "a SHA-256 hex digest or null",
        }[kind]
        raise ExportError(path, f"must be {what}, got {value!r}", field=field)
    return value


def _candidate(path: Path, cand: Any) -> dict[str, Any]:
    if not isinstance(cand, Mapping):
        raise ExportError(path, f"must be a JSON object, got {cand!r}", field="candidate")
    kind = cand.get("kind")
    if kind not in _CANDIDATE_FIELDS:
        raise ExportError(
            path, f"must be 'anchor' or 'stitch', got {kind!r}", field="candidate.kind"
        )
    check_fields(path, cand, _CANDIDATE_FIELDS[kind], "candidate")
    return dict(cand)


def _config(path: Path, cand: Mapping[str, Any]) -> StitchConfig:
    try:
        return StitchConfig.from_dict({k: v for k, v in cand.items() if k != "kind"})
    except ValueError as e:
        raise ExportError(path, str(e), field="candidate") from None


def _anchor_records(path: Path, doc: dict[str, Any]) -> None:
    """Validates ``candidate`` and ``anchors`` and that they agree."""
    cand = _candidate(path, doc["candidate"])
    recs = doc["anchors"]
    roles = ["front"] if cand["kind"] == "anchor" else ["front", "back"]
    names = [cand["anchor"]] if cand["kind"] == "anchor" else [cand["front"], cand["back"]]
    if not isinstance(recs, list) or len(recs) != len(roles):
        raise ExportError(
            path,
            f"must list {len(roles)} anchor record(s) ({', '.join(roles)}) for a "
            f"{cand['kind']} candidate, got {recs!r:.200}",
            field="anchors",
        )
    for i, (rec, role, name) in enumerate(zip(recs, roles, names, strict=True)):
        where = f"anchors[{i}]"
        if not isinstance(rec, Mapping):
            raise ExportError(path, f"must be a JSON object, got {rec!r}", field=where)
        zoo = isinstance(rec.get("name"), str) and rec["name"].startswith("zoo:")
        required = _ANCHOR_FIELDS if zoo else _ANCHOR_FIELDS | {"timm_kwargs"}
        check_fields(path, rec, required, where, _ANCHOR_OPTIONAL)
        if rec["role"] != role:
            raise ExportError(path, f"must be {role!r}, got {rec['role']!r}", field=f"{where}.role")
        if rec["name"] != name:
            raise ExportError(
                path,
                f"is {rec['name']!r} but the candidate's {role} anchor is {name!r}",
                field=f"{where}.name",
            )
        _expect(path, rec["family"], "str", f"{where}.family")
        _expect(path, rec["num_blocks"], "pos_int", f"{where}.num_blocks")
        _expect(path, rec["num_classes"], "pos_int", f"{where}.num_classes")
        size = rec["input_size"]
        if not (
            isinstance(size, list)
            and len(size) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise ExportError(
                path,
                f"must be [C, H, W] positive integers, got {size!r}",
                field=f"{where}.input_size",
            )
        _expect(path, rec["checkpoint"], "str|null", f"{where}.checkpoint")
        _expect(path, rec["checkpoint_sha256"], "sha256|null", f"{where}.checkpoint_sha256")
        _expect(path, rec["pretrained"], "bool", f"{where}.pretrained")
        if "weights_sha256" in rec:
            _expect(path, rec["weights_sha256"], "sha256", f"{where}.weights_sha256")
        if not zoo and not isinstance(rec["timm_kwargs"], Mapping):
            raise ExportError(
                path,
                f"must be a JSON object, got {rec['timm_kwargs']!r}",
                field=f"{where}.timm_kwargs",
            )
        if rec["checkpoint"] is not None and rec["checkpoint_sha256"] is None:
            raise ExportError(
                path,
                f"is null but the anchor has checkpoint {rec['checkpoint']!r}",
                field=f"{where}.checkpoint_sha256",
                fix="an export must record the SHA-256 of every checkpoint",
            )


def _check_same_anchor(path: Path, doc: dict[str, Any], i: int, rec: Mapping[str, Any]) -> None:
    """A self-stitch lists its anchor twice; both records must agree (role aside)."""
    first = next(r for r in doc["anchors"] if r["name"] == rec["name"])
    for key in sorted(rec.keys() | first.keys()):
        if key != "role" and rec.get(key) != first.get(key):
            raise ExportError(
                path,
                f"is {rec.get(key)!r} but the other record of anchor {rec['name']!r} says "
                f"{first.get(key)!r}",
                field=f"anchors[{i}].{key}",
            )


# ---------------------------------------------------------------------- anchors
def _timm_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    # JSON turned tuples (depths, dims, img_size) into lists; timm wants tuples back.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def _find_checkpoint(path: Path, rec: Mapping[str, Any], where: str) -> Path:
    recorded = Path(rec["checkpoint"]).expanduser()
    if recorded.is_file():
        return recorded
    beside = path.parent / recorded.name
    if beside.is_file():
        return beside
    raise ExportError(
        path,
        f"checkpoint {str(recorded)!r} does not exist (nor {recorded.name!r} in the export's "
        "folder)",
        field=f"{where}.checkpoint",
        fix="copy the anchor's checkpoint to one of those places",
    )


def _load_anchor(path: Path, i: int, rec: Mapping[str, Any]) -> Anchor:
    where = f"anchors[{i}]"
    name = rec["name"]
    if name.startswith("zoo:"):
        if rec["checkpoint_sha256"] is None:
            raise ExportError(
                path,
                "is null for a zoo anchor",
                field=f"{where}.checkpoint_sha256",
                fix="an export must record the SHA-256 of the zoo weights it was made with",
            )
        try:
            anchor = load_anchor(name)
        except ValueError as e:
            raise ExportError(path, str(e), field=f"{where}.name") from None
        if anchor.checkpoint_sha256 != rec["checkpoint_sha256"]:
            raise ExportError(
                path,
                f"zoo anchor {name!r} was exported with weights of sha256 "
                f"{rec['checkpoint_sha256']}, but the installed zoo ships "
                f"{anchor.checkpoint_sha256}",
                field=f"{where}.checkpoint_sha256",
                fix="install the stitchsearch version (zoo) the export was made with",
            )
    else:
        checkpoint = None
        if rec["checkpoint"] is not None:
            checkpoint = _find_checkpoint(path, rec, where)
            digest = file_sha256(checkpoint)
            if digest != rec["checkpoint_sha256"]:
                raise ExportError(
                    path,
                    f"checkpoint {str(checkpoint)!r} has sha256 {digest}, the export records "
                    f"{rec['checkpoint_sha256']}",
                    field=f"{where}.checkpoint_sha256",
                    fix="the file was altered or replaced: restore the checkpoint the export "
                    "was made with",
                )
        elif not rec["pretrained"] and "weights_sha256" not in rec:
            raise ExportError(
                path,
                f"anchor {name!r} has neither a checkpoint nor pretrained weights (its weights "
                "were a random initialisation) and no weights_sha256, so it cannot be rebuilt "
                "verifiably",
                field=f"{where}.checkpoint",
                fix="search with anchors loaded from checkpoints to get deployable exports",
            )
        try:
            anchor = load_anchor(
                name,
                checkpoint=checkpoint,
                pretrained=rec["pretrained"],
                input_size=tuple(rec["input_size"]),
                **_timm_kwargs(rec["timm_kwargs"]),
            )
        except ValueError as e:
            raise ExportError(path, str(e), field=where) from None
        except Exception as e:  # timm raises many types for bad kwargs
            raise ExportError(
                path,
                f"timm could not build {name!r} ({type(e).__name__}: {str(e)[:200]})",
                field=f"{where}.timm_kwargs",
            ) from None
    if "weights_sha256" in rec and anchor.weights_sha256 != rec["weights_sha256"]:
        raise ExportError(
            path,
            f"anchor {name!r} loaded with weights of sha256 {anchor.weights_sha256}, the export "
            f"records {rec['weights_sha256']}",
            field=f"{where}.weights_sha256",
            fix="load the anchor weights the export was made with",
        )
    for key, actual in (
        ("family", anchor.family),
        ("num_blocks", anchor.num_blocks),
        ("num_classes", anchor.num_classes),
        ("input_size", list(anchor.input_size)),
    ):
        if rec[key] != actual:
            raise ExportError(
                path,
                f"is {rec[key]!r} but the loaded anchor {name!r} has {actual!r}",
                field=f"{where}.{key}",
                fix="the anchor's architecture differs from the one the export was made with",
            )
    return anchor


# ---------------------------------------------------------------------- stitch
def _feature_info(path: Path, raw: Any, where: str) -> FeatureInfo:
    names = frozenset(f.name for f in fields(FeatureInfo))
    check_fields(path, raw, names, where)
    if raw["layout"] not in ("NCHW", "NLC"):
        raise ExportError(
            path, f"must be 'NCHW' or 'NLC', got {raw['layout']!r}", field=f"{where}.layout"
        )
    for key in ("channels", "height", "width"):
        _expect(path, raw[key], "pos_int", f"{where}.{key}")
    _expect(path, raw["num_prefix_tokens"], "int", f"{where}.num_prefix_tokens")
    return FeatureInfo(**raw)


def _weights_path(path: Path, name: Any, field: str = "stitch.weights") -> Path:
    """Resolves a weights file name; it must stay inside the manifest's folder."""
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
    folder = path.parent.resolve()
    target = path.parent / name
    if not target.resolve().is_relative_to(folder):
        raise ExportError(
            path,
            f"{name!r} resolves to {str(target.resolve())!r}, outside the export's folder "
            "(a symbolic link?)",
            field=field,
            fix="copy the weights file into the export's folder",
        )
    if not target.is_file():
        raise ExportError(
            path,
            f"{str(target)!r} does not exist",
            field=field,
            fix="copy the weights file that was exported with the manifest next to it",
        )
    return target


def _read_weights(path: Path, name: Any, sha256: Any, where: str) -> dict[str, torch.Tensor]:
    """Reads a safetensors file named by a manifest after checking its place and SHA-256.

    ``where`` is the manifest section holding ``weights`` and ``sha256``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _expect(path, sha256, "sha256", f"{where}.sha256" if where else "sha256")
    field = f"{where}.weights" if where else "weights"
    weights = _weights_path(path, name, field)
    digest = file_sha256(weights)
    if digest != sha256:
        raise ExportError(
            path,
            f"{str(weights)!r} has sha256 {digest}, the export records {sha256}",
            field=f"{where}.sha256" if where else "sha256",
            fix="the weights were altered or replaced: restore the file exported with the manifest",
        )
    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ExportError(
            path, f"{str(weights)!r} is not a readable safetensors file ({e})", field=field
        ) from None


def _build_layer(
    path: Path,
    rec: Mapping[str, Any],
    front: Anchor,
    back: Anchor,
    config: StitchConfig,
    where: str,
) -> StitchingLayer:
    """An empty stitching layer for ``config``, checked against ``rec`` (layer, src, dst)."""
    _expect(path, rec["layer"], "str", f"{where}.layer")
    src = _feature_info(path, rec["src"], f"{where}.src")
    dst = _feature_info(path, rec["dst"], f"{where}.dst")
    for side, info, anchor, cut in (
        ("src", src, front, config.front_block),
        ("dst", dst, back, config.back_block),
    ):
        actual = anchor.feature_info(cut)
        if info != actual:
            raise ExportError(
                path,
                f"is {info} but cut {cut} of {anchor.name!r} is {actual}",
                field=f"{where}.{side}",
                fix="the anchor differs from the one the export was made with",
            )
    layer = make_stitching_layer(src, dst)
    if type(layer).__name__ != rec["layer"]:
        raise ExportError(
            path,
            f"is {rec['layer']!r} but cuts {src.layout} -> {dst.layout} take a "
            f"{type(layer).__name__}",
            field=f"{where}.layer",
        )
    param = next(front.model.parameters())
    return layer.to(device=param.device, dtype=param.dtype)


def _fill_layer(
    path: Path, layer: StitchingLayer, state: Mapping[str, torch.Tensor], field: str
) -> None:
    """Loads a state dict into a stitching layer; keys and shapes must match exactly."""
    expected = layer.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unknown = sorted(state.keys() - expected.keys())
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs layer {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unknown or shapes:
        raise ExportError(
            path,
            f"the weights do not fit a {type(layer).__name__}: missing {missing}, unknown "
            f"{unknown}, shape mismatches {shapes}",
            field=field,
        )
    with torch.no_grad():
        layer.load_state_dict(dict(state), strict=True)


def _load_stitch(
    path: Path, rec: Any, front: Anchor, back: Anchor, config: StitchConfig
) -> StitchingLayer:
    if rec is None:
        raise ExportError(
            path, "is null for a stitched candidate", field="stitch", fix="export again"
        )
    check_fields(path, rec, _STITCH_FIELDS, "stitch")
    layer = _build_layer(path, rec, front, back, config, "stitch")
    state = _read_weights(path, rec["weights"], rec["sha256"], "stitch")
    _fill_layer(path, layer, state, "stitch.weights")
    return layer


# ---------------------------------------------------------------------- anchor records
def anchor_record(anchor: Anchor, role: str) -> dict[str, Any]:
    """The manifest record of an anchor (the same fields as an export's ``anchors`` entries).

    It includes the optional ``weights_sha256`` (a hash of the state dict), which lets
    :func:`load_export` verify anchors without a checkpoint file too.

    Args:
        anchor: The anchor.
        role: ``"front"`` or ``"back"``.
    """
    rec: dict[str, Any] = {
        "role": role,
        "name": anchor.name,
        "family": anchor.family,
        "num_blocks": anchor.num_blocks,
        "input_size": list(anchor.input_size),
        "num_classes": anchor.num_classes,
        "checkpoint": str(Path(anchor.checkpoint).resolve()) if anchor.checkpoint else None,
        "checkpoint_sha256": anchor.checkpoint_sha256,
        "pretrained": anchor.pretrained,
    }
    if not anchor.name.startswith("zoo:"):
        rec["timm_kwargs"] = {
            k: list(v) if isinstance(v, tuple) else v for k, v in anchor.timm_kwargs.items()
        }
    rec["weights_sha256"] = anchor.weights_sha256
    return rec


# ---------------------------------------------------------------------- switchable networks
#: The format of a switchable artifact (:func:`save_switchable`).
SWITCHABLE_FORMAT = "stitchsearch-switchable/1"
_SWITCHABLE_FIELDS = frozenset(
    {"format", "anchors", "stitches", "active", "weights", "sha256", "created"}
)
_SWITCH_FIELDS = frozenset({"candidate", "layer", "src", "dst"})


class SwitchableStitchedNet(nn.Module):
    """Several stitch points of one anchor pair in one module, switched at run time.

    SN-Net's instant switching: the anchors are held once, each stitch point only adds its
    small stitching layer, and :meth:`switch` changes which stitch point ``forward`` runs,
    without copying or reloading anything. Save with :func:`save_switchable`, load with
    :func:`load_switchable`.

    Args:
        front: The front anchor of every stitch point.
        back: The back anchor of every stitch point (may be ``front``).
        stitches: Stitch points by name: ``{name: (config, fitted stitching layer)}``.
            Names are non-empty and contain no ``.``.
        active: The stitch point ``forward`` runs first (default: the first one).

    Raises:
        ValueError: No stitch points, a bad name, a configuration of other anchors, or a
            layer whose cuts differ from its configuration's.
    """

    def __init__(
        self,
        front: Anchor,
        back: Anchor,
        stitches: Mapping[str, tuple[StitchConfig, StitchingLayer]],
        *,
        active: str | None = None,
    ) -> None:
        super().__init__()
        if not stitches:
            raise ValueError("SwitchableStitchedNet needs at least one stitch point, got none")
        configs: dict[str, StitchConfig] = {}
        layers: dict[str, StitchingLayer] = {}
        for name, (config, layer) in stitches.items():
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(
                    f"stitch point name {name!r} must be a non-empty string without '.'"
                )
            config.validate(front, back)
            for side, info, anchor, cut in (
                ("src", layer.src, front, config.front_block),
                ("dst", layer.dst, back, config.back_block),
            ):
                if info != anchor.feature_info(cut):
                    raise ValueError(
                        f"stitch point {name!r}: the layer's {side} {info} is not cut {cut} of "
                        f"{anchor.name!r} ({anchor.feature_info(cut)}); build it for {config}"
                    )
            configs[name], layers[name] = config, layer
        self.front_model = front.model
        if back.model is not front.model:
            self.back_model = back.model
        self.stitches = nn.ModuleDict(layers)
        self.front = front
        self.back = back
        self.configs = configs
        for p in front.model.parameters():
            p.requires_grad_(False)
        for p in back.model.parameters():
            p.requires_grad_(False)
        self.active = next(iter(configs))
        if active is not None:
            self.switch(active)
        self.train(False)

    @classmethod
    def from_stitched(
        cls, nets: Mapping[str, StitchedNet], *, active: str | None = None
    ) -> SwitchableStitchedNet:
        """Combines fitted stitched networks of one anchor pair (their layers are shared).

        Raises:
            ValueError: The networks do not share their front and back anchors.
        """
        if not nets:
            raise ValueError("from_stitched needs at least one stitched network, got none")
        first = next(iter(nets.values()))
        for name, net in nets.items():
            if net.front is not first.front or net.back is not first.back:
                raise ValueError(
                    f"stitched network {name!r} ({net.config}) does not use the same anchor "
                    f"objects as {next(iter(nets))!r}; build all of them from one anchor pair"
                )
        return cls(
            first.front,
            first.back,
            {name: (net.config, net.stitch) for name, net in nets.items()},
            active=active,
        )

    @property
    def names(self) -> list[str]:
        """The stitch points' names, in order."""
        return list(self.configs)

    @property
    def config(self) -> StitchConfig:
        """The active stitch point's configuration."""
        return self.configs[self.active]

    @property
    def stitch(self) -> StitchingLayer:
        """The active stitch point's layer."""
        return self.stitches[self.active]

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` input of the front anchor."""
        return self.front.input_size

    def switch(self, name: str) -> SwitchableStitchedNet:
        """Makes ``name`` the stitch point ``forward`` runs; returns ``self``.

        Raises:
            ValueError: Unknown name (close matches are suggested).
        """
        if name not in self.configs:
            from space.errors import close_matches

            raise ValueError(
                f"unknown stitch point {name!r}; this network has {', '.join(self.configs)}"
                + close_matches(str(name), list(self.configs))
            )
        self.active = name
        return self

    def as_stitched(self, name: str | None = None) -> StitchedNet:
        """One stitch point as a :class:`StitchedNet` sharing this network's modules."""
        name = self.active if name is None else name
        if name not in self.configs:
            self.switch(name)  # raises with the known names
        return StitchedNet(self.front, self.back, self.configs[name], self.stitches[name])

    def train(self, mode: bool = True) -> SwitchableStitchedNet:
        """Sets the stitching layers' mode; anchors always stay in eval mode."""
        super().train(mode)
        self.front.model.eval()
        self.back.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        config = self.configs[self.active]
        h = self.front.forward_front(x, config.front_block)
        h = self.stitches[self.active](h)
        return self.back.forward_back(h, config.back_block)

    def extra_repr(self) -> str:
        return f"active={self.active!r}, stitch points={self.names}"


def save_switchable(net: SwitchableStitchedNet, path: str | Path) -> Path:
    """Saves a switchable network as ``<name>.json`` plus one ``<name>.safetensors``.

    The JSON (format :data:`SWITCHABLE_FORMAT`) records the two anchors as an export does
    (:func:`anchor_record`: name, checkpoint and its SHA-256, the state dict's SHA-256, timm
    kwargs), every stitch point's configuration,
    layer type and cuts, the active stitch point, and the SHA-256 of the weights file, which
    holds every stitching layer's tensors as ``<stitch point>.<tensor>``.

    Args:
        net: The network.
        path: The JSON file to write; the weights go next to it.

    Returns:
        The JSON path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    state = {
        f"{name}.{k}": v.detach().cpu().contiguous()
        for name, layer in net.stitches.items()
        for k, v in layer.state_dict().items()
    }
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": SWITCHABLE_FORMAT})
    doc = {
        "format": SWITCHABLE_FORMAT,
        "anchors": [anchor_record(net.front, "front"), anchor_record(net.back, "back")],
        "stitches": {
            name: {
                "candidate": config.to_dict(),
                "layer": type(net.stitches[name]).__name__,
                "src": asdict(net.stitches[name].src),
                "dst": asdict(net.stitches[name].dst),
            }
            for name, config in net.configs.items()
        },
        "active": net.active,
        "weights": weights.name,
        "sha256": file_sha256(weights),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write(path, json.dumps(doc, indent=2) + "\n")
    return path


def load_switchable(path: str | Path) -> SwitchableStitchedNet:
    """Loads a network saved by :func:`save_switchable`, verified like :func:`load_export`.

    Raises:
        ExportError: Missing or invalid JSON, another format, missing or unknown fields,
            anchors or weights that are missing, altered or outside the folder.
    """
    path = Path(path)
    doc = _read_json(path)
    if doc.get("format") != SWITCHABLE_FORMAT:
        raise ExportError(
            path,
            f"unsupported format {doc.get('format')!r}; this stitchsearch reads "
            f"{SWITCHABLE_FORMAT!r} here",
            field="format",
        )
    check_fields(path, doc, _SWITCHABLE_FIELDS, None)
    recs = doc["anchors"]
    if not isinstance(recs, list) or len(recs) != 2:
        raise ExportError(path, "must list the front and the back anchor", field="anchors")
    stitches = doc["stitches"]
    if not isinstance(stitches, Mapping) or not stitches:
        raise ExportError(path, "must map stitch point names to records", field="stitches")
    candidates: dict[str, dict[str, Any]] = {}
    for name, rec in stitches.items():
        check_fields(path, rec, _SWITCH_FIELDS, f"stitches.{name}")
        check_fields(
            path,
            rec["candidate"],
            _CANDIDATE_FIELDS["stitch"] - {"kind"},
            f"stitches.{name}.candidate",
        )
        candidates[name] = dict(rec["candidate"])
    pairs = {(c["front"], c["back"]) for c in candidates.values()}
    if len(pairs) != 1:
        raise ExportError(
            path,
            f"stitch points use different anchor pairs {sorted(map(str, pairs))}",
            field="stitches",
        )
    front_name, back_name = next(iter(pairs))
    # The anchors are validated as an export's, against the first stitch point.
    as_export = {
        "candidate": {"kind": "stitch", **next(iter(candidates.values()))},
        "anchors": recs,
    }
    _anchor_records(path, as_export)
    front = _load_anchor(path, 0, recs[0])
    back = front if back_name == front_name else _load_anchor(path, 1, recs[1])
    if back is front:
        _check_same_anchor(path, as_export, 1, recs[1])
    state = _read_weights(path, doc["weights"], doc["sha256"], "")
    layers: dict[str, tuple[StitchConfig, StitchingLayer]] = {}
    for name, rec in stitches.items():
        where = f"stitches.{name}"
        try:
            config = StitchConfig.from_dict(candidates[name])
            config.validate(front, back)
        except ValueError as e:
            raise ExportError(path, str(e), field=f"{where}.candidate") from None
        layer = _build_layer(path, rec, front, back, config, where)
        prefix = f"{name}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        _fill_layer(path, layer, part, "weights")
        layers[name] = (config, layer)
    known = {f"{n}.{k}" for n, (_, layer) in layers.items() for k in layer.state_dict()}
    extra = sorted(state.keys() - known)
    if extra:
        raise ExportError(
            path, f"the weights hold tensors of no stitch point: {extra[:5]}", field="weights"
        )
    active = doc["active"]
    if active not in layers:
        raise ExportError(
            path, f"{active!r} is not one of the stitch points {list(layers)}", field="active"
        )
    return SwitchableStitchedNet(front, back, layers, active=active)
