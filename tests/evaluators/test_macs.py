from __future__ import annotations

import itertools

import pytest
import timm
import torch

from evaluators import (
    anchor_param_count,
    count_macs,
    count_params,
    stitched_macs,
    stitched_param_counts,
    stitched_parameters,
)
from evaluators.macs import BackPart, FrontPart
from space import StitchConfig, build_stitched


@pytest.mark.parametrize(
    ("name", "expected"),
    [("resnet18", 1.819e9), ("deit_tiny_patch16_224", 1.258e9), ("convnext_atto", 0.55e9)],
)
def test_published_macs_at_224(name: str, expected: float) -> None:
    model = timm.create_model(name)
    macs = count_macs(model, (3, 224, 224))
    assert abs(macs - expected) / expected < 0.01
    # Cross-check with torch's FlopCounterMode (flops / 2): it skips norms and pooling,
    # which fvcore counts, so it is slightly lower (see the module docstring).
    fast = count_macs(model, (3, 224, 224), backend="torch")
    assert 0 < (macs - fast) / macs < 0.01


@pytest.mark.parametrize("family", ["convnext", "vit", "deit", "resnet"])
def test_flop_counter_cross_check_on_tiny_anchors(family: str, tiny_anchor) -> None:
    anchor = tiny_anchor(family)
    fv = count_macs(anchor.model, anchor.input_size)
    fc = count_macs(anchor.model, anchor.input_size, backend="torch")
    # At 32 px and tiny widths norms weigh more than at 224 px: a looser tolerance.
    assert 0 <= (fv - fc) / fv < 0.05, (fv, fc)


def test_macs_scale_with_batch(tiny_anchor) -> None:
    anchor = tiny_anchor("resnet")
    one = count_macs(anchor.model, anchor.input_size)
    assert count_macs(anchor.model, (3, *anchor.input_size)) == 3 * one
    with pytest.raises(ValueError, match="backend must be"):
        count_macs(anchor.model, anchor.input_size, backend="ptflops")


PAIRS = [("resnet", "vit"), ("vit", "resnet"), ("convnext", "efficientnet"), ("deit", "vit")]


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_stitched_macs_are_the_sum_of_the_parts(a: str, b: str, tiny_anchor) -> None:
    front, back = tiny_anchor(a), tiny_anchor(b)
    k, j = max(1, front.num_blocks // 2), max(1, back.num_blocks // 2)
    net = build_stitched(front, back, StitchConfig(front.name, back.name, k, j))
    total = count_macs(net, net.input_size)
    parts = stitched_macs(net)
    assert parts["front"] > 0 and parts["stitch"] > 0 and parts["back"] > 0
    assert parts["total"] == parts["front"] + parts["stitch"] + parts["back"]
    assert abs(total - parts["total"]) <= 1e-6 * total
    # Strictly between bounds: more than the stitching layer alone, less than both anchors.
    whole = count_macs(front.model, front.input_size) + count_macs(back.model, back.input_size)
    assert parts["stitch"] < total < whole + parts["stitch"]
    # The stitch's MACs: a per-position linear map, d_in * d_out per output position
    # (plus resampling and prefix-token parts, counted too).
    src, dst = front.feature_info(k), back.feature_info(j)
    positions = dst.height * dst.width
    assert parts["stitch"] >= src.channels * dst.channels * positions


def test_front_and_back_parts_match_anchor_halves(tiny_anchor) -> None:
    anchor = tiny_anchor("resnet")
    n = anchor.num_blocks
    for k in (0, 2, n):
        front = count_macs(FrontPart(anchor, k), anchor.input_size)
        back = count_macs(BackPart(anchor, k), anchor.feature_info(k).shape)
        assert front + back == count_macs(anchor.model, anchor.input_size)
    assert not anchor.model.training


def test_stitched_params_count_only_the_parts_that_run(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    m = front.model
    net0 = build_stitched(front, back, StitchConfig(front.name, back.name, 0, back.num_blocks))
    counts = stitched_param_counts(net0)
    # k = 0: the front runs only its stem; j = n: the back runs only norm and head.
    assert counts["front"] == count_params(m.conv1) + count_params(m.bn1)
    assert counts["back"] == count_params(back.model.norm) + count_params(back.model.head)
    assert counts["stitch"] == count_params(net0.stitch) > 0
    assert counts["total"] == counts["front"] + counts["stitch"] + counts["back"]
    assert sum(p.numel() for p in stitched_parameters(net0)) == counts["total"]
    # Anchors: every parameter of these timm models is used.
    for a in (front, back):
        assert anchor_param_count(a) == count_params(a.model)
    # Values unchanged, flags restored.
    assert not any(p.requires_grad for p in net0.anchor_parameters())


@pytest.mark.parametrize(("k", "j"), list(itertools.product([1, 3], [1, 3])))
def test_self_stitch_params_count_shared_tensors_once(k: int, j: int, tiny_anchor) -> None:
    anchor = tiny_anchor("resnet")
    net = build_stitched(anchor, anchor, StitchConfig(anchor.name, anchor.name, k, j))
    counts = stitched_param_counts(net)
    full = count_params(anchor.model)
    if k == j:
        assert counts["total"] == full + counts["stitch"]
    elif k > j:  # blocks [j, k) run twice but count once
        assert counts["total"] == full + counts["stitch"]
        assert counts["front"] + counts["back"] > full
    else:  # blocks [k, j) are skipped
        assert counts["total"] < full + counts["stitch"]


def test_count_macs_keeps_modes(tiny_anchor) -> None:
    anchor = tiny_anchor("vit")
    net = build_stitched(anchor, anchor, StitchConfig(anchor.name, anchor.name, 1, 1))
    net.train()
    count_macs(net, net.input_size)
    stitched_macs(net)
    assert net.stitch.training and not anchor.model.training
    x = torch.randn(2, *anchor.input_size)
    assert torch.isfinite(net(x)).all()
