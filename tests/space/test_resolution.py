"""One input resolution per stitched network (issue 14, item 1).

The front anchor's input used to be adapted only for the back anchor, never for the front
anchor itself: calibration images of another size than the front anchor's failed least
squares (``got activations (128, 8, 8) -> (128, 28, 28)``). Now every path adapts the images
once to the stitched network's input size (the front anchor's) and shows the back anchor the
same images at that size when it can run at it.
"""

from __future__ import annotations

import pytest
import torch

from space import (
    StitchConfig,
    adapt_images,
    back_input_size,
    build_stitched,
    load_anchor,
    runs_at_any_size,
)
from tests.conftest import TINY, make_tiny


def _at(family: str, size: int, seed: int = 0):
    """A tiny anchor of ``family`` declared to run at ``size`` px (a fresh object)."""
    anchor = make_tiny(family, seed=seed)
    anchor.input_size = (3, size, size)
    return anchor


def test_issue_reproduction_resnet18_with_64px_calibration() -> None:
    # The issue's exact case: resnet18 (native 224 px) calibrated with 64-px images.
    a = load_anchor("resnet18", num_classes=10)
    assert a.input_size == (3, 224, 224)
    x = torch.randn(4, 3, 64, 64)
    net = build_stitched(a, a, StitchConfig(a.name, a.name, 3, 3), calibration=x)
    assert net.stitch.src.grid == net.stitch.dst.grid == (28, 28)
    with torch.no_grad():
        out = net(x)  # the forward pass adapts 64 px to 224 px as well
        ref = a.model(adapt_images(x, a.input_size))
    assert (out - ref).abs().max().item() <= 1e-3 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("front_px, back_px", [(32, 48), (48, 32)])
def test_same_architecture_at_two_sizes_needs_no_resampling(front_px, back_px) -> None:
    # The same ResNet declared at two sizes: at equal cuts the back anchor runs at the front
    # anchor's size, so source and target grids agree and nothing is resampled.
    front, back = _at("resnet", front_px), _at("resnet", back_px, seed=1)
    assert back_input_size(front, back) == (3, front_px, front_px)
    calib = torch.randn(24, 3, 40, 40)  # a third size: adapted once to the front's
    for k in range(1, front.num_blocks + 1):
        net = build_stitched(
            front, back, StitchConfig(front.name, back.name, k, k), calibration=calib
        )
        assert net.stitch.src.grid == net.stitch.dst.grid
        out = net(torch.randn(2, 3, 40, 40))
        assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("order", ["small_first", "large_first"])
def test_every_stitch_point_of_two_native_sizes(order) -> None:
    # ResNet at 32 px and ConvNeXt at 48 px, both orders, every stitch point of the space.
    a, b = _at("resnet", 32), _at("convnext", 48)
    front, back = (a, b) if order == "small_first" else (b, a)
    calib = torch.randn(16, 3, 40, 40)
    x = torch.randn(2, 3, 40, 40)
    for k in range(1, front.num_blocks + 1):
        for j in range(back.num_blocks):
            cfg = StitchConfig(front.name, back.name, k, j)
            net = build_stitched(front, back, cfg, calibration=calib)
            assert net.input_size == front.input_size
            assert net.stitch.dst == back.feature_info(j, back_input_size(front, back))
            assert all(r < 1.0 for r in net.stitch.fit_residual.values()), cfg
            with torch.no_grad():
                out = net(x)
            assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("order", ["cnn_vit", "vit_cnn"])
def test_fixed_size_vit_keeps_its_own_size(order) -> None:
    # A ViT without dynamic_img_size cannot run at another size: it sees the images at its
    # own size and the stitching layer resamples (the documented fallback).
    cnn, vit = _at("resnet", 48), make_tiny("vit")
    assert runs_at_any_size(cnn) and not runs_at_any_size(vit)
    front, back = (cnn, vit) if order == "cnn_vit" else (vit, cnn)
    # cnn -> vit: the ViT back at its own 32 px; vit -> cnn: the CNN back follows the front.
    assert back_input_size(front, back) == (3, 32, 32)
    calib = torch.randn(16, 3, 40, 40)
    for k in range(1, front.num_blocks + 1):
        for j in range(back.num_blocks):
            net = build_stitched(
                front, back, StitchConfig(front.name, back.name, k, j), calibration=calib
            )
            with torch.no_grad():
                assert torch.isfinite(net(torch.randn(2, 3, 40, 40))).all()


@pytest.mark.parametrize("family", ["resnet", "convnext", "vit"])
def test_tiny_anchors_run_at_32px_as_the_tests_above_assume(family: str) -> None:
    # The tests above take 32 px as the tiny anchors' native size: the loaded anchors say so,
    # classify 32-px images, and the fixed-size ViT refuses any other size.
    anchor = make_tiny(family)
    assert anchor.input_size == TINY[family][2] == (3, 32, 32)
    with torch.no_grad():
        assert anchor.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        if family == "vit":
            with pytest.raises(AssertionError, match="doesn't match model"):
                anchor.model(torch.randn(1, 3, 40, 40))
        else:
            assert anchor.model(torch.randn(1, 3, 40, 40)).shape == (1, 10)
