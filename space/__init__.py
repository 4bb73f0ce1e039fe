"""What a candidate is: anchors, stitch configurations, stitching layers, stitched networks."""

from space.anchor import SUPPORTED_FAMILIES, Anchor, FeatureInfo, file_sha256, load_anchor
from space.config import StitchConfig
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
    "SUPPORTED_FAMILIES",
    "Anchor",
    "ConvStitch",
    "ConvToToken",
    "FeatureInfo",
    "StitchConfig",
    "StitchedNet",
    "StitchingLayer",
    "TokenStitch",
    "TokenToConv",
    "adapt_images",
    "build_stitched",
    "file_sha256",
    "load_anchor",
    "make_stitching_layer",
]
