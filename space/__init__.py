"""What a candidate is: anchors, stitch configurations, stitching layers, stitched networks."""

from space.anchor import SUPPORTED_FAMILIES, Anchor, FeatureInfo, file_sha256, load_anchor
from space.config import Candidate, StitchConfig
from space.errors import InputError
from space.export import (
    EXPORT_FORMAT,
    ExportError,
    LoadedExport,
    SwitchableStitchedNet,
    anchor_record,
    check_fields,
    load_export,
    load_switchable,
    read_export,
    save_switchable,
)
from space.families import FamilyAdapter, family_names, register_family
from space.stitched import StitchedNet, adapt_images, build_stitched
from space.stitching import (
    ConvStitch,
    ConvToToken,
    StitchingLayer,
    TokenStitch,
    TokenToConv,
    make_stitching_layer,
)

__all__ = [
    "EXPORT_FORMAT",
    "SUPPORTED_FAMILIES",
    "Anchor",
    "Candidate",
    "ConvStitch",
    "ConvToToken",
    "ExportError",
    "FamilyAdapter",
    "FeatureInfo",
    "InputError",
    "LoadedExport",
    "StitchConfig",
    "StitchedNet",
    "StitchingLayer",
    "SwitchableStitchedNet",
    "TokenStitch",
    "TokenToConv",
    "adapt_images",
    "anchor_record",
    "build_stitched",
    "check_fields",
    "family_names",
    "file_sha256",
    "load_anchor",
    "load_export",
    "load_switchable",
    "make_stitching_layer",
    "read_export",
    "register_family",
    "save_switchable",
]
