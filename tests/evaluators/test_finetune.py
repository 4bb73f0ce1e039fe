"""Rung 1: fine-tuning the stitching layer alone (evaluators/finetune.py)."""

from __future__ import annotations

import json
import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluators import ArrayLoader, accuracy, fit_stitch, synthetic_splits
from evaluators.finetune import (
    CURVE_POINTS,
    FinetuneResult,
    FinetuneSettings,
    _batch_loss,
    _scheduler,
    finetune_stitch_layer,
    train_subset,
)
from space import StitchConfig, build_stitched
from tests.conftest import make_tiny

FAST = FinetuneSettings(steps=8, batch_size=16, lr=1e-2)


def _data(seed: int = 0, n: int = 64):
    return synthetic_splits(
        num_classes=4,
        input_size=(3, 32, 32),
        calibration=n,
        validation=64,
        test=16,
        batch_size=16,
        seed=seed,
    )


@pytest.fixture(scope="module")
def train():
    """Training images (a synthetic split disjoint from the validation images of seed 0)."""
    return _data(seed=1, n=256).calibration


def _net(front, back, k=1, j=1, calibration=None):
    net = build_stitched(front, back, StitchConfig(front.name, back.name, k, j))
    if calibration is not None:
        fit_stitch(net, calibration)
    return net


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("a", "b"), [("resnet", "vit"), ("vit", "resnet"), ("vit", "vit")])
def test_only_the_stitch_changes_and_anchors_stay_bit_identical(a, b, tiny_anchor, train) -> None:
    front, back = tiny_anchor(a), tiny_anchor(b)
    net = _net(front, back)
    anchors = [_state(front.model), _state(back.model)]
    stitch = _state(net.stitch)
    res = finetune_stitch_layer(net, train, FAST)
    assert isinstance(res, FinetuneResult) and res.steps == 8 and res.images_seen == 8 * 16
    assert _equal(anchors[0], _state(front.model)) and _equal(anchors[1], _state(back.model))
    after = _state(net.stitch)
    assert all(not torch.equal(stitch[k], after[k]) for k in stitch)
    assert not net.training and not net.stitch.training
    assert not front.model.training and not back.model.training
    assert all(p.grad is None for p in net.anchor_parameters())
    assert not any(p.requires_grad for p in net.anchor_parameters())


def test_front_runs_without_grad_and_anchors_stay_in_eval_mode(tiny_anchor, train) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    net = _net(front, back, k=2, j=1)
    seen: dict[str, set] = {"front": set(), "back": set(), "stitch": set()}

    def hook(where):
        def record(module, args):
            seen[where].add((torch.is_grad_enabled(), module.training))

        return record

    handles = [m.register_forward_pre_hook(hook("front")) for m in front.model.modules()]
    handles += [m.register_forward_pre_hook(hook("back")) for m in back.model.modules()]
    handles.append(net.stitch.register_forward_pre_hook(hook("stitch")))
    try:
        finetune_stitch_layer(net, train, FinetuneSettings(steps=2, batch_size=8))
    finally:
        for h in handles:
            h.remove()
    assert seen["front"] == {(False, False)}  # no autograd graph, eval mode
    assert seen["back"] == {(True, False)}  # backprop through frozen blocks, eval mode
    assert seen["stitch"] == {(True, True)}  # the stitch alone trains


def test_loss_goes_down_and_training_accuracy_beats_least_squares(tiny_anchor, train) -> None:
    # Random tiny anchors: the stitch can fit the training images, though it does not
    # generalise much through random back blocks, so this checks the fit, not validation.
    front, back = tiny_anchor("vit"), tiny_anchor("resnet")
    net = _net(front, back, k=1, j=4, calibration=_data().calibration.subset(16))
    ls = accuracy(net, train).top1
    res = finetune_stitch_layer(net, train, FinetuneSettings(steps=64, batch_size=32, lr=3e-2))
    assert len(res.loss_curve) == CURVE_POINTS
    assert res.loss_curve[-1] < 0.6 * res.loss_curve[0]
    assert res.loss_min <= min(res.loss_first, res.loss_last)
    assert accuracy(net, train).top1 > ls + 20.0


def test_settings_round_trip_through_json() -> None:
    s = FinetuneSettings(
        steps=10, batch_size=7, lr=0.003, weight_decay=0.01, schedule="cosine", distill=0.5
    )
    again = FinetuneSettings.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert FinetuneSettings.from_dict({}) == FinetuneSettings()
    assert FinetuneSettings.from_dict({"lr": 1, "distill": 0}).lr == 1.0  # JSON integers


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("steps", 0, "1..1_000_000"),
        ("steps", 2.5, "integer"),
        ("steps", True, "integer"),
        ("batch_size", -1, "1..65_536"),
        ("lr", 0.0, "0 < lr <= 1"),
        ("lr", float("nan"), "0 < lr <= 1"),
        ("lr", "0.01", "0 < lr <= 1"),
        ("weight_decay", -0.1, "0..1"),
        ("schedule", "linear", "'onecycle', 'cosine', 'constant'"),
        ("warmup", 1.0, "0 < warmup < 1"),
        ("distill", 1.5, "0..1"),
        ("temperature", 0, "0 < temperature <= 100"),
        ("seed", -3, ">= 0"),
    ],
)
def test_settings_validation_names_field_value_and_range(field, value, allowed) -> None:
    with pytest.raises(ValueError) as e:
        FinetuneSettings.from_dict({field: value})
    msg = str(e.value)
    assert f"FinetuneSettings.{field}" in msg and repr(value) in msg and allowed in msg


def test_settings_reject_unknown_fields_and_non_mappings() -> None:
    with pytest.raises(ValueError, match=r"unknown fine-tuning settings \['epochs'\]"):
        FinetuneSettings.from_dict({"epochs": 3})
    with pytest.raises(ValueError, match="must be a mapping"):
        FinetuneSettings.from_dict([("steps", 3)])


def test_distillation_runs_differs_from_cross_entropy_and_leaves_teacher(tiny_anchor, train):
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    teacher = make_tiny("resnet", seed=2)
    teacher.model.train()  # its mode is restored afterwards
    t_state = _state(teacher.model)
    plain = _net(front, back)
    distilled = _net(front, back)
    finetune_stitch_layer(plain, train, FAST)
    res = finetune_stitch_layer(
        distilled, train, FinetuneSettings(**{**FAST.to_dict(), "distill": 0.5}), teacher=teacher
    )
    assert res.steps == FAST.steps
    assert not _equal(_state(plain.stitch), _state(distilled.stitch))
    assert teacher.model.training
    teacher.model.eval()
    assert _equal(t_state, _state(teacher.model))
    with pytest.raises(ValueError, match=r"distill=0.5 needs a teacher"):
        finetune_stitch_layer(distilled, train, FinetuneSettings(distill=0.5))


def test_same_seed_same_result_other_seed_other_result(tiny_anchor, train) -> None:
    front, back = tiny_anchor("vit"), tiny_anchor("resnet")
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(0)  # the stitch's initial weights
        net = _net(front, back)
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        res = finetune_stitch_layer(net, train, FinetuneSettings(steps=6, batch_size=16, seed=seed))
        runs.append((_state(net.stitch), res.loss_curve))
    assert _equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not _equal(runs[0][0], runs[2][0])


class _NaNAfter(nn.Module):
    """A teacher whose logits turn NaN after ``n`` calls."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.n -= 1
        out = torch.zeros(len(x), 10)
        return out if self.n >= 0 else out + float("nan")


def test_non_finite_loss_raises_and_restores_the_stitch(tiny_anchor, train) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    net = _net(front, back)
    before = _state(net.stitch)
    settings = FinetuneSettings(steps=6, batch_size=8, distill=0.5)
    with pytest.raises(ValueError, match=r"loss is nan at step 2 of 6.*restored.*Lower"):
        finetune_stitch_layer(net, train, settings, teacher=_NaNAfter(2))
    assert _equal(before, _state(net.stitch)) and not net.training
    bad = ArrayLoader(torch.full((8, 3, 32, 32), float("inf")), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="at step 0"):
        finetune_stitch_layer(net, bad, FinetuneSettings(steps=2, batch_size=8))


def test_trainable_anchor_is_refused(train) -> None:
    front, back = make_tiny("resnet"), make_tiny("vit")
    net = _net(front, back)
    next(back.model.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match="1 anchor parameters require grad"):
        finetune_stitch_layer(net, train, FAST)


def test_any_loader_of_batches_is_rebatched(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    batches = [(torch.randn(10, 3, 32, 32), torch.randint(0, 4, (10,))) for _ in range(3)]
    seen = []

    class Loader:
        def __iter__(self):
            for x, y in batches:
                seen.append(len(x))
                yield x, y

    net = _net(front, back)
    res = finetune_stitch_layer(net, Loader(), FinetuneSettings(steps=4, batch_size=16))
    assert res.steps == 4 and res.images_seen == 64 and sum(seen) >= 64
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        finetune_stitch_layer(net, [torch.zeros(2, 3, 32, 32)], FAST)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_other_schedules_train(schedule, tiny_anchor, train) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    net = _net(front, back)
    before = _state(net.stitch)
    settings = FinetuneSettings(steps=4, batch_size=16, schedule=schedule)
    res = finetune_stitch_layer(net, train, settings)
    assert res.steps == 4 and not _equal(before, _state(net.stitch))


def test_train_subset_is_a_seeded_sample(train) -> None:
    a, b, c = train_subset(train, 50, 0), train_subset(train, 50, 0), train_subset(train, 50, 1)
    assert a.num_images == 50 and torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert (a.mean, a.std, a.input_size, a.batch_size) == (
        train.mean,
        train.std,
        train.input_size,
        train.batch_size,
    )
    rows = {tuple(r.flatten()[:8].tolist()) for r in train.images}
    assert all(tuple(r.flatten()[:8].tolist()) in rows for r in a.images)
    with pytest.raises(ValueError, match=r"n must be an integer in 1\.\.256, got 257"):
        train_subset(train, 257)
    with pytest.raises(ValueError, match="ArrayLoader or DatasetLoader"):
        train_subset([1, 2], 1)


def test_a_training_set_smaller_than_a_batch_is_used_whole(tiny_anchor, train) -> None:
    front, back = tiny_anchor("vit"), tiny_anchor("resnet")
    small = ArrayLoader(train.images[:10], train.labels[:10], mean=train.mean, std=train.std)
    res = finetune_stitch_layer(_net(front, back), small, FinetuneSettings(steps=3, batch_size=16))
    assert res.steps == 3 and res.images_seen == 30


# Checks that would catch a wrong implementation (issue 26, item 4).


def _by_hand(student, t_logits, y, distill: float, temp: float) -> torch.Tensor:
    """``(1 - d) * CE + d * T^2 * KL(teacher || student)`` at ``T``, KL summed over classes
    and averaged over the batch, written out without ``F.kl_div``."""
    p_t = torch.softmax(t_logits / temp, dim=1)
    log_s = torch.log_softmax(student / temp, dim=1)
    kl = (p_t * (torch.log(p_t) - log_s)).sum(dim=1).mean()
    tempered = distill * temp * temp * kl
    if distill >= 1.0:
        return tempered
    return (1.0 - distill) * F.cross_entropy(student, y) + tempered


@pytest.mark.parametrize(("distill", "temp"), [(0.25, 1.0), (0.25, 3.0), (0.5, 0.5), (1.0, 2.0)])
def test_the_rung1_loss_is_the_hand_computed_distillation(distill, temp, tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    net = _net(front, back)
    teacher = tiny_anchor("convnext").model
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (6,), generator=g)
    if distill >= 1.0:
        y = torch.full((6,), -1)  # pure distillation reads no label
    settings = FinetuneSettings(distill=distill, temperature=temp)
    with torch.no_grad():
        student, t_logits = net(x), teacher(x)
        got = _batch_loss(net, x, y, settings, teacher)
    want = _by_hand(student, t_logits, y, distill, temp)
    assert torch.isclose(got, want, rtol=1e-5), (got, want)
    # What a wrong implementation would give differs: the reverse KL (sign of the
    # direction), no T^2, and a mean over classes too (the reduction).
    p_s = torch.softmax(student / temp, dim=1)
    reverse = (p_s * (torch.log(p_s) - torch.log_softmax(t_logits / temp, dim=1))).sum(1).mean()
    kl = (want - (0 if distill >= 1 else (1 - distill) * F.cross_entropy(student, y))) / distill
    assert not torch.isclose(kl, temp * temp * reverse, rtol=1e-3)
    if temp != 1.0:
        assert not torch.isclose(got, want / (temp * temp), rtol=1e-3)
    # reduction="mean" (over every element) would give a tenth: it averages the 10 classes.
    p_t = torch.softmax(t_logits / temp, dim=1)
    by_element = (p_t * (torch.log(p_t) - torch.log_softmax(student / temp, dim=1))).mean()
    assert torch.isclose(temp * temp * by_element * 10, kl, rtol=1e-4)
    assert not torch.isclose(got, want - distill * kl * 0.9, rtol=1e-3)
    assert kl > 0


def test_plain_cross_entropy_without_distillation(tiny_anchor) -> None:
    net = _net(tiny_anchor("resnet"), tiny_anchor("vit"))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 9, 1])
    with torch.no_grad():
        got = _batch_loss(net, x, y, FinetuneSettings(), None)
        want = -torch.log_softmax(net(x), dim=1)[torch.arange(4), y].mean()
    assert torch.isclose(got, want, rtol=1e-5)


def _lrs(settings: FinetuneSettings) -> list[float]:
    """The learning rate of each step as the fine-tuning loop runs them."""
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=settings.lr, weight_decay=settings.weight_decay)
    sched = _scheduler(opt, settings)
    out = []
    for _ in range(settings.steps):
        out.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(1)
        opt.step()
        if sched is not None:
            sched.step()
    return out


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))


def test_onecycle_warms_up_peaks_at_the_warmup_step_and_decays() -> None:
    peak, steps = 0.01, 10
    lrs = _lrs(FinetuneSettings(steps=steps, lr=peak, schedule="onecycle", warmup=0.3))
    first, last = peak / 25, peak / 25 / 1e4  # OneCycleLR's div_factor and final_div_factor
    top = 2  # round(0.3 * 10) - 1: the last warm-up step
    want = [_cos(first, peak, i / top) for i in range(top + 1)]
    want += [_cos(peak, last, (i - top) / (steps - 1 - top)) for i in range(top + 1, steps)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert lrs[0] == pytest.approx(first) and lrs[top] == pytest.approx(peak)
    assert lrs[-1] == pytest.approx(last)
    assert all(a < b for a, b in pairwise(lrs[: top + 1]))
    assert all(a > b for a, b in pairwise(lrs[top:]))
    assert max(lrs) == lrs[top]


def test_cosine_starts_at_the_peak_and_decays_towards_zero() -> None:
    peak, steps = 0.02, 8
    lrs = _lrs(FinetuneSettings(steps=steps, lr=peak, schedule="cosine"))
    assert lrs == pytest.approx([_cos(peak, 0.0, t / steps) for t in range(steps)], rel=1e-9)
    assert lrs[0] == peak and all(a > b for a, b in pairwise(lrs))
    assert 0 < lrs[-1] < peak * 0.05


def test_constant_keeps_the_peak() -> None:
    assert _lrs(FinetuneSettings(steps=5, lr=0.003, schedule="constant")) == [0.003] * 5
