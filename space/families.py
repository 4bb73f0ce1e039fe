"""Family adapters: how each timm model family splits into stem, stitchable blocks and head.

Each supported family is one :class:`FamilyAdapter` subclass registered with
:func:`register_family`; :func:`family_of` finds a model's adapter by the model's class (the
most specific registered class wins). Supporting a new timm family is one class::

    @register_family
    class MyNetFamily(FamilyAdapter):
        name = "mynet"
        kind = "cnn"
        model_types = (MyNet,)  # the timm model class(es)

        def stem(self, model, x):
            return model.stem(x)

        def blocks(self, model):
            return [block for stage in model.stages for block in stage]

        def head(self, model, x):
            return model.forward_head(x)

The built-in families are registered below, in this module, so that the registry is complete
as soon as :mod:`space` is imported.
"""

from __future__ import annotations

import abc
from copy import deepcopy
from typing import ClassVar, Literal

import torch
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer
from torch import nn

Kind = Literal["cnn", "vit"]

_REGISTRY: dict[str, FamilyAdapter] = {}


class FamilyAdapter(abc.ABC):
    """How to run one timm model family as ``stem -> blocks[0] -> ... -> blocks[n-1] -> head``.

    Subclasses set the class attributes and implement :meth:`stem`, :meth:`blocks` and
    :meth:`head` (and :meth:`stage_depths` for a family with stages);
    ``head(model, blocks(model)[-1](...(stem(model, x))))`` must equal ``model(x)``. Adapters
    hold no state: one instance serves every model of the family.

    Attributes:
        name: The family's name (``Anchor.family``, recorded in export manifests).
        kind: ``"cnn"`` (cuts are ``NCHW`` feature maps) or ``"vit"`` (cuts are ``NLC``
            token sequences).
        model_types: The model classes of the family.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind]
    model_types: ClassVar[tuple[type[nn.Module], ...]]

    @abc.abstractmethod
    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Runs the layers before the first stitchable block (returns cut 0)."""

    @abc.abstractmethod
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The stitchable blocks of ``model``, in execution order."""

    @abc.abstractmethod
    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Runs the layers after the last block on cut ``n``; returns logits."""

    def stage_depths(self, model: nn.Module) -> list[int] | None:
        """Blocks per stage, in order (they sum to ``len(blocks(model))``), or ``None``.

        A stage is a run of blocks at one feature-map resolution and width (a ResNet's
        ``layerN``, an EfficientNet's ``blocks[i]``); its last block's output is a *stage
        boundary* (:func:`space.stages.stage_ends`). ``None`` (the default): the family has no
        stages (a ViT's blocks are all alike).
        """
        return None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Class/distillation/register tokens in front of the patch tokens (token cuts)."""
        return int(getattr(model, "num_prefix_tokens", 0))

    def token_grid(self, model: nn.Module) -> tuple[int, int] | None:
        """The patch-token grid ``(H, W)``, or None to infer a square grid from the count."""
        return getattr(getattr(model, "patch_embed", None), "grid_size", None)

    def at_size(self, model: nn.Module, size: int) -> nn.Module:
        """``model`` running on ``size`` x ``size`` images (``size`` passed :meth:`size_problem`).

        CNN families run at any size as built: the model itself (the default). Families with a
        fixed input size return a copy adapted to ``size``.
        """
        return model

    def size_problem(self, model: nn.Module, size: int) -> str | None:
        """Why ``model`` cannot run on ``size`` x ``size`` images (``None``: it can).

        Only static checks (a patch size); the caller also runs the model once at that size.
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r})"


def register_family(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    """Class decorator: registers a :class:`FamilyAdapter` subclass under its ``name``.

    Returns:
        ``cls``, unchanged.

    Raises:
        ValueError: The name is taken, or the class attributes are missing or invalid.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__}.name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(
            f"family {name!r} is already registered by {type(_REGISTRY[name]).__name__}; "
            "pick another name"
        )
    kind = getattr(cls, "kind", None)
    if kind not in ("cnn", "vit"):
        raise ValueError(f"{cls.__name__}.kind must be 'cnn' or 'vit', got {kind!r}")
    types = getattr(cls, "model_types", None)
    if (
        not isinstance(types, tuple)
        or not types
        or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types)
    ):
        raise ValueError(
            f"{cls.__name__}.model_types must be a non-empty tuple of nn.Module classes, "
            f"got {types!r}"
        )
    _REGISTRY[name] = cls()
    return cls


def family_of(model: nn.Module) -> FamilyAdapter | None:
    """The adapter of ``model``'s family, or None when no registered family takes it.

    The model's class and its base classes are tried in method resolution order, so an
    adapter registered for a subclass wins over one for its parent class.
    """
    for cls in type(model).__mro__:
        for adapter in _REGISTRY.values():
            if cls in adapter.model_types:
                return adapter
    return None


def family_names() -> tuple[str, ...]:
    """The registered families' names, in registration order."""
    return tuple(_REGISTRY)


# ---------------------------------------------------------------------- built-in families
@register_family
class ResNetFamily(FamilyAdapter):
    """timm ResNets (BasicBlock and Bottleneck): one block per residual block."""

    name = "resnet"
    kind = "cnn"
    model_types = (ResNet,)

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.maxpool(model.act1(model.bn1(model.conv1(x))))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [
            b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer
        ]

    def stage_depths(self, model: nn.Module) -> list[int]:
        return [len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)]

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(x)


@register_family
class ViTFamily(FamilyAdapter):
    """timm Vision Transformers, DeiT (distilled) included: one block per transformer block."""

    name = "vit"
    kind = "vit"
    model_types = (VisionTransformer,)

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(x))

    def at_size(self, model: nn.Module, size: int) -> nn.Module:
        """A copy of the ViT at ``size`` px: its position embedding interpolated once.

        timm's ``set_input_size`` resamples the position embedding to the new patch grid
        with ``resample_abs_pos_embed`` (what ``dynamic_img_size=True`` does on every forward
        pass), so the copy runs, measures and exports (ONNX) as a plain fixed-size ViT.
        """
        if getattr(model, "dynamic_img_size", False):
            return model
        copy = deepcopy(model)
        copy.set_input_size(img_size=(size, size))
        return copy.eval()

    def size_problem(self, model: nn.Module, size: int) -> str | None:
        pe = model.patch_embed
        ph, pw = pe.patch_size
        if getattr(pe, "dynamic_img_pad", False):
            return None if size >= max(ph, pw) else f"it is smaller than the patch size {ph}"
        if size < max(ph, pw):
            return f"it is smaller than the patch size {ph}"
        if size % ph or size % pw:
            return f"it is not a multiple of the patch size {ph}"
        return None


class StageEntry(nn.Module):
    """A ConvNeXt stage's downsampling layer fused with the stage's first block."""

    def __init__(self, downsample: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.downsample = downsample
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.downsample(x))


@register_family
class ConvNeXtFamily(FamilyAdapter):
    """timm ConvNeXts: one block per ConvNeXt block (a stage's downsampling joins its first)."""

    name = "convnext"
    kind = "cnn"
    model_types = (ConvNeXt,)

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.stem(x)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        units: list[nn.Module] = []
        for stage in model.stages:
            for i, block in enumerate(stage.blocks):
                units.append(StageEntry(stage.downsample, block) if i == 0 else block)
        return units

    def stage_depths(self, model: nn.Module) -> list[int]:
        return [len(stage.blocks) for stage in model.stages]

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm_pre(x))


@register_family
class EfficientNetFamily(FamilyAdapter):
    """timm EfficientNets: one block per inverted-residual block of every stage."""

    name = "efficientnet"
    kind = "cnn"
    model_types = (EfficientNet,)

    def stem(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.bn1(model.conv_stem(x))

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return [b for stage in model.blocks for b in stage]

    def stage_depths(self, model: nn.Module) -> list[int]:
        return [len(stage) for stage in model.blocks]

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.bn2(model.conv_head(x)))


@register_family
class MobileNetV3Family(EfficientNetFamily):
    """timm MobileNetV3s: EfficientNet's stem and blocks; the head has its own conv."""

    name = "mobilenetv3"
    kind = "cnn"
    model_types = (MobileNetV3,)

    def head(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(x)
