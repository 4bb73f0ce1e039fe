"""Per-device selection: the best evaluated candidate within each device's budgets."""

from __future__ import annotations

from collections.abc import Sequence

from optuna.trial import FrozenTrial

from search.core import Attr, DeviceBudget, budget_metrics


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
