from __future__ import annotations

import pytest
import torch

from space import (
    ConvStitch,
    ConvToToken,
    FeatureInfo,
    TokenStitch,
    TokenToConv,
    make_stitching_layer,
)
from space.stitching import resample_grid

CNN_A = FeatureInfo("NCHW", 6, 8, 8)
CNN_B = FeatureInfo("NCHW", 5, 4, 4)
VIT_A = FeatureInfo("NLC", 7, 4, 4, 1)
VIT_B = FeatureInfo("NLC", 9, 4, 4, 1)
VIT_C = FeatureInfo("NLC", 4, 2, 2, 2)

CASES = [
    (CNN_A, CNN_B, ConvStitch),
    (CNN_B, CNN_A, ConvStitch),
    (VIT_A, VIT_B, TokenStitch),
    (VIT_B, VIT_C, TokenStitch),
    (CNN_A, VIT_B, ConvToToken),
    (CNN_B, VIT_C, ConvToToken),
    (VIT_A, CNN_A, TokenToConv),
    (VIT_C, CNN_B, TokenToConv),
]


@pytest.mark.parametrize(("src", "dst", "cls"), CASES)
def test_layer_kind_and_shapes(src, dst, cls) -> None:
    layer = make_stitching_layer(src, dst)
    assert type(layer) is cls
    y = layer(torch.randn(3, *src.shape))
    assert tuple(y.shape[1:]) == dst.shape


@pytest.mark.parametrize(("src", "dst", "cls"), CASES)
def test_least_squares_recovers_planted_linear_map(src, dst, cls) -> None:
    torch.manual_seed(0)
    planted = make_stitching_layer(src, dst)
    with torch.no_grad():
        for p in planted.parameters():
            p.normal_()
    # Enough images that every part is over-determined (the prefix part sees one row each).
    batches = [torch.randn(64, *src.shape) for _ in range(4)]
    with torch.no_grad():
        pairs = [(x, planted(x)) for x in batches]
    fitted = make_stitching_layer(src, dst)
    residual = fitted.init_least_squares(pairs)
    assert all(r < 1e-8 for r in residual.values()), residual
    for (name, p), q in zip(planted.named_parameters(), fitted.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-3), name
    x = torch.randn(5, *src.shape)
    with torch.no_grad():
        assert (fitted(x) - planted(x)).abs().max() < 1e-3


def test_least_squares_rejects_nonfinite() -> None:
    layer = make_stitching_layer(CNN_A, CNN_B)
    x = torch.randn(4, *CNN_A.shape)
    y = torch.randn(4, *CNN_B.shape)
    y[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite activations"):
        layer.init_least_squares([(x, y)])


def test_least_squares_rejects_wrong_shapes() -> None:
    layer = make_stitching_layer(CNN_A, CNN_B)
    with pytest.raises(ValueError, match="expected"):
        layer.init_least_squares([(torch.randn(2, *CNN_B.shape), torch.randn(2, *CNN_B.shape))])
    with pytest.raises(ValueError, match="at least one batch"):
        layer.init_least_squares([])


def test_resampling_is_area_when_shrinking_and_bilinear_when_growing() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    down = resample_grid(x, (2, 2))
    assert torch.allclose(down, torch.nn.functional.avg_pool2d(x, 2))
    up = resample_grid(x, (8, 8))
    assert up.shape[-2:] == (8, 8)
    # Bilinear up then area down returns the interior unchanged (edges are clamped).
    assert torch.allclose(resample_grid(up, (4, 4))[..., 1:3, 1:3], x[..., 1:3, 1:3])
    assert resample_grid(x, (4, 4)) is x


def test_prefix_tokens_shared_when_counts_match() -> None:
    layer = make_stitching_layer(VIT_A, VIT_B)
    assert layer.prefix is None
    other = make_stitching_layer(VIT_A, VIT_C)
    assert other.prefix is not None and other.prefix.out_features == 2 * VIT_C.channels
