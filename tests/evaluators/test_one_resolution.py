"""One input resolution per stitched network in the evaluators (issue 14, item 1).

Least squares, CKA, accuracy and a whole candidate evaluation with anchors of different
native input sizes, in both orders; see ``tests/space/test_resolution.py`` for the network.
"""

from __future__ import annotations

import pytest
import torch

from evaluators import accuracy, cka_matrix, evaluate_candidate, fit_stitch, synthetic_splits
from space import StitchConfig, adapt_images, build_stitched
from tests.conftest import make_tiny


def _at(family: str, size: int, seed: int = 0):
    anchor = make_tiny(family, seed=seed)
    anchor.input_size = (3, size, size)
    return anchor


def test_fit_stitch_adapts_front_images_and_matches_build() -> None:
    front, back = _at("resnet", 32), _at("convnext", 48)
    cfg = StitchConfig(front.name, back.name, 2, 2)
    calib = torch.randn(32, 3, 40, 40)
    built = build_stitched(front, back, cfg, calibration=calib)
    net = build_stitched(front, back, cfg)
    fit = fit_stitch(net, [(calib, torch.zeros(32, dtype=torch.long))])
    assert fit.ls_images == 32
    assert fit.residual == pytest.approx(built.stitch.fit_residual, rel=1e-6)


def test_cka_sees_one_resolution() -> None:
    # The same weights declared at 32 and 48 px: the back anchor now runs at the front's
    # size, so equal cuts have identical features and CKA 1 (it was < 1 before the fix).
    front, back = _at("resnet", 32), _at("resnet", 48)
    images = torch.randn(64, 3, 40, 40)
    m = cka_matrix(front, back, [images[:32], images[32:]], use_cache=False)
    for c in range(front.num_blocks + 1):
        assert m[c, c] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("order", ["small_first", "large_first"])
def test_candidate_of_two_native_sizes(order) -> None:
    # Calibration, validation and test images at 40 px; anchors at 32 and 48 px.
    a, b = _at("resnet", 32), _at("convnext", 48)
    front, back = (a, b) if order == "small_first" else (b, a)
    data = synthetic_splits(
        num_classes=10,
        input_size=(3, 40, 40),
        calibration=32,
        validation=24,
        test=8,
        batch_size=16,
    )
    anchors = {front.name: front, back.name: back}
    cfg = StitchConfig(front.name, back.name, 2, 1)
    res = evaluate_candidate(cfg, anchors, data, measure_latency=False, threads=1)
    assert res.val_images == 24 and 0.0 <= res.val_acc <= 100.0
    assert 0.0 <= res.residual < 1.0
    # The same network evaluated on images adapted beforehand gives the same accuracy.
    pre = [(adapt_images(x, front.input_size), y) for x, y in data.validation]
    assert accuracy(res.net, pre).top1 == pytest.approx(res.val_acc)
