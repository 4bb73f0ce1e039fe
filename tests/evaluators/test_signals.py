"""Stitch-point signals (issue 14, item 3): known answers on tiny cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluators import (
    cka_matrix,
    evaluate_candidate,
    stitch_macs,
    stitch_points,
    stitch_signals,
    stitched_macs,
    synthetic_splits,
)
from space import StitchConfig, build_stitched
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def resnet():
    return make_tiny("resnet")


def test_identical_features_give_zero_residual_and_kl_and_cka_one(resnet) -> None:
    # A self-stitch at equal cuts: the target is the source, least squares is the identity.
    images = torch.randn(48, 3, 32, 32)
    sig = stitch_signals(resnet, resnet, [images[:24], images[24:]], use_cache=False)
    cka = cka_matrix(resnet, resnet, [images[:24], images[24:]], use_cache=False)
    for k in range(1, resnet.num_blocks):
        assert sig["residual"][k, k] == pytest.approx(0.0, abs=1e-6)
        assert sig["kl"][k, k] == pytest.approx(0.0, abs=1e-4)
        assert cka[k, k] == pytest.approx(1.0, abs=1e-6)
    # Other cuts are not explained exactly, and the stitched outputs differ.
    assert sig["residual"][1, resnet.num_blocks - 1] > 1e-3
    assert sig["kl"][1, resnet.num_blocks - 1] > 0.0


def test_signals_equal_each_stitch_points_own_fit() -> None:
    front, back = make_tiny("resnet"), make_tiny("vit")
    images = torch.randn(32, 3, 32, 32)
    sig = stitch_signals(front, back, [images[:16], images[16:]], use_cache=False)
    assert np.isnan(sig["residual"][0]).all() and np.isnan(sig["kl"][:, -1]).all()
    for k, j in stitch_points(front, back):
        net = build_stitched(front, back, StitchConfig(front.name, back.name, k, j))
        net.init_least_squares([images[:16], images[16:]])
        assert sig["residual"][k, j] == pytest.approx(net.stitch.residual, rel=1e-6, abs=1e-9)
        with torch.no_grad():
            p = torch.log_softmax(back.model(images).double(), 1)
            q = torch.log_softmax(net(images).double(), 1)
        kl = float((p.exp() * (p - q)).sum(1).mean())
        assert sig["kl"][k, j] == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_stitch_macs_equal_the_networks(resnet) -> None:
    back = make_tiny("convnext")
    macs = stitch_macs(resnet, back)
    for k, j in [(1, 0), (2, 3), (resnet.num_blocks, back.num_blocks - 1)]:
        net = build_stitched(resnet, back, StitchConfig(resnet.name, back.name, k, j))
        assert macs[k, j] == stitched_macs(net)["total"]


def test_cache_round_trip_and_bad_signal(resnet, tmp_path) -> None:
    images = torch.randn(16, 3, 32, 32)
    first = stitch_signals(resnet, resnet, [images], cache_dir=tmp_path, data_identity="d")
    assert list(tmp_path.glob("signals--*.npz"))
    again = stitch_signals(resnet, resnet, [images * 0], cache_dir=tmp_path, data_identity="d")
    np.testing.assert_array_equal(first["kl"], again["kl"])  # read back, not recomputed
    with pytest.raises(ValueError, match="signals must be some of"):
        stitch_signals(resnet, resnet, [images], signals=["naswot"], use_cache=False)
    with pytest.raises(ValueError, match="the loader gave none"):
        stitch_signals(resnet, resnet, [], use_cache=False)


def test_candidate_result_records_the_residual() -> None:
    front, back = make_tiny("resnet"), make_tiny("vit")
    data = synthetic_splits(num_classes=10, calibration=32, validation=16, test=8, batch_size=16)
    anchors = {front.name: front, back.name: back}
    cfg = StitchConfig(front.name, back.name, 2, 1)
    res = evaluate_candidate(cfg, anchors, data, measure_latency=False, threads=1)
    sig = stitch_signals(front, back, data.calibration, use_cache=False)
    assert res.residual == pytest.approx(sig["residual"][2, 1], rel=1e-6)
    assert res.to_dict()["residual"] == res.residual


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda d: d[: len(d) // 2], id="truncated-zip"),
        pytest.param(lambda d: b"garbage" * 100, id="garbage"),
        pytest.param(lambda d: b"", id="empty"),
    ],
)
def test_a_damaged_signal_cache_entry_is_recomputed(resnet, tmp_path, damage) -> None:
    images = torch.randn(16, 3, 32, 32)
    first = stitch_signals(resnet, resnet, [images], cache_dir=tmp_path, data_identity="d")
    (entry,) = tmp_path.glob("signals--*.npz")
    entry.write_bytes(damage(entry.read_bytes()))
    again = stitch_signals(resnet, resnet, [images], cache_dir=tmp_path, data_identity="d")
    np.testing.assert_allclose(first["kl"], again["kl"], rtol=1e-5, atol=1e-7)
    with np.load(entry, allow_pickle=False) as z:  # rewritten whole
        np.testing.assert_array_equal(z["kl"], again["kl"])
