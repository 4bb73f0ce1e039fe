"""The manifest's records of an anchor (``anchors[i]``) and of the stitching layer (``stitch``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from space.anchor import FeatureInfo, anchor_id_problem
from space.files import file_sha256
from space.manifest._format import (
    ANCHOR_FIELDS,
    ANCHOR_OPTIONAL,
    STITCH_FIELDS,
    TRAINED_FIELDS,
    ExportError,
    check_fields,
    check_weights_name,
    expect,
    feature_info_from,
)

if TYPE_CHECKING:
    from space.anchor import Anchor
    from space.stitching import StitchingLayer


@dataclass(frozen=True, kw_only=True)
class AnchorRecord:
    """One entry of ``anchors``: enough to rebuild and verify an anchor.

    Attributes:
        role: ``"front"`` or ``"back"``.
        name: The name the anchor is built from (a timm name or ``zoo:<name>``).
        family: Its family.
        num_blocks: Its number of blocks.
        input_size: ``(C, H, W)``.
        num_classes: Classes of its head.
        checkpoint: The absolute path of its checkpoint, or None.
        checkpoint_sha256: The checkpoint's SHA-256 (a zoo anchor's: of its shipped weights).
        pretrained: Whether timm's pretrained weights were loaded.
        timm_kwargs: ``timm.create_model`` kwargs in JSON form (tuples as lists); None for a
            zoo anchor (the zoo records them).
        weights_sha256: SHA-256 of the state dict (optional in the format; left out for a
            trained anchor, whose weights file has its own).
        trained: ``{"weights": file, "sha256": ...}`` when the anchor was trained with its
            family: its trained weights, relative to the manifest's folder (the other fields
            say what it started from).
        id: The anchor's id, what the candidate calls it (:attr:`space.Anchor.name`); the
            name when the study gave none, and in exports written before ids existed. The
            JSON form holds it only when it differs from the name, so that exports of
            anchors without ids stay as they were.
    """

    role: str
    name: str
    family: str
    num_blocks: int
    input_size: tuple[int, int, int]
    num_classes: int
    checkpoint: str | None
    checkpoint_sha256: str | None
    pretrained: bool
    timm_kwargs: dict[str, Any] | None = None
    weights_sha256: str | None = None
    trained: dict[str, str] | None = None
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)

    @classmethod
    def of(cls, anchor: Anchor, role: str, *, trained: str | None = None) -> AnchorRecord:
        """The record of a loaded anchor (with ``weights_sha256``, a hash of its state dict).

        Args:
            anchor: The anchor.
            role: ``"front"`` or ``"back"``.
            trained: For an anchor trained with its family, its trained weights' file name
                relative to the manifest's folder.

        Raises:
            ValueError: A trained anchor without its file name, or a file name for an
                anchor that was not trained.
        """
        if (trained is None) != (anchor.trained_sha256 is None):
            raise ValueError(
                f"anchor {anchor.name!r}: give its trained weights' file name exactly when it "
                f"was trained (trained_sha256 {anchor.trained_sha256}, file {trained!r})"
            )
        zoo = anchor.model_name.startswith("zoo:")
        return cls(
            role=role,
            id=anchor.name,
            name=anchor.model_name,
            family=anchor.family,
            num_blocks=anchor.num_blocks,
            input_size=tuple(anchor.input_size),
            num_classes=anchor.num_classes,
            checkpoint=str(Path(anchor.checkpoint).resolve()) if anchor.checkpoint else None,
            checkpoint_sha256=anchor.checkpoint_sha256,
            pretrained=anchor.pretrained,
            timm_kwargs=None
            if zoo
            else {k: list(v) if isinstance(v, tuple) else v for k, v in anchor.timm_kwargs.items()},
            weights_sha256=None if trained else anchor.weights_sha256,
            trained=None
            if trained is None
            else {"weights": trained, "sha256": str(anchor.trained_sha256)},
        )

    @property
    def is_zoo(self) -> bool:
        """Whether this is a zoo anchor (``zoo:<name>``)."""
        return self.name.startswith("zoo:")

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON form (optional fields only when set; ``id`` when not the name)."""
        rec: dict[str, Any] = {"role": self.role}
        if self.id != self.name:
            rec["id"] = self.id
        rec |= {
            "name": self.name,
            "family": self.family,
            "num_blocks": self.num_blocks,
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "pretrained": self.pretrained,
        }
        if self.timm_kwargs is not None:
            rec["timm_kwargs"] = self.timm_kwargs
        if self.weights_sha256 is not None:
            rec["weights_sha256"] = self.weights_sha256
        if self.trained is not None:
            rec["trained"] = dict(self.trained)
        return rec

    @classmethod
    def from_dict(cls, rec: Any, path: Path, *, index: int, role: str, name: Any) -> AnchorRecord:
        """Parses and validates ``anchors[index]``, which must be the ``role`` anchor ``name``.

        ``name`` is the anchor's id as the candidate gives it: the record's ``id``, or its
        ``name`` in an export written before ids existed.

        Raises:
            ExportError: Missing, unknown or invalid fields, or another role or name.
        """
        where = f"anchors[{index}]"
        if not isinstance(rec, Mapping):
            raise ExportError(path, f"must be a JSON object, got {rec!r}", field=where)
        zoo = isinstance(rec.get("name"), str) and rec["name"].startswith("zoo:")
        required = ANCHOR_FIELDS if zoo else ANCHOR_FIELDS | {"timm_kwargs"}
        check_fields(path, rec, required, where, ANCHOR_OPTIONAL)
        if rec["role"] != role:
            raise ExportError(path, f"must be {role!r}, got {rec['role']!r}", field=f"{where}.role")
        expect(path, rec["name"], "str", f"{where}.name")
        anchor_id = rec.get("id", rec["name"])
        if "id" in rec and (problem := anchor_id_problem(anchor_id)) is not None:
            raise ExportError(path, problem, field=f"{where}.id")
        if anchor_id != name:
            key = "id" if "id" in rec else "name"
            raise ExportError(
                path,
                f"is {anchor_id!r} but the candidate's {role} anchor is {name!r}",
                field=f"{where}.{key}",
            )
        expect(path, rec["family"], "str", f"{where}.family")
        expect(path, rec["num_blocks"], "pos_int", f"{where}.num_blocks")
        expect(path, rec["num_classes"], "pos_int", f"{where}.num_classes")
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
        expect(path, rec["checkpoint"], "str|null", f"{where}.checkpoint")
        expect(path, rec["checkpoint_sha256"], "sha256|null", f"{where}.checkpoint_sha256")
        expect(path, rec["pretrained"], "bool", f"{where}.pretrained")
        if "weights_sha256" in rec:
            expect(path, rec["weights_sha256"], "sha256", f"{where}.weights_sha256")
        if not zoo and not isinstance(rec["timm_kwargs"], Mapping):
            raise ExportError(
                path,
                f"must be a JSON object, got {rec['timm_kwargs']!r}",
                field=f"{where}.timm_kwargs",
            )
        trained = rec.get("trained")
        if trained is not None:
            check_fields(path, trained, TRAINED_FIELDS, f"{where}.trained")
            check_weights_name(path, trained["weights"], f"{where}.trained.weights")
            expect(path, trained["sha256"], "sha256", f"{where}.trained.sha256")
        if rec["checkpoint"] is not None and rec["checkpoint_sha256"] is None:
            raise ExportError(
                path,
                f"is null but the anchor has checkpoint {rec['checkpoint']!r}",
                field=f"{where}.checkpoint_sha256",
                fix="an export must record the SHA-256 of every checkpoint",
            )
        return cls(
            role=role,
            id=anchor_id,
            name=rec["name"],
            family=rec["family"],
            num_blocks=rec["num_blocks"],
            input_size=tuple(size),
            num_classes=rec["num_classes"],
            checkpoint=rec["checkpoint"],
            checkpoint_sha256=rec["checkpoint_sha256"],
            pretrained=rec["pretrained"],
            timm_kwargs=None if zoo else dict(rec["timm_kwargs"]),
            weights_sha256=rec.get("weights_sha256"),
            trained=None if trained is None else dict(trained),
        )


def anchor_record(anchor: Anchor, role: str) -> dict[str, Any]:
    """The JSON form of :meth:`AnchorRecord.of` (an export's ``anchors`` entry).

    Args:
        anchor: The anchor.
        role: ``"front"`` or ``"back"``.
    """
    return AnchorRecord.of(anchor, role).to_dict()


def anchor_records_from(
    path: Path, recs: Any, kind: str, names: Sequence[Any]
) -> tuple[AnchorRecord, ...]:
    """Parses ``anchors`` for a ``kind`` candidate whose anchors are ``names`` (front, back).

    Raises:
        ExportError: Not a list of one record per role, or an invalid record.
    """
    roles = ["front"] if kind == "anchor" else ["front", "back"]
    if not isinstance(recs, list) or len(recs) != len(roles):
        raise ExportError(
            path,
            f"must list {len(roles)} anchor record(s) ({', '.join(roles)}) for a "
            f"{kind} candidate, got {recs!r:.200}",
            field="anchors",
        )
    return tuple(
        AnchorRecord.from_dict(rec, path, index=i, role=role, name=name)
        for i, (rec, role, name) in enumerate(zip(recs, roles, names, strict=True))
    )


@dataclass(frozen=True, kw_only=True)
class StitchRecord:
    """The ``stitch`` record: the fitted stitching layer's type, cuts and weights file.

    Attributes:
        layer: The layer's class name (``"ConvToToken"``).
        weights: The ``.safetensors`` file name, relative to the manifest's folder.
        sha256: The weights file's SHA-256.
        src: The front anchor's cut the layer takes.
        dst: The back anchor's cut the layer produces.
    """

    layer: str
    weights: str
    sha256: str
    src: FeatureInfo
    dst: FeatureInfo

    @classmethod
    def of(cls, layer: StitchingLayer, weights: str | Path) -> StitchRecord:
        """The record of a stitching layer saved as ``weights`` (hashed here).

        Args:
            layer: The fitted layer.
            weights: The written ``.safetensors`` file, next to the manifest.
        """
        weights = Path(weights)
        return cls(
            layer=type(layer).__name__,
            weights=weights.name,
            sha256=file_sha256(weights),
            src=layer.src,
            dst=layer.dst,
        )

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON form."""
        return {
            "layer": self.layer,
            "weights": self.weights,
            "sha256": self.sha256,
            "src": dataclasses.asdict(self.src),
            "dst": dataclasses.asdict(self.dst),
        }

    @classmethod
    def from_dict(cls, rec: Any, path: Path, where: str = "stitch") -> StitchRecord:
        """Parses and validates the record (the weights file itself is checked on loading).

        Raises:
            ExportError: Missing, unknown or invalid fields.
        """
        check_fields(path, rec, STITCH_FIELDS, where)
        expect(path, rec["layer"], "str", f"{where}.layer")
        src = feature_info_from(path, rec["src"], f"{where}.src")
        dst = feature_info_from(path, rec["dst"], f"{where}.dst")
        expect(path, rec["sha256"], "sha256", f"{where}.sha256")
        check_weights_name(path, rec["weights"], f"{where}.weights")
        return cls(
            layer=rec["layer"], weights=rec["weights"], sha256=rec["sha256"], src=src, dst=dst
        )
