"""Shared fixtures: tiny timm anchors of every supported family.

The tests build seeded, randomly initialised anchors and compare their weights' SHA-256 with
files written on other machines (``space/data/old_export``). Intel's MKL picks its code
path by CPU (the ``erfinv`` in timm's truncated-normal initialisation gives other last bits
on an Intel Xeon than on an AMD EPYC); its conditional numerical reproducibility mode makes
the initialisation the same everywhere. Set before torch loads MKL; subprocesses inherit it.
"""

from __future__ import annotations

import os

os.environ.setdefault("MKL_CBWR", "COMPATIBLE")

import pytest
import torch

from space import Anchor, load_anchor

#: Tiny configurations of each family: (timm name, timm kwargs, input size).
TINY: dict[str, tuple[str, dict, tuple[int, int, int]]] = {
    "resnet": ("resnet10t", {"num_classes": 10}, (3, 32, 32)),
    "vit": (
        "vit_tiny_patch16_224",
        {
            "img_size": 32,
            "patch_size": 8,
            "depth": 3,
            "embed_dim": 48,
            "num_heads": 3,
            "num_classes": 10,
        },
        (3, 32, 32),
    ),
    "deit": (
        "deit_tiny_distilled_patch16_224",
        {
            "img_size": 32,
            "patch_size": 8,
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "num_classes": 10,
        },
        (3, 32, 32),
    ),
    "convnext": (
        "convnext_atto",
        {"depths": (1, 1, 2, 1), "dims": (16, 24, 32, 48), "num_classes": 10},
        (3, 32, 32),
    ),
    "efficientnet": ("efficientnet_b0", {"num_classes": 10}, (3, 32, 32)),
    "tf_efficientnet": ("tf_efficientnet_b0", {"num_classes": 10}, (3, 32, 32)),
    "mobilenetv3": ("mobilenetv3_small_050", {"num_classes": 10}, (3, 32, 32)),
}

#: The four families every ordered pair of which must stitch.
FOUR = ("resnet", "vit", "convnext", "efficientnet")


def make_tiny(family: str, seed: int = 0) -> Anchor:
    """A freshly initialised tiny anchor of ``family`` (deterministic for a seed)."""
    name, kwargs, size = TINY[family]
    anchor = load_anchor(name, input_size=size, seed=seed, **kwargs)
    torch.manual_seed(seed)
    # Randomly initialised BatchNorm statistics are the identity; perturb them so that the
    # tests exercise real normalisation.
    with torch.no_grad():
        for m in anchor.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return anchor


_CACHE: dict[str, Anchor] = {}


@pytest.fixture(scope="session")
def tiny_anchor():
    """Returns a session-cached tiny anchor for a family name."""

    def get(family: str) -> Anchor:
        if family not in _CACHE:
            _CACHE[family] = make_tiny(family)
        return _CACHE[family]

    return get


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and CI's two cores are shared with Ray."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
