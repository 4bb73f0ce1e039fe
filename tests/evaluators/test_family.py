"""Training a family: settings, member sampling, the loss, frozen parts, resuming."""

from __future__ import annotations

import copy
import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F

from evaluators import (
    ArrayLoader,
    FamilySettings,
    FamilyTrainer,
    MemberSampler,
    fit_stitch,
    steps_per_epoch,
)
from space import Candidate, StitchedFamily, build_stitched, member_names
from tests.conftest import make_tiny


def _family(seed: int = 0) -> tuple[StitchedFamily, ArrayLoader]:
    """A family of a tiny ResNet and a tiny ViT with one stitch each way, least-squares fit."""
    cnn, vit = make_tiny("resnet", seed), make_tiny("vit", seed)
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(64, 3, 32, 32, generator=g)
    labels = torch.randint(0, 10, (64,), generator=g)
    train = ArrayLoader(images, labels, batch_size=16)
    anchors = {cnn.name: cnn, vit.name: vit}
    stitches = [Candidate(cnn.name, vit.name, 2, 1), Candidate(vit.name, cnn.name, 2, 1)]
    members = member_names([Candidate.anchor(cnn.name), Candidate.anchor(vit.name), *stitches])
    layers = {}
    for c in stitches:
        net = build_stitched(anchors[c.front], anchors[c.back], c.config)
        fit_stitch(net, train)
        layers[c.label] = net.stitch
    return StitchedFamily(anchors, members, layers), train


def test_settings_refuse_bad_values_by_name() -> None:
    for kwargs, needle in (
        ({"epochs": 0}, "epochs"),
        ({"lr": 2.0}, "lr"),
        ({"anchor_lr": 0}, "anchor_lr"),
        ({"sampling": "flops"}, "sampling"),
        ({"anchor_share": 1.5}, "anchor_share"),
        ({"distill": -0.1}, "distill"),
    ):
        with pytest.raises(ValueError, match=needle):
            FamilySettings(**kwargs)
    assert FamilySettings(anchor_lr=None).train_anchors is False
    s = FamilySettings(epochs=3, sampling="macs")
    assert FamilySettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="unknown family settings"):
        FamilySettings.from_dict({"epoch": 3})


def test_member_sampling_is_seeded_per_epoch_and_honours_the_anchor_share() -> None:
    names = ["a", "b", "s1", "s2", "s3"]
    macs = {"a": 1e6, "b": 9e6, "s1": 2e6, "s2": 4e6, "s3": 8e6}
    uniform = MemberSampler(names, macs, ["a", "b"], FamilySettings(seed=3))
    first = uniform.epoch(0, 2000)
    assert first == uniform.epoch(0, 2000)  # a resumed run draws the same members
    assert first != uniform.epoch(1, 2000)
    counts = {n: first.count(n) for n in names}
    assert all(abs(c / 2000 - 0.2) < 0.04 for c in counts.values()), counts
    share = MemberSampler(names, macs, ["a", "b"], FamilySettings(anchor_share=0.5))
    drawn = share.epoch(0, 4000)
    anchors = sum(n in ("a", "b") for n in drawn) / len(drawn)
    assert abs(anchors - 0.5) < 0.03, anchors
    # SN-Netv2: groups of log-MACs are drawn alike, so the lone smallest member (a group of
    # its own) is drawn far more often than under uniform sampling.
    by_macs = MemberSampler(names, macs, ["a", "b"], FamilySettings(sampling="macs"))
    assert by_macs.epoch(0, 4000).count("a") / 4000 > 0.22


def test_the_loss_mixes_cross_entropy_and_tempered_distillation() -> None:
    family, train = _family()
    teacher = torch.nn.Linear(1, 1)  # never called: the loss is computed from given logits
    settings = FamilySettings(distill=0.25, temperature=3.0)
    trainer = FamilyTrainer(family, train, settings, teacher=teacher)
    g = torch.Generator().manual_seed(1)
    student = torch.randn(8, 10, generator=g)
    t_logits = torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    got = trainer._loss(student, y, t_logits)
    # By hand: KL(teacher || student) at T, averaged over the batch, times T^2.
    p_t = torch.softmax(t_logits / 3.0, dim=1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / 3.0, dim=1))).sum(1).mean()
    ce = F.cross_entropy(student, y)
    assert math.isclose(float(got), float(0.75 * ce + 0.25 * 9.0 * kl), rel_tol=1e-5)
    pure = FamilyTrainer(family, train, FamilySettings(distill=1.0), teacher=teacher)
    no_labels = torch.full((8,), -1)
    assert math.isclose(
        float(pure._loss(student, no_labels, t_logits)),
        float(
            (
                torch.softmax(t_logits, 1)
                * (torch.log_softmax(t_logits, 1) - torch.log_softmax(student, 1))
            )
            .sum(1)
            .mean()
        ),
        rel_tol=1e-5,
    )


def test_training_moves_the_members_and_keeps_batchnorm_statistics() -> None:
    family, train = _family()
    cnn = next(a for a in family.anchors.values() if a.family == "resnet")
    stats = {k: v.clone() for k, v in cnn.model.state_dict().items() if "running" in k}
    before = {k: v.clone() for k, v in family.state_dict().items()}
    trainer = FamilyTrainer(family, train, FamilySettings(epochs=2, batch_size=16, distill=0.0))
    first = trainer.train_epoch()
    second = trainer.train_epoch()
    assert first.steps == second.steps == steps_per_epoch(64, 16) == 4
    assert sum(first.member_steps.values()) == 4
    after = family.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("models.") for k in moved), "the anchors did not train"
    assert any(k.startswith("stitches.") for k in moved), "no stitching layer trained"
    for k, v in stats.items():
        assert torch.equal(v, cnn.model.state_dict()[k]), f"BatchNorm statistic {k} changed"
    with pytest.raises(ValueError, match="all 2 epochs"):
        trainer.train_epoch()


def test_frozen_anchors_stay_bit_for_bit() -> None:
    family, train = _family()
    anchors_before = {n: copy.deepcopy(m.state_dict()) for n, m in family.anchor_models()}
    trainer = FamilyTrainer(family, train, FamilySettings(anchor_lr=None, distill=0.0))
    result = trainer.train_epoch()
    assert set(result.member_steps) <= {n for n, c in family.members.items() if not c.is_anchor}
    for n, m in family.anchor_models():
        for k, v in m.state_dict().items():
            assert torch.equal(v, anchors_before[n][k]), (n, k)


def test_a_resumed_run_trains_as_an_uninterrupted_one() -> None:
    settings = FamilySettings(epochs=3, batch_size=16, distill=0.0)
    straight, train = _family()
    t = FamilyTrainer(straight, train, settings)
    for _ in range(3):
        t.train_epoch()
    resumed, train2 = _family()
    first = FamilyTrainer(resumed, train2, settings)
    first.train_epoch()
    state = {
        "family": copy.deepcopy(resumed.state_dict()),
        "trainer": copy.deepcopy(first.state_dict()),
    }
    again, train3 = _family()  # a new process: fresh modules, then the checkpoint
    again.load_state_dict(state["family"])
    second = FamilyTrainer(again, train3, settings)
    second.load_state_dict(state["trainer"])
    assert second.epochs_done == 1
    second.train_epoch()
    second.train_epoch()
    for k, v in straight.state_dict().items():
        assert torch.allclose(v, again.state_dict()[k], atol=1e-6), k
    assert [h.loss for h in second.history] == pytest.approx([h.loss for h in t.history])


def test_distillation_needs_a_teacher() -> None:
    family, train = _family()
    with pytest.raises(ValueError, match="needs a teacher"):
        FamilyTrainer(family, train, FamilySettings(distill=0.5))


def _cos(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2 * (1 + math.cos(math.pi * pct))


def test_the_one_cycle_schedule_runs_step_by_step_over_all_epochs() -> None:
    # Issue 26, item 4: the learning rate of every step the training loop takes, read from
    # its optimiser, against one-cycle's shape over both epochs (the anchors' group peaks at
    # anchor_lr on the same schedule).
    family, train = _family()
    settings = FamilySettings(epochs=2, batch_size=16, lr=0.01, anchor_lr=0.002, distill=0.0)
    trainer = FamilyTrainer(family, train, settings)
    total = trainer.steps * settings.epochs  # 4 steps of 16 images per epoch
    assert total == 8
    lrs = [[g["lr"] for g in trainer.optimizer.param_groups]]  # before the first step
    for _ in range(settings.epochs):
        trainer.train_epoch(
            lambda step, loss: lrs.append([g["lr"] for g in trainer.optimizer.param_groups])
        )
    lrs = lrs[:total]  # the rate each of the 8 steps ran at
    top = settings.warmup * total - 1  # 1.4: the peak lies between steps 1 and 2
    for group, peak in ((0, 0.01), (1, 0.002)):
        first, last = peak / 25, peak / 25 / 1e4
        want = [
            _cos(first, peak, s / top)
            if s <= top
            else _cos(peak, last, (s - top) / (total - 1 - top))
            for s in range(total)
        ]
        got = [step[group] for step in lrs]
        assert got == pytest.approx(want, rel=1e-9), group
        assert got[0] == pytest.approx(first) and got[-1] == pytest.approx(last)
        assert got[0] < got[1] and max(got) in (got[1], got[2])  # warm-up, then the peak
        assert all(a > b for a, b in pairwise(got[2:]))  # decay to the end
