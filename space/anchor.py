"""Anchors: pre-trained timm models split into stem, stitchable blocks and head.

An :class:`Anchor` exposes a timm model as ``stem -> blocks[0] -> ... -> blocks[n-1] -> head``
at residual-block granularity. The tensor between block ``i - 1`` and block ``i`` is *cut*
``i``: cut 0 is the stem's output, cut ``n`` the last block's output. ``forward_front(x, k)``
runs the stem and blocks ``[0, k)`` and returns cut ``k``; ``forward_back(h, j)`` takes cut
``j`` and runs blocks ``[j, n)`` and the head. For ``k == j`` the two halves reproduce
``model(x)``.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from space.families import family_names, family_of
from space.files import file_sha256

Layout = Literal["NCHW", "NLC"]

#: The built-in families (see :mod:`space.families`; ``family_names()`` also lists families
#: registered later).
SUPPORTED_FAMILIES = family_names()

#: What an anchor id given by the user may be: a letter or digit, then letters, digits and
#: ``. _ - + :``, at most 64 characters (it names files, keys and labels, so no path
#: separators, spaces or brackets).
_ANCHOR_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+:-]{0,63}")


def anchor_id_problem(value: object) -> str | None:
    """Why ``value`` is not a valid anchor id, or None when it is one.

    An id names an anchor in candidate keys, labels, caches, latency tables and exports
    (default: the name it was loaded by), so that two checkpoints of one architecture can be
    told apart (``resnet50`` and ``resnet50-moco``).
    """
    if not isinstance(value, str) or not value:
        return f"must be a non-empty string such as 'resnet50-moco', got {value!r}"
    if not _ANCHOR_ID.fullmatch(value):
        return (
            f"{value!r} is not a valid anchor id; use up to 64 letters, digits and . _ - + : "
            "starting with a letter or digit (no spaces or path separators), e.g. "
            "'resnet50-moco'"
        )
    return None


@dataclass(frozen=True)
class FeatureInfo:
    """Layout and shape of one cut of an anchor, for one image (no batch dimension).

    Attributes:
        layout: ``"NCHW"`` for a feature map, ``"NLC"`` for a token sequence.
        channels: Channels (feature map) or embedding width (tokens).
        height: Feature-map height, or the height of the patch-token grid.
        width: Feature-map width, or the width of the patch-token grid.
        num_prefix_tokens: Class/distillation/register tokens in front of the patch tokens
            (always 0 for feature maps).
    """

    layout: Layout
    channels: int
    height: int
    width: int
    num_prefix_tokens: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """Tensor shape without the batch dimension: ``(C, H, W)`` or ``(L, C)``."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.num_prefix_tokens + self.height * self.width, self.channels)

    @property
    def grid(self) -> tuple[int, int]:
        """Spatial grid ``(H, W)`` of the feature map or of the patch tokens."""
        return (self.height, self.width)

    @property
    def is_tokens(self) -> bool:
        """Whether the cut is a token sequence (NLC)."""
        return self.layout == "NLC"


class Anchor:
    """A pre-trained timm model exposed as stem, stitchable blocks and head.

    Build one with :func:`space.load_anchor`. The model is put in eval mode. Only a family's
    training (:mod:`evaluators.family`) changes an anchor's weights; a trained anchor keeps the
    record of what it started from and says where its trained weights are
    (:meth:`load_trained`).

    Attributes:
        name: The anchor's id: what candidate keys, labels, caches, latency tables and exports
            call it (default: :attr:`model_name`; two checkpoints of one architecture in one
            study have different ids).
        model_name: The name the anchor was loaded by (a timm name or ``zoo:<name>``).
        model: The timm module.
        family: The family's name (one of :data:`SUPPORTED_FAMILIES`, or a family registered
            with :func:`space.families.register_family`).
        kind: ``"cnn"`` or ``"vit"``.
        blocks: The stitchable blocks, in execution order.
        checkpoint: The local checkpoint file the weights came from, if any.
        pretrained: Whether timm's pretrained weights were loaded.
        timm_kwargs: Keyword arguments passed to ``timm.create_model``.
        trained_weights: The file of the trained weights (a family's), or None.
        trained_sha256: That file's SHA-256, or None.
    """

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        checkpoint: str | Path | None = None,
        pretrained: bool = False,
        timm_kwargs: dict[str, Any] | None = None,
        checkpoint_sha256: str | None = None,
        input_size: tuple[int, int, int] | None = None,
        model_name: str | None = None,
    ) -> None:
        family = family_of(model)
        if family is None:
            raise ValueError(
                f"model {name!r} ({type(model).__name__}) is not a supported family; "
                f"supported: {', '.join(family_names())}"
            )
        self.name = name
        self.model_name = model_name or name
        self.model = model.eval()
        self._family = family
        self.family = family.name
        self.kind = family.kind
        self.blocks = family.blocks(model)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.pretrained = pretrained
        self.timm_kwargs = dict(timm_kwargs or {})
        self._checkpoint_sha256 = checkpoint_sha256
        self._input_size = tuple(input_size) if input_size is not None else None
        self._weights_sha256: str | None = None
        self._features: dict[tuple[int, int, int], list[FeatureInfo]] = {}
        # Views of this anchor at other resolutions (shared by the views themselves).
        self._views: dict[int, Anchor] = {}
        self.trained_weights: Path | None = None
        self.trained_sha256: str | None = None

    def __repr__(self) -> str:
        model = "" if self.model_name == self.name else f", model_name={self.model_name!r}"
        return (
            f"Anchor({self.name!r}{model}, family={self.family!r}, num_blocks={self.num_blocks}, "
            f"input_size={self.input_size})"
        )

    @property
    def num_blocks(self) -> int:
        """Number of stitchable blocks ``n``; cuts are numbered ``0..n``."""
        return len(self.blocks)

    @property
    def input_size(self) -> tuple[int, int, int]:
        """The ``(C, H, W)`` input the anchor runs at (settable for CNNs at other sizes)."""
        if self._input_size is not None:
            return self._input_size
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        c = int(getattr(self.model, "in_chans", 0) or self.timm_kwargs.get("in_chans", 0) or 3)
        size = self.timm_kwargs.get("img_size")
        if size is None and hasattr(self.model, "patch_embed"):
            size = getattr(self.model.patch_embed, "img_size", None)
        if size is None:
            size = tuple(cfg.get("input_size", (c, 224, 224)))[1:]
        if isinstance(size, int):
            size = (size, size)
        return (c, int(size[0]), int(size[1]))

    @input_size.setter
    def input_size(self, size: tuple[int, int, int]) -> None:
        if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
            raise ValueError(f"input_size must be (C, H, W) positive integers, got {size!r}")
        self._input_size = tuple(size)

    def at_resolution(self, resolution: int) -> Anchor:
        """This anchor running on ``resolution`` x ``resolution`` images.

        An anchor that differs from ``self`` only in :attr:`input_size` (``self`` itself at
        the anchor's own size; one view per size, reused). CNN families run at any size and
        the view shares the model; a ViT needs a multiple of its patch size, and its view
        holds a copy whose position embedding is interpolated to that grid (timm's
        ``set_input_size``; a ViT built with ``dynamic_img_size=True`` is shared as is).

        Raises:
            ValueError: The family cannot run at that size (the message says why).
        """
        c, h, w = self.input_size
        if (h, w) == (resolution, resolution):
            return self
        if resolution in self._views:
            return self._views[resolution]
        where = f"anchor {self.name!r} ({self.family}) cannot run at {resolution} px"
        reason = self._family.size_problem(self.model, resolution)
        if reason is not None:
            raise ValueError(f"{where}: {reason}")
        try:
            model = self._family.at_size(self.model, resolution)
            if model is self.model:
                view = copy.copy(self)
            else:
                view = Anchor(
                    self.name,
                    model,
                    checkpoint=self.checkpoint,
                    pretrained=self.pretrained,
                    timm_kwargs=self.timm_kwargs,
                    checkpoint_sha256=self._checkpoint_sha256,
                    model_name=self.model_name,
                )
                view._views = self._views
            view._input_size = (c, resolution, resolution)
            view.features()
        except (RuntimeError, ValueError, AssertionError, AttributeError) as e:
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            raise ValueError(f"{where}: {type(e).__name__}: {first}") from None
        self._views[resolution] = view
        return view

    @property
    def num_classes(self) -> int:
        """Number of classes of the head."""
        return int(self.model.num_classes)

    @property
    def checkpoint_sha256(self) -> str | None:
        """SHA-256 of the checkpoint file, or ``None`` when the anchor has none."""
        if self._checkpoint_sha256 is None and self.checkpoint is not None:
            self._checkpoint_sha256 = file_sha256(self.checkpoint)
        return self._checkpoint_sha256

    @property
    def weights_sha256(self) -> str:
        """SHA-256 over the model's state dict (names, shapes and values).

        Identifies the actual weights even for anchors without a checkpoint file.
        """
        if self._weights_sha256 is None:
            h = hashlib.sha256()
            for key, value in sorted(self.model.state_dict().items()):
                t = value.detach().cpu().contiguous()
                h.update(key.encode())
                h.update(str(tuple(t.shape)).encode())
                h.update(str(t.dtype).encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_sha256 = h.hexdigest()
        return self._weights_sha256

    @property
    def identity(self) -> str:
        """A string that identifies the anchor's architecture and weights (for caches)."""
        if self.trained_sha256 is not None:
            return f"{self.name}@trained:{self.trained_sha256}"
        return f"{self.name}@{self.checkpoint_sha256 or self.weights_sha256}"

    def load_trained(
        self, state: Mapping[str, torch.Tensor], *, source: str | Path, sha256: str
    ) -> None:
        """Replaces the weights by trained ones (every key and shape must match).

        Args:
            state: The trained state dict.
            source: The file it was read from (recorded in exports).
            sha256: That file's SHA-256.

        Raises:
            RuntimeError: Missing or unexpected keys, or other shapes.
        """
        self.model.load_state_dict(dict(state), strict=True)
        self.mark_trained(source=source, sha256=sha256)

    def mark_trained(self, *, source: str | Path, sha256: str) -> None:
        """Records that the model's weights are trained ones, saved as ``source``."""
        self.trained_weights = Path(source)
        self.trained_sha256 = sha256
        self._weights_sha256 = None
        self._views.clear()  # a ViT's views at other sizes hold copies of the old weights

    # ------------------------------------------------------------------ running
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the stem only (cut 0)."""
        return self._family.stem(self.model, x)

    def forward_front(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Runs the stem and blocks ``[0, k)`` and returns cut ``k``.

        Args:
            x: Images, ``(B, C, H, W)``.
            k: The cut, ``0 <= k <= num_blocks``.
        """
        self._check_cut(k, "k")
        x = self.forward_stem(x)
        for block in self.blocks[:k]:
            x = block(x)
        return x

    def forward_back(self, h: torch.Tensor, j: int) -> torch.Tensor:
        """Runs blocks ``[j, n)`` and the head on cut ``j``; returns logits.

        Args:
            h: Activations at cut ``j``.
            j: The cut, ``0 <= j <= num_blocks``.
        """
        self._check_cut(j, "j")
        for block in self.blocks[j:]:
            h = block(h)
        return self._family.head(self.model, h)

    def forward_cuts(self, x: torch.Tensor, cuts: list[int] | None = None) -> list[torch.Tensor]:
        """Runs the model once and returns the activations at the given cuts.

        Args:
            x: Images, ``(B, C, H, W)``.
            cuts: Cut indices (default: all ``0..n``). The run stops after the last needed
                block.
        """
        wanted = sorted(set(range(self.num_blocks + 1) if cuts is None else cuts))
        for c in wanted:
            self._check_cut(c, "cut")
        out: dict[int, torch.Tensor] = {}
        h = self.forward_stem(x)
        if 0 in wanted:
            out[0] = h
        for i, block in enumerate(self.blocks[: wanted[-1]], start=1):
            h = block(h)
            if i in wanted:
                out[i] = h
        order = range(self.num_blocks + 1) if cuts is None else cuts
        return [out[c] for c in order]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _check_cut(self, c: int, what: str) -> None:
        if not 0 <= c <= self.num_blocks:
            raise ValueError(
                f"{what}={c} is out of range for anchor {self.name!r}: valid cuts are "
                f"0..{self.num_blocks}"
            )

    # ------------------------------------------------------------------ shapes
    def features(self, input_size: tuple[int, int, int] | None = None) -> list[FeatureInfo]:
        """Layout and shape of every cut ``0..n`` for one input size.

        Args:
            input_size: ``(C, H, W)``; defaults to :attr:`input_size`.

        Returns:
            ``n + 1`` entries: entry ``i`` describes cut ``i`` (entry ``i + 1`` is the output of
            block ``i``).
        """
        size = tuple(input_size or self.input_size)
        if size not in self._features:
            param = next(self.model.parameters())
            x = torch.zeros((1, *size), dtype=param.dtype, device=param.device)
            with torch.no_grad():
                acts = self.forward_cuts(x)
            self._features[size] = [self._describe(a) for a in acts]
        return self._features[size]

    def feature_info(self, cut: int, input_size: tuple[int, int, int] | None = None) -> FeatureInfo:
        """Layout and shape of cut ``cut`` (see :meth:`features`)."""
        self._check_cut(cut, "cut")
        return self.features(input_size)[cut]

    def block_output_info(
        self, block: int, input_size: tuple[int, int, int] | None = None
    ) -> FeatureInfo:
        """Layout and shape of the output of block ``block`` (cut ``block + 1``)."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(
                f"block={block} is out of range for anchor {self.name!r}: valid blocks are "
                f"0..{self.num_blocks - 1}"
            )
        return self.features(input_size)[block + 1]

    def _describe(self, a: torch.Tensor) -> FeatureInfo:
        if a.ndim == 4:
            return FeatureInfo("NCHW", a.shape[1], a.shape[2], a.shape[3])
        if a.ndim == 3:
            prefix = self._family.num_prefix_tokens(self.model)
            tokens = a.shape[1] - prefix
            grid = self._family.token_grid(self.model)
            if grid is None or grid[0] * grid[1] != tokens:
                side = round(tokens**0.5)
                if side * side != tokens:
                    raise ValueError(
                        f"anchor {self.name!r}: cannot arrange {tokens} patch tokens in a grid"
                    )
                grid = (side, side)
            return FeatureInfo("NLC", a.shape[2], int(grid[0]), int(grid[1]), prefix)
        raise ValueError(f"anchor {self.name!r}: unexpected activation shape {tuple(a.shape)}")
