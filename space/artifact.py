"""Loading an export: the stitched network a search chose for one device, in a few lines.

A search writes, per device, ``exports/<device>.json`` (the manifest, format
:data:`space.EXPORT_FORMAT`, see :mod:`space.manifest`) and, for a stitched network,
``exports/<device>.safetensors`` (the fitted stitching layer). :func:`load_export` rebuilds
the network from them::

    from space import load_export

    model = load_export("runs/default/exports/edge.json")  # eval mode, CPU
    logits = model(images)  # images: (B, C, H, W) at the front anchor's input size

Everything is verified before it is used: every anchor checkpoint and the stitch weights by
their SHA-256, a zoo anchor's shipped weights against the zoo manifest *and* the export, the
anchors' shapes and the stitching layer's type and cuts against the manifest. Nothing is
unpickled: anchor ``.pth`` files are read with ``torch.load(weights_only=True)``, stitch
weights must be ``.safetensors``. Any problem raises one :class:`space.ExportError` (an
:class:`space.InputError`) naming the file and the field.

Where anchor checkpoints are looked for: the absolute path recorded in the manifest, then a
file of the same name in the export's folder (so an export folder can be moved to another
machine together with its checkpoints); the SHA-256 decides either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from space.anchor import Anchor
from space.config import StitchConfig
from space.files import file_sha256
from space.loading import load_anchor
from space.manifest import (
    AnchorRecord,
    ExportError,
    ExportManifest,
    StitchRecord,
    check_weights_name,
    expect,
    feature_info_from,
    read_json_object,
)
from space.stitched import StitchedNet, stitch_cuts
from space.stitching import StitchingLayer, make_stitching_layer


@dataclass(frozen=True)
class LoadedExport:
    """A verified export and the network rebuilt from it.

    Attributes:
        path: The manifest file.
        manifest: The manifest's JSON document as read (a dict).
        model: The network in eval mode: a :class:`space.StitchedNet`, or the anchor's timm
            model for a bare-anchor export.
        anchors: The anchors by role (``"front"``, and ``"back"`` for a stitch; a
            self-stitch holds the same object twice).
        config: The stitch configuration, or None for a bare anchor.
        typed_manifest: The validated manifest as an :class:`space.ExportManifest`.
    """

    path: Path
    manifest: dict[str, Any]
    model: nn.Module
    anchors: dict[str, Anchor]
    config: StitchConfig | None
    typed_manifest: ExportManifest

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` images the model takes.

        The candidate's resolution when the export records one (``candidate.resolution``),
        else the front anchor's native input.
        """
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
    doc = read_json_object(path)
    manifest = ExportManifest.from_dict(doc, path)
    loaded: dict[str, Anchor] = {}
    anchors: dict[str, Anchor] = {}
    for i, rec in enumerate(manifest.anchors):
        if rec.id in loaded:
            check_same_anchor(path, manifest.anchors, i)
            anchors[rec.role] = loaded[rec.id]
            continue
        anchors[rec.role] = loaded[rec.id] = anchor_from_record(path, i, rec)
    resolution = manifest.candidate.resolution
    if resolution is not None:
        try:
            anchors = {role: a.at_resolution(resolution) for role, a in anchors.items()}
        except ValueError as e:
            raise ExportError(path, str(e), field="candidate.resolution") from None
    if manifest.candidate.is_anchor:
        model = anchors["front"].model.eval()
        return LoadedExport(path, doc, model, anchors, None, manifest)
    config = manifest.candidate.config
    try:
        config.validate(anchors["front"], anchors["back"])
    except ValueError as e:
        raise ExportError(path, str(e), field="candidate") from None
    stitch = _load_stitch(path, manifest.stitch, anchors["front"], anchors["back"], config)
    net = StitchedNet(anchors["front"], anchors["back"], config, stitch)
    return LoadedExport(path, doc, net.eval(), anchors, config, manifest)


# ---------------------------------------------------------------------- anchors
def check_same_anchor(path: Path, records: tuple[AnchorRecord, ...], i: int) -> None:
    """A self-stitch lists its anchor twice; both records must agree (role aside)."""
    rec = records[i].to_dict()
    first = next(r for r in records if r.id == records[i].id).to_dict()
    for key in sorted(rec.keys() | first.keys()):
        if key != "role" and rec.get(key) != first.get(key):
            raise ExportError(
                path,
                f"is {rec.get(key)!r} but the other record of anchor {rec['id']!r} says "
                f"{first.get(key)!r}",
                field=f"anchors[{i}].{key}",
            )


def _timm_kwargs(raw: Mapping[str, Any]) -> dict[str, Any]:
    # JSON turned tuples (depths, dims, img_size) into lists; timm wants tuples back.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}


def _find_checkpoint(path: Path, rec: AnchorRecord, where: str) -> Path:
    recorded = Path(rec.checkpoint).expanduser()
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


def anchor_from_record(path: Path, i: int, rec: AnchorRecord) -> Anchor:
    """Loads the anchor of record ``anchors[i]`` and verifies it against the record.

    Raises:
        ExportError: A checkpoint that is missing, altered or does not fit, zoo weights other
            than the exported ones, or an anchor whose shapes differ from the record's.
    """
    where = f"anchors[{i}]"
    name = rec.name
    if rec.is_zoo:
        if rec.checkpoint_sha256 is None:
            raise ExportError(
                path,
                "is null for a zoo anchor",
                field=f"{where}.checkpoint_sha256",
                fix="an export must record the SHA-256 of the zoo weights it was made with",
            )
        try:
            anchor = load_anchor(name, anchor_id=rec.id)
        except ValueError as e:
            raise ExportError(path, str(e), field=f"{where}.name") from None
        if anchor.checkpoint_sha256 != rec.checkpoint_sha256:
            raise ExportError(
                path,
                f"zoo anchor {name!r} was exported with weights of sha256 "
                f"{rec.checkpoint_sha256}, but the installed zoo ships "
                f"{anchor.checkpoint_sha256}",
                field=f"{where}.checkpoint_sha256",
                fix="install the stitchsearch version (zoo) the export was made with",
            )
    else:
        checkpoint = None
        if rec.checkpoint is not None:
            checkpoint = _find_checkpoint(path, rec, where)
            digest = file_sha256(checkpoint)
            if digest != rec.checkpoint_sha256:
                raise ExportError(
                    path,
                    f"checkpoint {str(checkpoint)!r} has sha256 {digest}, the export records "
                    f"{rec.checkpoint_sha256}",
                    field=f"{where}.checkpoint_sha256",
                    fix="the file was altered or replaced: restore the checkpoint the export "
                    "was made with",
                )
        elif not rec.pretrained and rec.weights_sha256 is None and rec.trained is None:
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
                anchor_id=rec.id,
                checkpoint=checkpoint,
                pretrained=rec.pretrained,
                input_size=tuple(rec.input_size),
                **_timm_kwargs(rec.timm_kwargs),
            )
        except ValueError as e:
            raise ExportError(path, str(e), field=where) from None
        except Exception as e:  # timm raises many types for bad kwargs
            raise ExportError(
                path,
                f"timm could not build {name!r} ({type(e).__name__}: {str(e)[:200]})",
                field=f"{where}.timm_kwargs",
            ) from None
    if rec.weights_sha256 is not None and anchor.weights_sha256 != rec.weights_sha256:
        raise ExportError(
            path,
            f"anchor {name!r} loaded with weights of sha256 {anchor.weights_sha256}, the export "
            f"records {rec.weights_sha256}",
            field=f"{where}.weights_sha256",
            fix=(
                "load the anchor weights the export was made with"
                if rec.checkpoint or rec.pretrained
                else "a seeded random initialisation differs in its last bits across CPUs "
                "(Intel's MKL picks its code path by CPU): set MKL_CBWR=COMPATIBLE where the "
                "export is written and where it is loaded, or give the anchor a checkpoint"
            ),
        )
    if rec.trained is not None:
        _load_trained(path, anchor, rec.trained, where)
    for key, recorded, actual in (
        ("family", rec.family, anchor.family),
        ("num_blocks", rec.num_blocks, anchor.num_blocks),
        ("num_classes", rec.num_classes, anchor.num_classes),
        ("input_size", list(rec.input_size), list(anchor.input_size)),
    ):
        if recorded != actual:
            raise ExportError(
                path,
                f"is {recorded!r} but the loaded anchor {name!r} has {actual!r}",
                field=f"{where}.{key}",
                fix="the anchor's architecture differs from the one the export was made with",
            )
    return anchor


def _load_trained(path: Path, anchor: Anchor, trained: Mapping[str, str], where: str) -> None:
    """Loads an anchor's trained weights (a family's), verified by their SHA-256."""
    state = read_weights(path, trained["weights"], trained["sha256"], f"{where}.trained")
    try:
        anchor.load_trained(
            state, source=weights_path(path, trained["weights"]), sha256=trained["sha256"]
        )
    except (RuntimeError, ValueError) as e:
        raise ExportError(
            path,
            f"the trained weights do not fit {anchor.name!r}: {str(e)[:300]}",
            field=f"{where}.trained.weights",
            fix="restore the trained weights the export was made with",
        ) from None


# ---------------------------------------------------------------------- stitch weights
def weights_path(path: Path, name: Any, field: str = "stitch.weights") -> Path:
    """Resolves a weights file name; it must stay inside the manifest's folder and exist.

    Raises:
        ExportError: A bad name (see :func:`space.manifest.check_weights_name`), a name that
            resolves outside the folder (a symbolic link), or a missing file.
    """
    check_weights_name(path, name, field)
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


def read_weights(path: Path, name: Any, sha256: Any, where: str) -> dict[str, torch.Tensor]:
    """Reads a safetensors file named by a manifest after checking its place and SHA-256.

    ``where`` is the manifest section holding ``weights`` and ``sha256`` (``""``: the top
    level).

    Raises:
        ExportError: A bad SHA-256 or file name, a missing, altered or unreadable file.
    """
    expect(path, sha256, "sha256", f"{where}.sha256" if where else "sha256")
    field = f"{where}.weights" if where else "weights"
    weights = weights_path(path, name, field)
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


def build_layer(
    path: Path,
    rec: StitchRecord | Mapping[str, Any],
    front: Anchor,
    back: Anchor,
    config: StitchConfig,
    where: str,
) -> StitchingLayer:
    """An empty stitching layer for ``config``, checked against ``rec``'s layer, src and dst.

    Args:
        path: The manifest (for messages).
        rec: A parsed :class:`StitchRecord`, or a raw record with ``layer``, ``src`` and
            ``dst`` (a switchable network's stitch point), validated here.
        front: The front anchor.
        back: The back anchor.
        config: The stitch configuration.
        where: The record's field name.

    Raises:
        ExportError: The recorded cuts differ from the anchors', or the layer type from the
            one the cuts take; or, for a raw record, invalid fields.
    """
    if isinstance(rec, StitchRecord):
        layer_name, src, dst = rec.layer, rec.src, rec.dst
    else:
        layer_name = expect(path, rec["layer"], "str", f"{where}.layer")
        src = feature_info_from(path, rec["src"], f"{where}.src")
        dst = feature_info_from(path, rec["dst"], f"{where}.dst")
    cuts = stitch_cuts(front, back, config)
    for side, info, anchor, cut, actual in (
        ("src", src, front, config.front_block, cuts[0]),
        ("dst", dst, back, config.back_block, cuts[1]),
    ):
        if info != actual:
            raise ExportError(
                path,
                f"is {info} but cut {cut} of {anchor.name!r} is {actual}",
                field=f"{where}.{side}",
                fix="the anchor differs from the one the export was made with",
            )
    layer = make_stitching_layer(src, dst)
    if type(layer).__name__ != layer_name:
        raise ExportError(
            path,
            f"is {layer_name!r} but cuts {src.layout} -> {dst.layout} take a "
            f"{type(layer).__name__}",
            field=f"{where}.layer",
        )
    param = next(front.model.parameters())
    return layer.to(device=param.device, dtype=param.dtype)


def fill_layer(
    path: Path, layer: StitchingLayer, state: Mapping[str, torch.Tensor], field: str
) -> None:
    """Loads a state dict into a stitching layer; keys and shapes must match exactly.

    Raises:
        ExportError: Missing or unknown tensors, or other shapes.
    """
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
    path: Path, rec: StitchRecord, front: Anchor, back: Anchor, config: StitchConfig
) -> StitchingLayer:
    layer = build_layer(path, rec, front, back, config, "stitch")
    state = read_weights(path, rec.weights, rec.sha256, "stitch")
    fill_layer(path, layer, state, "stitch.weights")
    return layer
