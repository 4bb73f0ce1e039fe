"""Stitched networks: front anchor blocks, a stitching layer, back anchor blocks and head.

**One input resolution per stitched network.** A stitched network's input is the front
anchor's ``(C, H, W)`` (:attr:`StitchedNet.input_size`). Images of another size or channel
count are adapted once to it (:func:`adapt_images`), by the network's forward pass and by
everything that fits or measures it. The back anchor sees the *same* images at the same
``H, W`` (only the channels adapted to its own) when it can run at another size, so that the
stitching layer's targets come from the resolution the stitched network runs at and no feature
map is resampled between different input scales (:func:`back_input_size`). A back anchor that
cannot run at another size (a ViT built without ``dynamic_img_size=True``: its position
embedding fixes the token grid) sees the images at its own size instead, and the stitching
layer resamples the front's grid to its token grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from space.anchor import Anchor, FeatureInfo
from space.config import StitchConfig
from space.stitching import StitchingLayer, make_stitching_layer

Calibration = torch.Tensor | Iterable[torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]]


def adapt_images(x: torch.Tensor, input_size: tuple[int, int, int]) -> torch.Tensor:
    """Adapts a batch of images to an anchor's ``(C, H, W)`` input.

    Channels: 1 -> 3 by repetition, 3 -> 1 by averaging. Size: bilinear resize
    (``align_corners=False``, antialiased when shrinking). Used to bring images to a stitched
    network's input size, and the same images to its back anchor's (:func:`back_input_size`).

    Raises:
        ValueError: Channel counts that cannot be adapted.
    """
    c, h, w = input_size
    if x.shape[1] != c:
        if x.shape[1] == 1:
            x = x.expand(-1, c, -1, -1)
        elif c == 1:
            x = x.mean(dim=1, keepdim=True)
        else:
            raise ValueError(f"cannot adapt {x.shape[1]}-channel images to {c} channels")
    if tuple(x.shape[-2:]) != (h, w):
        shrink = x.shape[-2] > h or x.shape[-1] > w
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=shrink)
    return x


def runs_at_any_size(anchor: Anchor) -> bool:
    """Whether an anchor's stem accepts images of another size than its own input size.

    CNN families do; ViTs only when built with ``dynamic_img_size=True`` (timm).
    """
    if anchor.kind == "cnn":
        return True
    return bool(getattr(anchor.model, "dynamic_img_size", False))


def back_input_size(front: Anchor, back: Anchor) -> tuple[int, int, int]:
    """The ``(C, H, W)`` the back anchor runs at in a stitched network of ``front -> back``.

    The front anchor's ``H, W`` with the back anchor's channels when the back anchor runs at
    any size (:func:`runs_at_any_size`); otherwise the back anchor's own input size (see the
    module docstring).
    """
    _, h, w = front.input_size
    c, hb, wb = back.input_size
    if (h, w) == (hb, wb) or not runs_at_any_size(back):
        return (c, hb, wb)
    return (c, h, w)


def stitch_cuts(
    front: Anchor, back: Anchor, config: StitchConfig
) -> tuple[FeatureInfo, FeatureInfo]:
    """The source and target cut of a stitch, at the resolution the stitched network runs at."""
    src = front.feature_info(config.front_block)
    dst = back.feature_info(config.back_block, back_input_size(front, back))
    return src, dst


def _images(calibration: Calibration) -> Iterator[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        yield calibration
        return
    for batch in calibration:
        yield batch[0] if isinstance(batch, tuple | list) else batch


class StitchedNet(nn.Module):
    """Images -> back anchor's logits through front blocks, a stitching layer and back blocks.

    The anchors are frozen and stay in eval mode (also under ``.train()``); the stitching
    layer is the only trainable part. Build one with :func:`build_stitched`.

    Attributes:
        front: The front anchor.
        back: The back anchor.
        config: The stitch configuration.
        stitch: The stitching layer.
    """

    def __init__(
        self, front: Anchor, back: Anchor, config: StitchConfig, stitch: StitchingLayer
    ) -> None:
        super().__init__()
        config.validate(front, back)
        self.front_model = front.model
        if back.model is not front.model:
            self.back_model = back.model
        self.stitch = stitch
        self.front = front
        self.back = back
        self.config = config
        for p in self.anchor_parameters():
            p.requires_grad_(False)
        self.train(False)

    def anchor_parameters(self) -> Iterator[nn.Parameter]:
        """The frozen anchors' parameters (each once, also for a self-stitch)."""
        yield from self.front.model.parameters()
        if self.back.model is not self.front.model:
            yield from self.back.model.parameters()

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` input of the stitched network: the front anchor's."""
        return self.front.input_size

    @property
    def back_input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` the back anchor sees the same images at (:func:`back_input_size`)."""
        return back_input_size(self.front, self.back)

    @property
    def num_classes(self) -> int:
        """Classes of the back anchor's head."""
        return self.back.num_classes

    def train(self, mode: bool = True) -> StitchedNet:
        """Sets the stitching layer's mode; anchors always stay in eval mode."""
        super().train(mode)
        self.front.model.eval()
        self.back.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != tuple(self.input_size):
            x = adapt_images(x, self.input_size)
        h = self.front.forward_front(x, self.config.front_block)
        h = self.stitch(h)
        return self.back.forward_back(h, self.config.back_block)

    @torch.no_grad()
    def activation_pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source and target activations of the stitch on the same images.

        Args:
            x: Images; adapted once to :attr:`input_size` for the front anchor, and the
                same images to :attr:`back_input_size` for the back anchor (see the module
                docstring).
        """
        if tuple(x.shape[1:]) != tuple(self.input_size):
            x = adapt_images(x, self.input_size)
        src = self.front.forward_front(x, self.config.front_block)
        size = self.back_input_size
        xb = x if tuple(x.shape[1:]) == tuple(size) else adapt_images(x, size)
        dst = self.back.forward_front(xb, self.config.back_block)
        return src, dst

    @torch.no_grad()
    def init_least_squares(self, calibration: Calibration) -> dict[str, float]:
        """Fits the stitching layer by least squares on calibration images.

        Args:
            calibration: A batch of images, or an iterable of batches or ``(images, labels)``
                tuples (a DataLoader).

        Returns:
            The relative residual of each linear part of the layer.
        """
        device = next(self.stitch.parameters()).device
        pairs = (self.activation_pairs(x.to(device)) for x in _images(calibration))
        return self.stitch.init_least_squares(pairs)

    def extra_repr(self) -> str:
        return str(self.config)


def build_stitched(
    front: Anchor,
    back: Anchor,
    config: StitchConfig,
    *,
    calibration: Calibration | None = None,
) -> StitchedNet:
    """Builds the stitched network of a configuration.

    Args:
        front: The front anchor (``config.front``).
        back: The back anchor (``config.back``); may be the same object as ``front``.
        config: Where to cut each anchor.
        calibration: Images (a tensor, or an iterable of batches) to initialise the stitching
            layer by least squares; without them the layer keeps PyTorch's default init.
            Images of another size are adapted to the front anchor's input size, and both
            anchors see them at that size (see the module docstring).

    Returns:
        The stitched network in eval mode, on the anchors' device.

    Raises:
        ValueError: The configuration does not fit the anchors, or the calibration
            activations are not finite.
    """
    config.validate(front, back)
    src, dst = stitch_cuts(front, back, config)
    stitch = make_stitching_layer(src, dst)
    param = next(front.model.parameters())
    stitch.to(device=param.device, dtype=param.dtype)
    net = StitchedNet(front, back, config, stitch)
    if calibration is not None:
        net.init_least_squares(calibration)
    return net
