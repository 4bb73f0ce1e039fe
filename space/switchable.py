"""Switchable stitched networks: several stitch points of one anchor pair, switched at run time.

:class:`SwitchableStitchedNet` holds several stitch points of one anchor pair and switches
between them at run time (SN-Net's instant switching); :func:`save_switchable` and
:func:`load_switchable` store it as one JSON (format :data:`SWITCHABLE_FORMAT`) and one
safetensors file, verified like an export (:mod:`space.artifact`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from space.anchor import Anchor
from space.artifact import (
    anchor_from_record,
    build_layer,
    check_same_anchor,
    fill_layer,
    read_weights,
)
from space.config import CANDIDATE_FIELDS, StitchConfig
from space.errors import close_matches
from space.files import atomic_path, atomic_write, file_sha256
from space.manifest import (
    AnchorRecord,
    ExportError,
    anchor_records_from,
    check_fields,
    read_json_object,
)
from space.stitched import StitchedNet, adapt_images, stitch_cuts
from space.stitching import StitchingLayer

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
            cuts = stitch_cuts(front, back, config)
            for side, info, anchor, cut, actual in (
                ("src", layer.src, front, config.front_block, cuts[0]),
                ("dst", layer.dst, back, config.back_block, cuts[1]),
            ):
                if info != actual:
                    raise ValueError(
                        f"stitch point {name!r}: the layer's {side} {info} is not cut {cut} of "
                        f"{anchor.name!r} ({actual}); build it for {config}"
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
        if tuple(x.shape[1:]) != tuple(self.input_size):
            x = adapt_images(x, self.input_size)
        h = self.front.forward_front(x, config.front_block)
        h = self.stitches[self.active](h)
        return self.back.forward_back(h, config.back_block)

    def extra_repr(self) -> str:
        return f"active={self.active!r}, stitch points={self.names}"


def save_switchable(net: SwitchableStitchedNet, path: str | Path) -> Path:
    """Saves a switchable network as ``<name>.json`` plus one ``<name>.safetensors``.

    The JSON (format :data:`SWITCHABLE_FORMAT`) records the two anchors as an export does
    (:class:`space.AnchorRecord`: name, checkpoint and its SHA-256, the state dict's SHA-256, timm
    kwargs), every stitch point's configuration,
    layer type and cuts, the active stitch point, and the SHA-256 of the weights file, which
    holds every stitching layer's tensors as ``<stitch point>.<tensor>``.

    Args:
        net: The network.
        path: The JSON file to write; the weights go next to it.

    Returns:
        The JSON path.
    """
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
        "anchors": [
            AnchorRecord.of(net.front, "front").to_dict(),
            AnchorRecord.of(net.back, "back").to_dict(),
        ],
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
    """Loads a network saved by :func:`save_switchable`, verified like :func:`space.load_export`.

    Raises:
        ExportError: Missing or invalid JSON, another format, missing or unknown fields,
            anchors or weights that are missing, altered or outside the folder.
    """
    path = Path(path)
    doc = read_json_object(path)
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
            CANDIDATE_FIELDS["stitch"] - {"kind"},
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
    # The anchors are validated as an export's, against the stitch points' anchor pair.
    records = anchor_records_from(path, recs, "stitch", [front_name, back_name])
    front = anchor_from_record(path, 0, records[0])
    back = front if back_name == front_name else anchor_from_record(path, 1, records[1])
    if back is front:
        check_same_anchor(path, records, 1)
    state = read_weights(path, doc["weights"], doc["sha256"], "")
    layers: dict[str, tuple[StitchConfig, StitchingLayer]] = {}
    for name, rec in stitches.items():
        where = f"stitches.{name}"
        try:
            config = StitchConfig.from_dict(candidates[name])
            config.validate(front, back)
        except ValueError as e:
            raise ExportError(path, str(e), field=f"{where}.candidate") from None
        layer = build_layer(path, rec, front, back, config, where)
        prefix = f"{name}."
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        fill_layer(path, layer, part, "weights")
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
