"""Stage boundaries (``cuts: stages``): each family's stages and the stitch points between them."""

from __future__ import annotations

import pytest
import torch

from space import StitchConfig, build_stitched, stage_ends, stage_stitch_points

#: Stage ends of the tiny anchors (tests/conftest.py): the cut after each stage.
ENDS = {
    "resnet": [1, 2, 3, 4],  # resnet10t: layers (1, 1, 1, 1)
    "convnext": [1, 2, 4, 5],  # depths (1, 1, 2, 1)
    "efficientnet": [1, 3, 5, 8, 11, 15, 16],  # efficientnet_b0: (1, 2, 2, 3, 3, 4, 1)
    "tf_efficientnet": [1, 3, 5, 8, 11, 15, 16],
    "mobilenetv3": [1, 3, 6, 8, 11, 12],  # mobilenetv3_small_050: (1, 2, 3, 2, 3, 1)
}


@pytest.mark.parametrize("family", sorted(ENDS))
def test_stage_ends_bound_runs_of_equal_feature_maps(tiny_anchor, family) -> None:
    anchor = tiny_anchor(family)
    ends = stage_ends(anchor)
    assert ends == ENDS[family]
    assert ends[-1] == anchor.num_blocks
    # Blocks within a stage keep their input's shape, so every change of shape is at a stage
    # boundary (not every boundary changes it: mobilenetv3_small_050 rounds two widths to 24).
    shapes = [f.shape for f in anchor.features()]
    changes = [c for c in range(1, anchor.num_blocks) if shapes[c] != shapes[c + 1]]
    assert set(changes) <= set(ends)
    assert len(changes) >= len(ends) - 2


def test_a_vit_has_no_stages(tiny_anchor) -> None:
    vit = tiny_anchor("vit")
    assert stage_ends(vit) is None
    with pytest.raises(ValueError, match=r"'vit_tiny_patch16_224' \(vit\) has no stages"):
        stage_stitch_points(tiny_anchor("resnet"), vit)


def test_stage_points_pair_stage_s_of_both_anchors(tiny_anchor) -> None:
    eff, tf = tiny_anchor("efficientnet"), tiny_anchor("tf_efficientnet")
    # Front cut after stage s, back cut after the same stage; the last stage is left out
    # (no back block would run).
    assert stage_stitch_points(eff, tf) == [(1, 1), (3, 3), (5, 5), (8, 8), (11, 11), (15, 15)]
    resnet, convnext = tiny_anchor("resnet"), tiny_anchor("convnext")
    assert stage_stitch_points(resnet, convnext) == [(1, 1), (2, 2), (3, 4)]
    assert stage_stitch_points(convnext, resnet) == [(1, 1), (2, 2), (4, 3)]


def test_different_stage_counts_are_an_error(tiny_anchor) -> None:
    with pytest.raises(ValueError, match=r"\(4 stages\) and 'efficientnet_b0' \(7 stages\)"):
        stage_stitch_points(tiny_anchor("resnet"), tiny_anchor("efficientnet"))


def test_every_stage_point_stitches_and_joins_equal_grids(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("convnext")
    x = torch.randn(8, 3, 32, 32)
    for k, j in stage_stitch_points(front, back):
        # A stage boundary of one net meets the same stage boundary of the other: same grid.
        assert front.feature_info(k).grid == back.feature_info(j).grid
        net = build_stitched(front, back, StitchConfig(front.name, back.name, k, j), calibration=x)
        assert net(x[:2]).shape == (2, 10)
