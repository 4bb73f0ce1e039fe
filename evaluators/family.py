"""Training a stitched family: anchors and stitching layers together, as SN-Net does.

Least squares (rung 0) and stitch-only fine-tuning (rung 1) leave the anchors as they are,
so a stitch can only be as good as the two halves it joins allow. SN-Net trains the anchors
*with* their stitches: every step samples one member of the family (an anchor or a stitch)
and trains it on a batch, so that the shared anchor blocks learn to serve every member.
:class:`FamilyTrainer` does that for a :class:`space.StitchedFamily`, one epoch at a time
(so that a run can checkpoint and resume between epochs), on one process or as one worker of
a data-parallel group (every worker samples the same member at every step and trains on its
own share of the batch).

- **Loss**: ``(1 - distill) * CE + distill * T^2 * KL(teacher || member)`` at temperature
  ``T``, as rung 1 (:mod:`evaluators.finetune`); the teacher is a frozen copy of an anchor.
  Pure distillation (``distill`` 1) needs no labels (label-free studies).
- **Sampling**: ``uniform`` (every member alike) or ``macs`` (SN-Netv2's resource-aware
  sampling: the members' MACs range is cut into equal-width groups on a log scale, a
  non-empty group is drawn uniformly, then a member in it); ``anchor_share`` fixes the share
  of steps that train a bare anchor.
- **Optimiser**: AdamW with a one-cycle schedule over all epochs; the stitching layers and
  the anchors have their own peak learning rates (``anchor_lr`` None freezes the anchors,
  and then only stitches are drawn: a bare anchor has nothing to train).
- **BatchNorm**: statistics frozen by default (the layers stay in eval mode; their affine
  weights still train), so members that share a block do not pull its statistics apart.

The teacher's logits on the training images are computed once when they fit in memory
(:data:`TEACHER_CACHE_VALUES`) instead of at every step.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from evaluators.data import ArrayLoader
from space import StitchedFamily

#: Member sampling strategies of :class:`FamilySettings`.
SAMPLING = ("uniform", "macs")
#: Groups of the ``macs`` sampling (log-MACs bins).
MACS_GROUPS = 4
#: Cache the teacher's logits when images x classes is at most this many values.
TEACHER_CACHE_VALUES = 64_000_000


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class FamilySettings:
    """How to train a family.

    Attributes:
        epochs: Passes over the training images (``1..10_000``).
        batch_size: Images per step over all workers (``1..65_536``).
        lr: Peak learning rate of the stitching layers (AdamW, one-cycle).
        anchor_lr: Peak learning rate of the anchors; None freezes them (only the stitching
            layers train, as rung 1 but all together).
        weight_decay: AdamW weight decay (``0..1``).
        warmup: Share of the steps spent warming up (``0 < warmup < 1``).
        sampling: ``uniform`` or ``macs`` (see the module docstring).
        anchor_share: Share of the steps that train a bare anchor (``0..1``), or None for
            no special treatment (anchors are members like any other).
        distill: Weight of distillation from the teacher (``0..1``).
        temperature: Distillation temperature (``0 < T <= 100``).
        freeze_bn: Keep BatchNorm statistics frozen.
        seed: Seed of the batch order and of the member sampling.
    """

    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    anchor_lr: float | None = 1e-3
    weight_decay: float = 0.0
    warmup: float = 0.3
    sampling: str = "uniform"
    anchor_share: float | None = None
    distill: float = 0.5
    temperature: float = 1.0
    freeze_bn: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            value = getattr(self, name)
            return ValueError(f"FamilySettings.{name} must be {allowed}, got {value!r}")

        for name, top in (("epochs", 10_000), ("batch_size", 65_536)):
            v = getattr(self, name)
            if not _is_int(v) or not 1 <= v <= top:
                raise bad(name, f"an integer in 1..{top:_}")
        if not _is_int(self.seed) or self.seed < 0:
            raise bad("seed", "an integer >= 0")
        ranges = {
            "lr": (lambda v: 0 < v <= 1, "a number with 0 < lr <= 1"),
            "anchor_lr": (lambda v: 0 < v <= 1, "a number with 0 < anchor_lr <= 1, or None"),
            "weight_decay": (lambda v: 0 <= v <= 1, "a number in 0..1"),
            "warmup": (lambda v: 0 < v < 1, "a fraction with 0 < warmup < 1"),
            "anchor_share": (lambda v: 0 <= v <= 1, "a share in 0..1, or None"),
            "distill": (lambda v: 0 <= v <= 1, "a number in 0..1"),
            "temperature": (lambda v: 0 < v <= 100, "a number with 0 < temperature <= 100"),
        }
        for name, (ok, allowed) in ranges.items():
            v = getattr(self, name)
            if v is None and name in ("anchor_lr", "anchor_share"):
                continue
            if not _is_number(v) or not ok(v):
                raise bad(name, allowed)
            object.__setattr__(self, name, float(v))
        if self.sampling not in SAMPLING:
            raise bad("sampling", f"one of {', '.join(map(repr, SAMPLING))}")
        if not isinstance(self.freeze_bn, bool):
            raise bad("freeze_bn", "true or false")

    @property
    def train_anchors(self) -> bool:
        """Whether the anchors train (``anchor_lr`` is set)."""
        return self.anchor_lr is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FamilySettings:
        """Settings from :meth:`to_dict` output; missing fields take their defaults.

        Raises:
            ValueError: Unknown fields, or a value out of its range.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown family settings {unknown}; the fields are {names}")
        return cls(**dict(d))


class MemberSampler:
    """Which member trains at each step of an epoch: the same on every worker, resumable.

    Args:
        names: The members' names.
        macs: MACs per member (``macs`` sampling).
        anchors: The names of the bare-anchor members (``anchor_share``).
        settings: The family settings (sampling, anchor share, seed).
    """

    def __init__(
        self,
        names: Sequence[str],
        macs: Mapping[str, float],
        anchors: Sequence[str],
        settings: FamilySettings,
    ) -> None:
        self.names = list(names)
        self.settings = settings
        self.anchors = [n for n in self.names if n in set(anchors)]
        self.stitches = [n for n in self.names if n not in set(anchors)]
        self.groups = _macs_groups(self.names, macs) if settings.sampling == "macs" else None

    def _one(self, rng: random.Random, pool: Sequence[str]) -> str:
        if self.groups is None:
            return rng.choice(pool)
        groups = [[n for n in g if n in pool] for g in self.groups]
        return rng.choice(rng.choice([g for g in groups if g]))

    def epoch(self, epoch: int, steps: int) -> list[str]:
        """The member of every step of ``epoch`` (seeded by the settings' seed and epoch)."""
        rng = random.Random(self.settings.seed * 1_000_003 + epoch)
        share = self.settings.anchor_share
        out = []
        for _ in range(steps):
            pool = self.names
            if share is not None and self.anchors and self.stitches:
                pool = self.anchors if rng.random() < share else self.stitches
            out.append(self._one(rng, pool))
        return out


def _macs_groups(names: Sequence[str], macs: Mapping[str, float]) -> list[list[str]]:
    """The members in :data:`MACS_GROUPS` equal-width bins of log MACs (empty ones dropped)."""
    logs = {n: math.log(max(float(macs[n]), 1.0)) for n in names}
    lo, hi = min(logs.values()), max(logs.values())
    width = (hi - lo) / MACS_GROUPS or 1.0
    bins: list[list[str]] = [[] for _ in range(MACS_GROUPS)]
    for n in names:
        bins[min(int((logs[n] - lo) / width), MACS_GROUPS - 1)].append(n)
    return [b for b in bins if b]


@dataclass
class EpochResult:
    """One epoch of family training.

    Attributes:
        epoch: The epoch (0-based).
        steps: Optimiser steps.
        loss: Mean training loss of the epoch.
        member_loss: Mean loss per member over the steps that trained it.
        member_steps: Steps per member.
        seconds: Wall time.
    """

    epoch: int
    steps: int
    loss: float
    member_loss: dict[str, float] = field(default_factory=dict)
    member_steps: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Optimiser steps of one epoch: whole batches of the training images (at least one)."""
    return max(1, num_images // batch_size)


class FamilyTrainer:
    """Trains a family's members jointly, one epoch at a time (see the module docstring).

    Args:
        family: The family; its anchors and stitching layers train in place.
        train: The training images (disjoint from validation and test).
        settings: The family settings.
        macs: MACs per member (``macs`` sampling; default: every member alike).
        teacher: A frozen module mapping images to logits of the same classes (needed when
            ``settings.distill > 0``).
        device: Where to train (the family and teacher are moved there).
        rank: This worker's rank in a data-parallel group.
        world: The group's size.
        module: What to call for a member's logits (``module(x, member)``): the family, or
            its data-parallel wrapper (default: the family).

    Raises:
        ValueError: Distillation without a teacher, or nothing to train.
    """

    def __init__(
        self,
        family: StitchedFamily,
        train: ArrayLoader,
        settings: FamilySettings,
        *,
        macs: Mapping[str, float] | None = None,
        teacher: nn.Module | None = None,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world: int = 1,
        module: nn.Module | None = None,
    ) -> None:
        if settings.distill > 0 and teacher is None:
            raise ValueError(f"family distill={settings.distill} needs a teacher")
        self.family = family
        self.train = train
        self.settings = settings
        self.device = torch.device(device)
        self.rank, self.world = rank, world
        self.module = module if module is not None else family
        self.teacher = teacher
        family.to(self.device)
        if teacher is not None:
            teacher.to(self.device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        anchors = [n for n, c in family.members.items() if c.is_anchor]
        # With frozen anchors a bare anchor has nothing to train: only stitches are drawn.
        drawn = (
            family.names
            if settings.train_anchors
            else [n for n in family.names if n not in anchors]
        )
        if not drawn:
            raise ValueError("the family has nothing to train (no stitch, anchors frozen)")
        self.sampler = MemberSampler(
            drawn, macs or {n: 1.0 for n in family.names}, anchors, settings
        )
        self.steps = steps_per_epoch(train.num_images, settings.batch_size)
        self.optimizer, self.scheduler = self._optimiser()
        self.epochs_done = 0
        self.history: list[EpochResult] = []
        self._teacher_cache: torch.Tensor | None = None

    def _optimiser(self) -> tuple[torch.optim.Optimizer, Any]:
        s = self.settings
        stitch_params = list(self.family.stitches.parameters())
        anchor_params = [p for _, m in self.family.anchor_models() for p in m.parameters()]
        for p in anchor_params:
            p.requires_grad_(s.train_anchors)
        groups = [{"params": stitch_params, "lr": s.lr}]
        peaks = [s.lr]
        if s.train_anchors:
            groups.append({"params": anchor_params, "lr": s.anchor_lr})
            peaks.append(float(s.anchor_lr))
        if not any(p.requires_grad for g in groups for p in g["params"]):
            raise ValueError("the family has nothing to train (no stitch, anchors frozen)")
        opt = torch.optim.AdamW(groups, weight_decay=s.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=peaks, total_steps=self.steps * s.epochs, pct_start=s.warmup
        )
        return opt, sched

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs besides the family's weights."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epochs_done": self.epochs_done,
            "history": [h.to_dict() for h in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` (after the family's weights were restored)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epochs_done = int(state["epochs_done"])
        self.history = [EpochResult(**h) for h in state["history"]]

    # ------------------------------------------------------------------ training
    def _set_modes(self) -> None:
        self.family.train()
        if not self.settings.train_anchors:
            for _, m in self.family.anchor_models():
                m.eval()
        if self.settings.freeze_bn:
            for m in self.family.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def _teacher_logits(self, idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        if self.teacher is None or self.settings.distill <= 0:
            return None
        n = self.train.num_images
        cacheable = n * _classes(self.family) <= TEACHER_CACHE_VALUES
        if cacheable and self._teacher_cache is None:
            self._teacher_cache = _all_logits(self.teacher, self.train, self.device)
        if self._teacher_cache is not None:
            return self._teacher_cache[idx.to(self._teacher_cache.device)].to(self.device)
        with torch.no_grad():
            return self.teacher(x)

    def _loss(
        self, logits: torch.Tensor, y: torch.Tensor, t_logits: torch.Tensor | None
    ) -> torch.Tensor:
        s = self.settings
        pure = t_logits is not None and s.distill >= 1.0
        loss = None if pure else F.cross_entropy(logits, y)
        if t_logits is not None:
            temp = s.temperature
            kl = F.kl_div(
                F.log_softmax(logits / temp, dim=1),
                F.log_softmax(t_logits / temp, dim=1),
                reduction="batchmean",
                log_target=True,
            )
            kl = s.distill * temp * temp * kl
            loss = kl if loss is None else (1.0 - s.distill) * loss + kl
        assert loss is not None
        return loss

    def train_epoch(self, on_step: Callable[[int, float], None] | None = None) -> EpochResult:
        """Trains the next epoch.

        Args:
            on_step: Called with ``(step within the epoch, loss)`` after every step.

        Raises:
            ValueError: All epochs are done, or the loss became non-finite.
        """
        epoch = self.epochs_done
        if epoch >= self.settings.epochs:
            raise ValueError(f"all {self.settings.epochs} epochs are trained already")
        t0 = time.perf_counter()
        members = self.sampler.epoch(epoch, self.steps)
        order = _epoch_order(self.train.num_images, self.settings.seed, epoch)
        batch = self.settings.batch_size
        losses: list[float] = []
        by_member: dict[str, list[float]] = {}
        self._set_modes()
        try:
            for step, name in enumerate(members):
                sel = order[step * batch : (step + 1) * batch][self.rank :: self.world]
                x, y = _batch(self.train, sel)
                x, y = x.to(self.device), y.to(self.device)
                t_logits = self._teacher_logits(sel, x)
                loss = self._loss(self.module(x, name), y, t_logits)
                value = float(loss.item())
                if not math.isfinite(value):
                    raise ValueError(
                        f"family training diverged: the loss is {value} at step {step} of epoch "
                        f"{epoch} (member {name!r}); lower family.lr / family.anchor_lr"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                losses.append(value)
                by_member.setdefault(name, []).append(value)
                if on_step is not None:
                    on_step(step, value)
        finally:
            self.family.eval()
            self.optimizer.zero_grad(set_to_none=True)
        result = EpochResult(
            epoch=epoch,
            steps=len(losses),
            loss=sum(losses) / len(losses),
            member_loss={n: sum(v) / len(v) for n, v in by_member.items()},
            member_steps={n: len(v) for n, v in by_member.items()},
            seconds=time.perf_counter() - t0,
        )
        self.epochs_done += 1
        self.history.append(result)
        return result


def _classes(family: StitchedFamily) -> int:
    return max(a.num_classes for a in family.anchors.values())


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _batch(loader: ArrayLoader, sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``sel`` of an in-memory loader, prepared as the loader prepares them."""
    one = ArrayLoader(
        loader.images[sel],
        loader.labels[sel],
        batch_size=max(1, len(sel)),
        mean=loader.mean,
        std=loader.std,
        input_size=loader.input_size,
    )
    return next(iter(one))


@torch.no_grad()
def _all_logits(model: nn.Module, loader: ArrayLoader, device: torch.device) -> torch.Tensor:
    """The logits of every image of ``loader``, in order (kept on the CPU)."""
    out = []
    for x, _ in ArrayLoader(
        loader.images,
        loader.labels,
        batch_size=500,
        mean=loader.mean,
        std=loader.std,
        input_size=loader.input_size,
    ):
        out.append(model(x.to(device)).float().cpu())
    return torch.cat(out)
