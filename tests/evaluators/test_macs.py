from __future__ import annotations

import itertools

import numpy as np
import pytest
import timm
import torch

from evaluators import (
    ANY_OP,
    UncountedOpsError,
    anchor_param_count,
    count_macs,
    count_params,
    evaluate_candidate,
    fvcore_macs,
    stitch_macs,
    stitched_macs,
    stitched_param_counts,
    stitched_parameters,
    synthetic_splits,
)
from evaluators.macs import BackPart, FrontPart
from space import Anchor, StitchConfig, build_stitched, load_anchor
from tests.conftest import TINY, make_tiny


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


# No silent zeros (issue 26, item 5a): fvcore's unsupported operators are read, not ignored.

GRN = "aten::linalg_vector_norm"  # ConvNeXt-V2's global response norm: a sum of squares


def convnextv2() -> Anchor:
    """A tiny ConvNeXt-V2: its GRN traces to an operator fvcore cannot count."""
    return load_anchor(
        "convnextv2_atto",
        input_size=(3, 32, 32),
        depths=(1, 1, 1, 1),
        dims=(8, 16, 24, 32),
        num_classes=4,
    )


@pytest.mark.parametrize("family", sorted(TINY))
def test_every_tiny_family_is_counted_whole(family: str, tiny_anchor) -> None:
    anchor = tiny_anchor(family)
    count = fvcore_macs(anchor.model, anchor.input_size)
    assert count.uncounted == {}, count.uncounted
    assert count.total == count_macs(anchor.model, anchor.input_size) > 0


def test_an_operator_fvcore_cannot_count_is_refused_unless_allowed() -> None:
    anchor = convnextv2()
    with pytest.raises(UncountedOpsError) as err:
        count_macs(anchor.model, anchor.input_size, label="anchor 'v2'")
    line = str(err.value)
    assert "\n" not in line
    assert "anchor 'v2'" in line and f"{GRN} (4 calls)" in line
    assert f"macs: {{allow_unsupported: [{GRN}]}}" in line
    allowed = count_macs(anchor.model, anchor.input_size, allow_unsupported=[GRN])
    assert allowed == fvcore_macs(anchor.model, anchor.input_size).total > 0
    assert count_macs(anchor.model, anchor.input_size, allow_unsupported=[ANY_OP]) == allowed
    with pytest.raises(UncountedOpsError):  # another operator allowed is not this one
        count_macs(anchor.model, anchor.input_size, allow_unsupported=["aten::cdist"])
    # The fast backend does not read fvcore's list: it is not checked there.
    assert count_macs(anchor.model, anchor.input_size, backend="torch") > 0


def test_stitch_macs_refuse_per_anchor_part() -> None:
    v2, other = convnextv2(), make_tiny("resnet")
    with pytest.raises(UncountedOpsError, match=r"'convnextv2_atto'.*linalg_vector_norm"):
        stitch_macs(v2, other, [(2, 2)])
    with pytest.raises(UncountedOpsError, match=r"'convnextv2_atto'.*linalg_vector_norm"):
        stitch_macs(other, v2, [(2, 2)])  # as the back anchor
    allowed = stitch_macs(v2, other, [(2, 2)], allow_unsupported=[GRN])
    assert np.isfinite(allowed[2, 2]) and allowed[2, 2] > 0


def test_a_candidate_records_the_allowed_operators_and_refuses_the_others() -> None:
    v2 = convnextv2()
    data = synthetic_splits(num_classes=4, calibration=16, validation=16, test=16)
    anchors = {v2.name: v2}
    with pytest.raises(UncountedOpsError, match="anchor 'convnextv2_atto'"):
        evaluate_candidate(v2.name, anchors, data, measure_latency=False)
    result = evaluate_candidate(v2.name, anchors, data, measure_latency=False, macs_allow=[GRN])
    assert result.macs_uncounted == {GRN: 4}
    assert result.to_dict()["macs_uncounted"] == {GRN: 4}


def test_a_dynamic_vit_at_another_size_counts_its_position_embedding_resampling() -> None:
    # A ViT built with dynamic_img_size resamples its 4x4 position embedding to 6x6 at 48 px
    # (bicubic, antialiased), an operator fvcore has no handle for: it is priced, 16 MACs per
    # output element, instead of being refused or counted as zero.
    from fvcore.nn import FlopCountAnalysis

    from evaluators.macs import NO_MAC_OPS, _sdpa_handle

    name, kwargs, _ = TINY["vit"]  # 32 px, patches of 8, embed_dim 48
    vit = timm.create_model(name, **kwargs, dynamic_img_size=True).eval()
    count = fvcore_macs(vit, (3, 48, 48))
    assert count.uncounted == {}
    bare = FlopCountAnalysis(vit, torch.zeros(1, 3, 48, 48))
    bare.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
    bare.set_op_handle(*[a for op in NO_MAC_OPS for a in (op, None)])
    bare.unsupported_ops_warnings(False)
    total = int(bare.total())
    assert "aten::_upsample_bicubic2d_aa" in bare.unsupported_ops()
    assert count.total == total + 16 * 48 * 6 * 6
    assert count_macs(vit, (3, 48, 48)) == count.total
