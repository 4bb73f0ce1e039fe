"""Stitching layers: small linear maps from one anchor's cut to another's.

Four directions, chosen by :func:`make_stitching_layer` from the two cuts' layouts:

=================  ===================================================================
``ConvStitch``     CNN -> CNN: a 1x1 convolution (SN-Net).
``TokenStitch``    ViT -> ViT: a token-wise linear layer (SN-Net).
``ConvToToken``    CNN -> ViT: the feature map becomes patch tokens on the back anchor's
                   grid, a token-wise linear layer maps channels, and the back anchor's
                   prefix (class/distillation) tokens are produced from the globally
                   averaged feature map by a second linear layer.
``TokenToConv``    ViT -> CNN: prefix tokens are dropped, patch tokens are laid out on
                   their grid, and a 1x1 convolution maps channels.
=================  ===================================================================

**Resampling.** When the two sides' spatial grids differ (feature-map size, or the patch-token
grid), the source grid is resampled to the target grid *before* the channel map: by area
averaging (``adaptive_avg_pool2d``) when both sides shrink, by bilinear interpolation
(``align_corners=False``) otherwise. Both are linear, so least squares stays exact for
targets that are linear in the (resampled) source.

**Prefix tokens.** ViT -> ViT with equal prefix-token counts maps prefix tokens with the same
token-wise linear layer as the patch tokens (as SN-Net). Otherwise (CNN -> ViT, or unequal
counts) the prefix tokens come from a separate linear layer on the globally averaged source.

**Least squares.** :meth:`StitchingLayer.init_least_squares` fits every linear part with a
bias from paired activations, over all positions (NCHW flattened to positions first), as
SN-Net's ``pinv([X, 1]) @ Y``. The normal equations are accumulated in float64 over batches
and solved with a pseudo-inverse, which gives the same minimum-norm solution with memory
independent of the number of images.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from space.anchor import FeatureInfo


def resample_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resamples an NCHW tensor to ``size`` (area average when shrinking, else bilinear)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if size[0] <= h and size[1] <= w:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _tokens_to_grid(x: torch.Tensor, info: FeatureInfo) -> torch.Tensor:
    """Patch tokens ``(B, p + H*W, C)`` -> ``(B, C, H, W)`` (prefix dropped)."""
    patches = x[:, info.num_prefix_tokens :, :]
    b, _, c = patches.shape
    return patches.transpose(1, 2).reshape(b, c, info.height, info.width)


def _grid_to_positions(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``."""
    return x.flatten(2).transpose(1, 2)


class _NormalEquations:
    """Streams the normal equations of ``[X, 1] W = Y`` in float64."""

    def __init__(self) -> None:
        self.gram: torch.Tensor | None = None
        self.xty: torch.Tensor | None = None
        self.yy = 0.0
        self.ysum: torch.Tensor | None = None
        self.n = 0

    def update(self, x: torch.Tensor, y: torch.Tensor, what: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        y = y.detach().reshape(-1, y.shape[-1]).double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            raise ValueError(
                f"non-finite activations while fitting the stitching layer ({what}); "
                "check the anchors' weights and the input images"
            )
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
        gram, xty = xa.T @ xa, xa.T @ y
        if self.gram is None:
            self.gram, self.xty, self.ysum = gram, xty, y.sum(0)
        else:
            self.gram += gram
            self.xty += xty
            self.ysum += y.sum(0)
        self.yy += float((y * y).sum())
        self.n += x.shape[0]

    def solve(self) -> tuple[torch.Tensor, torch.Tensor, float, float, float]:
        """Returns ``(W (d_out, d_in), b (d_out,), relative residual, SSE, total SS)``."""
        assert self.gram is not None and self.xty is not None and self.ysum is not None
        # Scale columns so the pseudo-inverse's cutoff is relative per feature.
        d = self.gram.diagonal().clamp_min(1e-30).sqrt()
        g = self.gram / d[:, None] / d[None, :]
        sol = torch.linalg.pinv(g, hermitian=True) @ (self.xty / d[:, None])
        sol = sol / d[:, None]
        sse = self.yy - 2 * float((sol * self.xty).sum()) + float((sol * (self.gram @ sol)).sum())
        total = self.yy - float((self.ysum**2).sum()) / max(self.n, 1)
        sse = max(sse, 0.0)
        rel = sse / total if total > 0 else 0.0
        return sol[:-1].T.contiguous(), sol[-1].contiguous(), rel, sse, max(total, 0.0)


class StitchingLayer(nn.Module):
    """Base class: maps activations at a source cut to the layout of a target cut.

    Args:
        src: The front anchor's cut (what the layer receives).
        dst: The back anchor's cut (what the layer must produce).
    """

    kind: str = ""

    def __init__(self, src: FeatureInfo, dst: FeatureInfo) -> None:
        super().__init__()
        self.src = src
        self.dst = dst
        #: Relative residual of the last least-squares fit per linear part (1 - R^2).
        self.fit_residual: dict[str, float] = {}
        #: Relative residual of the last fit over the whole target (``None`` before a fit).
        self.residual: float | None = None

    def extra_repr(self) -> str:
        return f"src={self.src.shape} {self.src.layout} -> dst={self.dst.shape} {self.dst.layout}"

    # Subclasses: return {part: (inputs (..., d_in), targets (..., d_out))} for one batch.
    def _ls_data(
        self, src: torch.Tensor, dst: torch.Tensor
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def _ls_assign(self, part: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        raise NotImplementedError

    def _source_grid(self, x: torch.Tensor) -> torch.Tensor:
        grid = _tokens_to_grid(x, self.src) if self.src.is_tokens else x
        return resample_grid(grid, self.dst.grid)

    @torch.no_grad()
    def init_least_squares(
        self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, float]:
        """Sets the weights by least squares from paired activations.

        Args:
            pairs: Batches of ``(source activation, target activation)``: the front anchor's
                output at the source cut and the back anchor's activation at the target cut,
                on the same images.

        Returns:
            The relative residual (``1 - R^2``) of each linear part; 0 means an exact fit.
            :attr:`residual` holds the relative residual over the whole target.

        Raises:
            ValueError: No pairs, mismatched shapes, or non-finite activations.
        """
        fit = LeastSquares(self)
        for s, t in pairs:
            fit.update(s, t)
        return fit.solve()


class LeastSquares:
    """One stitching layer's least-squares fit, accumulated batch by batch.

    :meth:`StitchingLayer.init_least_squares` is ``update`` over its pairs, then ``solve``;
    this class lets a caller fit many layers from one pass over the images (the stitch-point
    signals fit every stitch point of an anchor pair at once).

    Args:
        layer: The layer to fit; ``solve`` sets its weights.
    """

    def __init__(self, layer: StitchingLayer) -> None:
        self.layer = layer
        self._eqs: dict[str, _NormalEquations] = {}

    @torch.no_grad()
    def update(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Adds one batch of ``(source activation, target activation)`` on the same images.

        Raises:
            ValueError: Mismatched shapes or non-finite activations.
        """
        layer = self.layer
        if tuple(src.shape[1:]) != layer.src.shape or tuple(dst.shape[1:]) != layer.dst.shape:
            raise ValueError(
                f"least squares for {type(layer).__name__}: got activations "
                f"{tuple(src.shape[1:])} -> {tuple(dst.shape[1:])}, expected "
                f"{layer.src.shape} -> {layer.dst.shape}"
            )
        for part, (x, y) in layer._ls_data(src, dst).items():
            self._eqs.setdefault(part, _NormalEquations()).update(x, y, part)

    @torch.no_grad()
    def solve(self) -> dict[str, float]:
        """Sets the layer's weights; returns the relative residual of each linear part.

        Also sets ``layer.fit_residual`` (per part) and ``layer.residual``: the relative
        residual over the whole target, ``sum(SSE) / sum(total SS)`` over the parts.

        Raises:
            ValueError: No batch was added.
        """
        if not self._eqs:
            raise ValueError("least squares needs at least one batch of calibration activations")
        layer = self.layer
        layer.fit_residual = {}
        sse = total = 0.0
        for part, eq in self._eqs.items():
            w, b, rel, part_sse, part_total = eq.solve()
            layer._ls_assign(part, w, b)
            layer.fit_residual[part] = rel
            sse += part_sse
            total += part_total
        layer.residual = sse / total if total > 0 else 0.0
        return dict(layer.fit_residual)


def _copy_linear(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> None:
    target = module.weight
    module.weight.data.copy_(weight.reshape(target.shape).to(target.dtype))
    module.bias.data.copy_(bias.to(module.bias.dtype))


class ConvStitch(StitchingLayer):
    """CNN -> CNN: resample the feature map to the target size, then a 1x1 convolution."""

    kind = "cnn->cnn"

    def __init__(self, src: FeatureInfo, dst: FeatureInfo) -> None:
        super().__init__(src, dst)
        self.proj = nn.Conv2d(src.channels, dst.channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self._source_grid(x))

    def _ls_data(self, src, dst):
        return {"proj": (_grid_to_positions(self._source_grid(src)), _grid_to_positions(dst))}

    def _ls_assign(self, part, weight, bias):
        _copy_linear(self.proj, weight, bias)


class TokenToConv(ConvStitch):
    """ViT -> CNN: drop prefix tokens, lay patch tokens on their grid, resample, 1x1 conv."""

    kind = "vit->cnn"


class _ToTokens(StitchingLayer):
    """Shared machinery of the two layers that produce tokens."""

    def __init__(self, src: FeatureInfo, dst: FeatureInfo, *, share_prefix: bool) -> None:
        super().__init__(src, dst)
        self.share_prefix = share_prefix
        self.proj = nn.Linear(src.channels, dst.channels)
        p = dst.num_prefix_tokens
        self.prefix = None if share_prefix or p == 0 else nn.Linear(src.channels, p * dst.channels)
        self._same_grid = src.is_tokens and src.grid == dst.grid

    def _patch_positions(self, x: torch.Tensor) -> torch.Tensor:
        if self._same_grid:
            return x[:, self.src.num_prefix_tokens :, :]
        return _grid_to_positions(self._source_grid(x))

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        grid = _tokens_to_grid(x, self.src) if self.src.is_tokens else x
        return grid.mean(dim=(2, 3))

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        patches = self._patch_positions(x)
        if self.share_prefix and self.src.num_prefix_tokens:
            return torch.cat([x[:, : self.src.num_prefix_tokens, :], patches], dim=1)
        return patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self._inputs(x))
        if self.prefix is not None:
            pre = self.prefix(self._pooled(x)).reshape(x.shape[0], -1, self.dst.channels)
            y = torch.cat([pre, y], dim=1)
        return y

    def _ls_data(self, src, dst):
        p = self.dst.num_prefix_tokens
        if self.share_prefix:
            data = {"proj": (self._inputs(src), dst)}
        else:
            data = {"proj": (self._inputs(src), dst[:, p:, :])}
        if self.prefix is not None:
            data["prefix"] = (self._pooled(src), dst[:, :p, :].reshape(dst.shape[0], -1))
        return data

    def _ls_assign(self, part, weight, bias):
        _copy_linear(self.proj if part == "proj" else self.prefix, weight, bias)


class TokenStitch(_ToTokens):
    """ViT -> ViT: a token-wise linear layer (prefix tokens included when counts match)."""

    kind = "vit->vit"

    def __init__(self, src: FeatureInfo, dst: FeatureInfo) -> None:
        share = src.num_prefix_tokens == dst.num_prefix_tokens
        super().__init__(src, dst, share_prefix=share)


class ConvToToken(_ToTokens):
    """CNN -> ViT: feature map to patch tokens on the target grid, plus generated prefix tokens."""

    kind = "cnn->vit"

    def __init__(self, src: FeatureInfo, dst: FeatureInfo) -> None:
        super().__init__(src, dst, share_prefix=False)


def make_stitching_layer(src: FeatureInfo, dst: FeatureInfo) -> StitchingLayer:
    """Chooses and builds the stitching layer for two cuts by their layouts.

    Args:
        src: The front anchor's cut.
        dst: The back anchor's cut.
    """
    cls = {
        (False, False): ConvStitch,
        (True, True): TokenStitch,
        (False, True): ConvToToken,
        (True, False): TokenToConv,
    }[(src.is_tokens, dst.is_tokens)]
    return cls(src, dst)


def num_parameters(module: nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(math.prod(p.shape) for p in module.parameters())
