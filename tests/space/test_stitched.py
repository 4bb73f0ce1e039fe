from __future__ import annotations

import itertools

import pytest
import torch

from space import StitchConfig, build_stitched
from tests.conftest import FOUR


def _mid(n: int) -> int:
    return max(1, n // 2)


@pytest.mark.parametrize("family", ["resnet", "vit", "convnext", "efficientnet", "deit"])
def test_self_stitch_reproduces_anchor(family: str, tiny_anchor) -> None:
    anchor = tiny_anchor(family)
    k = _mid(anchor.num_blocks)
    cfg = StitchConfig(anchor.name, anchor.name, k, k)
    calib = torch.randn(96, *anchor.input_size)
    net = build_stitched(anchor, anchor, cfg, calibration=calib.split(32))
    x = torch.randn(8, *anchor.input_size)
    with torch.no_grad():
        diff = (net(x) - anchor.model(x)).abs().max().item()
    assert diff <= 1e-3


@pytest.mark.parametrize(("a", "b"), list(itertools.product(FOUR, FOUR)))
def test_every_ordered_pair_builds_and_runs(a: str, b: str, tiny_anchor) -> None:
    front, back = tiny_anchor(a), tiny_anchor(b)
    cfg = StitchConfig(front.name, back.name, _mid(front.num_blocks), _mid(back.num_blocks))
    net = build_stitched(front, back, cfg, calibration=torch.randn(16, *front.input_size))
    out = net(torch.randn(4, *front.input_size))
    assert out.shape == (4, back.num_classes)
    assert torch.isfinite(out).all()
    assert all(r < 1.0 for r in net.stitch.fit_residual.values())


def test_only_stitch_is_trainable(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    net = build_stitched(front, back, StitchConfig(front.name, back.name, 2, 1))
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("stitch.") for n in trainable)
    net.train()
    assert net.stitch.training
    assert not front.model.training and not back.model.training
    # Gradients flow to the stitching layer only.
    net(torch.randn(2, *front.input_size)).sum().backward()
    assert all(p.grad is not None for p in net.stitch.parameters())
    assert all(p.grad is None for p in net.anchor_parameters())
    net.zero_grad(set_to_none=True)


def test_least_squares_beats_random_init(tiny_anchor) -> None:
    front, back = tiny_anchor("convnext"), tiny_anchor("resnet")
    cfg = StitchConfig(front.name, back.name, 2, 2)
    calib = torch.randn(64, *front.input_size)
    x = torch.randn(32, *front.input_size)
    rand = build_stitched(front, back, cfg)
    ls = build_stitched(front, back, cfg, calibration=calib)
    with torch.no_grad():
        src, dst = ls.activation_pairs(x)
        err_ls = (ls.stitch(src) - dst).pow(2).mean()
        err_rand = (rand.stitch(src) - dst).pow(2).mean()
    assert err_ls < err_rand


def test_back_anchor_with_other_input_size(tiny_anchor) -> None:
    from tests.conftest import make_tiny

    front = tiny_anchor("resnet")
    back = make_tiny("convnext")
    back.input_size = (3, 48, 48)
    net = build_stitched(
        front,
        back,
        StitchConfig(front.name, back.name, 1, 1),
        calibration=torch.randn(8, *front.input_size),
    )
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
