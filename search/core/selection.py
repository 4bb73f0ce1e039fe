"""Choosing among evaluated candidates: each device's best, and the accuracy/MACs front."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial

from search.core.budgets import DeviceBudget
from search.core.trials import Attr, budget_metrics


def select_per_device(
    trials: Sequence[FrozenTrial], budgets: Sequence[DeviceBudget]
) -> dict[str, FrozenTrial | None]:
    """Per device: the highest-accuracy trial within all of its budgets.

    Ties are broken by fewer MACs, then fewer parameters, so the pick is Pareto-optimal
    (accuracy up, MACs down) among the trials that fit the device.
    """
    out: dict[str, FrozenTrial | None] = {}
    for b in budgets:
        fits = [
            t
            for t in trials
            if t.user_attrs.get(Attr.VAL_ACC) is not None
            and b.fits(budget_metrics(t.user_attrs, b))
        ]
        out[b.device] = (
            max(
                fits,
                key=lambda t: (
                    t.user_attrs[Attr.VAL_ACC],
                    -t.user_attrs.get(Attr.MACS, 0),
                    -t.user_attrs.get(Attr.PARAMS, 0),
                ),
            )
            if fits
            else None
        )
    return out


def ranked_for_device(trials: Sequence[FrozenTrial], budget: DeviceBudget) -> list[FrozenTrial]:
    """The trials that fit a device, best first (as :func:`select_per_device` ranks them)."""
    fits = [
        t
        for t in trials
        if t.user_attrs.get(Attr.VAL_ACC) is not None
        and budget.fits(budget_metrics(t.user_attrs, budget))
    ]
    return sorted(
        fits,
        key=lambda t: (
            -t.user_attrs[Attr.VAL_ACC],
            t.user_attrs.get(Attr.MACS, 0),
            t.user_attrs.get(Attr.PARAMS, 0),
            t.number,
        ),
    )


def accuracy_macs_front(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other beats on both validation accuracy (up) and MACs (down), by MACs."""
    scored = [
        t
        for t in trials
        if t.user_attrs.get(Attr.VAL_ACC) is not None and t.user_attrs.get(Attr.MACS) is not None
    ]
    front: list[FrozenTrial] = []
    for t in sorted(scored, key=lambda t: (t.user_attrs[Attr.MACS], -t.user_attrs[Attr.VAL_ACC])):
        if not front or t.user_attrs[Attr.VAL_ACC] > front[-1].user_attrs[Attr.VAL_ACC]:
            front.append(t)
    return front
