"""The family registry: the five built-in families, and a new family as one registered class."""

from __future__ import annotations

import pytest
import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

import space.families as families
from space import SUPPORTED_FAMILIES, Anchor, InputError, load_anchor
from space.families import FamilyAdapter, family_names, family_of, register_family


class ToyNet(nn.Module):
    """A timm-like CNN no built-in family knows: a conv stem, three conv blocks, a head."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = nn.Conv2d(in_chans, width, 3, padding=1)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
            for _ in range(3)
        )
        self.fc = nn.Linear(width, num_classes)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.forward_head(x)


@register_model
def stitchsearch_toy_net(pretrained: bool = False, **kwargs) -> ToyNet:
    # timm passes its own options (pretrained_cfg, cache_dir, ...); keep the model's.
    return ToyNet(**{k: v for k, v in kwargs.items() if k in ("num_classes", "in_chans", "width")})


class ToyFamily(FamilyAdapter):
    name = "toy"
    kind = "cnn"
    model_types = (ToyNet,)

    def stem(self, model, x):
        return model.stem(x)

    def blocks(self, model):
        return list(model.stages)

    def head(self, model, x):
        return model.forward_head(x)


@pytest.fixture
def registry(monkeypatch):
    """A copy of the registry that the test may extend; the original comes back after."""
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))


def test_registry_lists_the_five_families() -> None:
    five = ("resnet", "vit", "convnext", "efficientnet", "mobilenetv3")
    assert five == SUPPORTED_FAMILIES
    assert family_names()[:5] == five
    for family in five:
        assert families._REGISTRY[family].name == family


def test_a_registered_toy_family_loads_and_splits(registry) -> None:
    with pytest.raises(InputError, match=r"not a supported family; supported: resnet, vit"):
        load_anchor("stitchsearch_toy_net", input_size=(3, 16, 16))
    assert register_family(ToyFamily) is ToyFamily
    assert family_names()[-1] == "toy"
    anchor = load_anchor("stitchsearch_toy_net", input_size=(3, 16, 16), num_classes=5)
    assert (anchor.family, anchor.kind, anchor.num_blocks) == ("toy", "cnn", 3)
    assert [f.shape for f in anchor.features()] == [(8, 16, 16), (8, 8, 8), (8, 4, 4), (8, 2, 2)]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = anchor.model(x)
        assert ref.shape == (2, 5)
        for k in range(anchor.num_blocks + 1):
            assert torch.allclose(anchor.forward_back(anchor.forward_front(x, k), k), ref)


def test_registration_is_checked(registry) -> None:
    register_family(ToyFamily)
    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_family(ToyFamily)

    class NoKind(ToyFamily):
        name = "nokind"
        kind = "rnn"

    with pytest.raises(ValueError, match="kind must be 'cnn' or 'vit'"):
        register_family(NoKind)


def test_the_most_specific_registered_class_wins(registry) -> None:
    class WideResNet(ResNet):
        pass

    @register_family
    class WideResNetFamily(type(families._REGISTRY["resnet"])):
        name = "wide-resnet"
        model_types = (WideResNet,)

    wide = WideResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=4)
    plain = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], num_classes=4)
    assert family_of(wide).name == "wide-resnet"
    assert family_of(plain).name == "resnet"
    assert Anchor("wide", wide).family == "wide-resnet"
    assert family_of(ToyNet()) is None
