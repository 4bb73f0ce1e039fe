"""What a candidate is: anchors, stitch configurations, stitching layers, stitched networks."""

from space.anchor import SUPPORTED_FAMILIES, Anchor, FeatureInfo, anchor_id_problem
from space.artifact import LoadedExport, load_export, read_export
from space.config import Candidate, StitchConfig
from space.errors import InputError
from space.families import FamilyAdapter, family_names, register_family
from space.family import StitchedFamily, member_name, member_names
from space.family_io import FAMILY_FORMAT, load_family, place_anchor_weights, save_family
from space.files import atomic_write, file_sha256
from space.loading import load_anchor
from space.manifest import (
    EXPORT_FORMAT,
    AnchorRecord,
    ExportError,
    ExportManifest,
    StitchRecord,
    anchor_record,
    check_fields,
)
from space.stages import stage_ends, stage_stitch_points
from space.stitched import (
    StitchedNet,
    adapt_images,
    back_input_size,
    build_stitched,
    runs_at_any_size,
    stitch_cuts,
)
from space.stitching import (
    ConvStitch,
    ConvToToken,
    LeastSquares,
    StitchingLayer,
    TokenStitch,
    TokenToConv,
    make_stitching_layer,
)
from space.switchable import SwitchableStitchedNet, load_switchable, save_switchable

__all__ = [
    "EXPORT_FORMAT",
    "FAMILY_FORMAT",
    "SUPPORTED_FAMILIES",
    "Anchor",
    "AnchorRecord",
    "Candidate",
    "ConvStitch",
    "ConvToToken",
    "ExportError",
    "ExportManifest",
    "FamilyAdapter",
    "FeatureInfo",
    "InputError",
    "LeastSquares",
    "LoadedExport",
    "StitchConfig",
    "StitchRecord",
    "StitchedFamily",
    "StitchedNet",
    "StitchingLayer",
    "SwitchableStitchedNet",
    "TokenStitch",
    "TokenToConv",
    "adapt_images",
    "anchor_id_problem",
    "anchor_record",
    "atomic_write",
    "back_input_size",
    "build_stitched",
    "check_fields",
    "family_names",
    "file_sha256",
    "load_anchor",
    "load_export",
    "load_family",
    "load_switchable",
    "make_stitching_layer",
    "member_name",
    "member_names",
    "place_anchor_weights",
    "read_export",
    "register_family",
    "runs_at_any_size",
    "save_family",
    "save_switchable",
    "stage_ends",
    "stage_stitch_points",
    "stitch_cuts",
]
