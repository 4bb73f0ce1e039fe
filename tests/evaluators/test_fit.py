from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluators import accuracy, evaluate_accuracy, fit_stitch, synthetic_splits
from space import StitchConfig, build_stitched
from tests.conftest import make_tiny


def _data(input_size=(3, 32, 32), num_classes=10):
    return synthetic_splits(
        num_classes=num_classes,
        input_size=input_size,
        calibration=48,
        validation=32,
        test=32,
        batch_size=16,
    )


def _snapshot(*anchors) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in a.model.state_dict().items()} for a in anchors]


def _bit_identical(before, anchors) -> bool:
    for snap, a in zip(before, anchors, strict=True):
        now = a.model.state_dict()
        if snap.keys() != now.keys() or not all(torch.equal(snap[k], now[k]) for k in snap):
            return False
    return True


@pytest.mark.parametrize(("a", "b"), [("resnet", "vit"), ("vit", "convnext")])
def test_fit_least_squares_then_finetune_leaves_anchors_bit_identical(a, b, tiny_anchor) -> None:
    front, back = tiny_anchor(a), tiny_anchor(b)
    net = build_stitched(front, back, StitchConfig(front.name, back.name, 1, 1))
    before = _snapshot(front, back)
    data = _data()
    res = fit_stitch(net, data.calibration, steps=6, lr=1e-2)
    assert res.ls_images == 48 and res.steps == 6 and len(res.losses) == 6
    assert res.cached_activations
    assert all(0 <= r <= 1.0 + 1e-9 for r in res.residual.values())
    assert all(torch.isfinite(torch.tensor(res.losses)))
    assert _bit_identical(before, [front, back])
    assert not front.model.training and not back.model.training and not net.training
    assert all(p.grad is None for p in net.anchor_parameters())
    assert not any(p.requires_grad for p in net.anchor_parameters())


def test_finetuning_changes_only_the_stitch_and_cache_matches_recompute(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("convnext")
    cfg = StitchConfig(front.name, back.name, 2, 2)
    data = _data()
    ls = build_stitched(front, back, cfg)
    fit_stitch(ls, data.calibration)
    cached = build_stitched(front, back, cfg)
    res_c = fit_stitch(cached, data.calibration, steps=5, lr=1e-2)
    recomputed = build_stitched(front, back, cfg)
    res_r = fit_stitch(
        recomputed, data.calibration, steps=5, lr=1e-2, train_loader=data.calibration
    )
    assert res_c.cached_activations and not res_r.cached_activations
    for p_c, p_r, p_ls in zip(
        cached.stitch.parameters(),
        recomputed.stitch.parameters(),
        ls.stitch.parameters(),
        strict=True,
    ):
        assert torch.allclose(p_c, p_r, atol=1e-5)
        assert not torch.equal(p_c, p_ls)  # fine-tuning moved the layer
    assert res_c.losses == pytest.approx(res_r.losses, rel=1e-4)
    # A tiny cache budget falls back to recomputing.
    small = build_stitched(front, back, cfg)
    assert not fit_stitch(small, data.calibration, steps=2, max_cache_mb=0.001).cached_activations


def test_finetuning_lowers_the_loss_on_a_self_stitch() -> None:
    anchor = make_tiny("resnet", seed=3)
    data = _data()
    net = build_stitched(anchor, anchor, StitchConfig(anchor.name, anchor.name, 2, 2))
    with torch.no_grad():
        for p in net.stitch.parameters():
            p.normal_(0, 0.3)  # start far from the optimum
    res = fit_stitch(net, data.calibration, steps=0)  # least squares resets it
    assert max(res.residual.values()) < 1e-6  # self-stitch at equal cuts: identity is exact
    torch.manual_seed(0)
    net2 = build_stitched(anchor, anchor, StitchConfig(anchor.name, anchor.name, 2, 3))
    res2 = fit_stitch(net2, data.calibration, steps=30, lr=5e-3)
    assert sum(res2.losses[-5:]) / 5 < sum(res2.losses[:5]) / 5


def test_fit_errors(tiny_anchor) -> None:
    anchor = tiny_anchor("resnet")
    net = build_stitched(anchor, anchor, StitchConfig(anchor.name, anchor.name, 1, 1))
    data = _data()
    with pytest.raises(ValueError, match="steps must be an integer"):
        fit_stitch(net, data.calibration, steps=-1)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fit_stitch(net, data.calibration, steps=1, lr=float("nan"))
    images_only = [x for x, _ in data.calibration]
    with pytest.raises(ValueError, match="needs"):
        fit_stitch(net, images_only, steps=1, train_loader=images_only)
    bad = make_tiny("resnet")
    with torch.no_grad():
        bad.blocks[0].conv1.weight.fill_(float("nan"))
    net_bad = build_stitched(bad, bad, StitchConfig(bad.name, bad.name, 2, 2))
    with pytest.raises(ValueError, match="non-finite activations"):
        fit_stitch(net_bad, data.calibration)


class _Oracle(nn.Module):
    """Logits that rank the true class at a chosen position."""

    def __init__(self, labels: torch.Tensor, num_classes: int, rank: int) -> None:
        super().__init__()
        self.labels, self.num_classes, self.rank = labels, num_classes, rank
        self.offset = 0
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.labels[self.offset : self.offset + len(x)]
        self.offset += len(x)
        logits = torch.arange(self.num_classes, 0, -1).float().repeat(len(x), 1)
        # class at position `rank` of the ranking gets the label
        order = torch.arange(self.num_classes).repeat(len(x), 1)
        order[:, self.rank], order[torch.arange(len(x)), y] = y, order[:, self.rank].clone()
        out = torch.empty_like(logits)
        out.scatter_(1, order, logits)
        return out


@pytest.mark.parametrize(
    ("rank", "top1", "top5"), [(0, 100.0, 100.0), (3, 0.0, 100.0), (7, 0.0, 0.0)]
)
def test_accuracy_top1_top5(rank: int, top1: float, top5: float) -> None:
    data = _data()
    acc = accuracy(_Oracle(data.validation.labels, 10, rank), data.validation)
    assert (acc.top1, acc.top5, acc.num_images) == (top1, top5, 32)


def test_accuracy_few_classes_truncation_and_errors() -> None:
    data = _data(num_classes=4)
    acc = accuracy(_Oracle(data.validation.labels, 4, 0), data.validation, num_images=20)
    assert acc.top5 is None and acc.top1 == 100.0 and acc.num_images == 20

    class NaN(nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 4)
            out[0, 1] = float("nan")
            return out

    with pytest.raises(ValueError, match="non-finite logits"):
        accuracy(NaN(), data.validation)
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        accuracy(NaN(), [torch.zeros(2, 3, 32, 32)])


def test_evaluate_accuracy_only_touches_test_when_asked(tiny_anchor) -> None:
    model = tiny_anchor("resnet").model
    data = _data()
    rep = evaluate_accuracy(model, data)
    assert rep.test is None and rep.validation.num_images == 32
    rep = evaluate_accuracy(model, data, test=True)
    assert rep.test is not None and rep.test.num_images == 32
    assert 0.0 <= rep.test.top1 <= rep.test.top5 <= 100.0
    assert rep.to_dict()["test"]["num_images"] == 32
