"""Input resolution as a search dimension (issue 14, item 2): candidates and anchor views.

A candidate may carry a ``resolution``; both anchors then run on the same images at that
size through :meth:`space.Anchor.at_resolution` (ViTs with their position embedding
interpolated to the new patch grid).
"""

from __future__ import annotations

import pytest
import torch

from space import Candidate, StitchConfig, build_stitched
from tests.conftest import FOUR, make_tiny


def test_candidate_resolution_is_part_of_its_identity_and_json() -> None:
    native = Candidate("a", "b", 2, 1)
    at48 = native.at(48)
    assert at48.resolution == 48 and at48 != native
    assert native.key == "stitch|a|2|b|1"  # native keys are unchanged (old studies resume)
    assert at48.key != native.key and "48" in at48.key
    assert at48.at(40).key != at48.key
    assert "@48px" in at48.label
    assert Candidate.from_dict(at48.to_dict()) == at48
    assert Candidate.from_json(at48.to_json()) == at48
    assert "resolution" not in native.to_dict()
    anchor = Candidate.anchor("a", 40)
    assert anchor.is_anchor and Candidate.from_dict(anchor.to_dict()) == anchor
    assert anchor.key != Candidate.anchor("a").key


@pytest.mark.parametrize("bad", [0, -32, 32.5, "32", True])
def test_candidate_rejects_bad_resolutions(bad) -> None:
    with pytest.raises(ValueError, match="resolution"):
        Candidate.from_dict({"kind": "anchor", "anchor": "a", "resolution": bad})
    with pytest.raises(ValueError, match="resolution"):
        Candidate("a", "b", 1, 0, bad)


@pytest.mark.parametrize("family", [*FOUR, "deit", "mobilenetv3"])
def test_every_family_runs_at_another_size(family) -> None:
    anchor = make_tiny(family)
    view = anchor.at_resolution(48)
    assert view.input_size == (3, 48, 48)
    assert view.name == anchor.name and view.num_blocks == anchor.num_blocks
    assert (view.model is anchor.model) == (anchor.kind == "cnn")  # a ViT gets a copy
    assert anchor.at_resolution(48) is view  # one view per size
    assert anchor.at_resolution(32) is anchor  # the native size is the anchor itself
    with torch.no_grad():
        out = view.model(torch.randn(2, 3, 48, 48))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # Cuts at 48 px are larger grids than at the native 32 px.
    assert view.features()[-1].height >= anchor.features()[-1].height
    assert view.features()[1].height > anchor.features()[1].height


def test_vit_view_interpolates_its_position_embedding_once() -> None:
    vit = make_tiny("vit")
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        before = vit.model(x)
    view = vit.at_resolution(48)
    # The view is a fixed-size ViT at 48 px (6 x 6 patches of 8 px); the anchor is untouched.
    assert view.model.pos_embed.shape[1] == 1 + 36
    assert vit.model.pos_embed.shape[1] == 1 + 16
    assert not getattr(view.model, "dynamic_img_size", False)
    with torch.no_grad():
        assert torch.equal(vit.model(x), before)
    assert view.feature_info(1).grid == (6, 6)
    assert vit.feature_info(1).grid == (4, 4)
    # The same interpolation as timm's dynamic image size performs on every forward pass.
    from space import load_anchor
    from tests.conftest import TINY

    name, kwargs, _ = TINY["vit"]
    dynamic = load_anchor(name, seed=0, dynamic_img_size=True, **kwargs)
    dynamic.model.load_state_dict(vit.model.state_dict())
    y = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(view.model(y), dynamic.model(y), atol=1e-5)


@pytest.mark.parametrize("size, why", [(4, "smaller than the patch size 8"), (36, "multiple")])
def test_vit_refuses_sizes_its_patches_do_not_tile(size, why) -> None:
    vit = make_tiny("vit")
    with pytest.raises(ValueError, match=why) as e:
        vit.at_resolution(size)
    assert vit.name in str(e.value) and f"{size} px" in str(e.value)


@pytest.mark.parametrize("pair", [("resnet", "vit"), ("vit", "resnet"), ("vit", "convnext")])
def test_stitch_of_views_runs_both_anchors_at_the_resolution(pair) -> None:
    # At 48 px both anchors see the same images at 48 px: the stitch maps equal grids where
    # the reductions agree, and the network runs on 48-px images.
    front = make_tiny(pair[0]).at_resolution(48)
    back = make_tiny(pair[1], seed=1).at_resolution(48)
    cfg = StitchConfig(front.name, back.name, 1, 1)
    net = build_stitched(front, back, cfg, calibration=torch.randn(16, 3, 28, 28))
    assert net.input_size == net.back_input_size == (3, 48, 48)
    assert net.stitch.dst == back.feature_info(1, (3, 48, 48))
    with torch.no_grad():
        out = net(torch.randn(2, 3, 28, 28))  # adapted once to 48 px
    assert out.shape == (2, 10) and torch.isfinite(out).all()
