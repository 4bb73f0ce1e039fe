"""The default zoo's architectures and training recipe (timm models adapted to 28x28 grayscale)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ZooSpec:
    """One zoo anchor: a timm architecture with kwargs, and how it is trained.

    Attributes:
        name: Zoo name (``zoo:<name>``).
        family: ``"resnet"`` or ``"vit"``.
        timm_name: The timm model name.
        timm_kwargs: Keyword arguments for ``timm.create_model``.
        epochs: Training epochs.
        lr: Peak AdamW learning rate.
    """

    name: str
    family: str
    timm_name: str
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10
    lr: float = 2e-3


_COMMON = {"in_chans": 1, "num_classes": 10}

SPECS: dict[str, ZooSpec] = {
    s.name: s
    for s in (
        ZooSpec(
            "resnet-s",
            "resnet",
            "resnet18",
            {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8, **_COMMON},
            epochs=10,
            lr=3e-3,
        ),
        ZooSpec(
            "resnet-l",
            "resnet",
            "resnet18",
            {"layers": (2, 2, 2, 2), "channels": (32, 64, 128, 256), "stem_width": 32, **_COMMON},
            epochs=12,
            lr=3e-3,
        ),
        ZooSpec(
            "vit-s",
            "vit",
            "vit_tiny_patch16_224",
            {
                "img_size": 28,
                "patch_size": 4,
                "embed_dim": 32,
                "depth": 4,
                "num_heads": 2,
                **_COMMON,
            },
            epochs=12,
            lr=2e-3,
        ),
        ZooSpec(
            "vit-l",
            "vit",
            "vit_tiny_patch16_224",
            {
                "img_size": 28,
                "patch_size": 4,
                "embed_dim": 64,
                "depth": 6,
                "num_heads": 4,
                "mlp_ratio": 2.0,
                **_COMMON,
            },
            epochs=12,
            lr=2e-3,
        ),
    )
}

#: The recipe shared by every zoo anchor (recorded in the manifest).
RECIPE: dict[str, Any] = {
    "data": "Fashion-MNIST train split minus the 10,000-image held-out part (seed 0); "
    "validation = the first 5,000 held-out images; test = the full 10,000-image test split",
    "optimizer": "AdamW, betas (0.9, 0.999), weight decay 0.05 (not on norms/biases/tokens)",
    "schedule": "linear warm-up for 1 epoch, then cosine decay to 0, per step",
    "batch_size": 128,
    "loss": "cross-entropy with label smoothing 0.1",
    "augmentation": "random crop 28 with 2-pixel zero padding, horizontal flip",
    "normalisation": "(x / 255 - 0.2860) / 0.3530",
    "seed": 0,
    "threads": 2,
}


#: How a zoo anchor's inputs are prepared, as a timm data config (recorded per anchor in the
#: manifest, so that image-folder data is normalised as in training): single-channel
#: Fashion-MNIST statistics, the whole image (no centre crop), bilinear resizing (as the
#: Fashion-MNIST loader adapts images to other sizes).
DATA_CONFIG: dict[str, Any] = {
    "mean": [0.286],
    "std": [0.353],
    "crop_pct": 1.0,
    "interpolation": "bilinear",
}


def spec_dict(spec: ZooSpec) -> dict[str, Any]:
    """JSON-friendly form of a spec (tuples as lists)."""
    d = asdict(spec)
    d["timm_kwargs"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in d["timm_kwargs"].items()
    }
    return d
