"""The promotion policy: which rung-0 stitches the next rung fine-tunes, in which order.

Rung 0 fits every proposed stitch by least squares on calibration images (cheap, every
candidate). Rung 1 fine-tunes the stitching layer alone on training images (seconds per
candidate), so only promoted candidates get it. Optuna cannot prune multi-objective studies
and Ray's ASHA needs one scalar, so the ladder is staged here:

- :func:`promotion_order` ranks the rung-0 stitches: for every device, its best feasible
  stitches by rung-0 accuracy (round-robin over the devices, rank 1 of every device first),
  then the stitches on the rung-0 Pareto front, then the devices' further ranks. Anchors are
  not promoted (nothing to train). The rung-1 budget cuts the list.
- :class:`~search.strategy.rung1.Rung1Searcher` feeds them, in that order, to Ray Tune
  workers as trials of the rung-1 study (:func:`rung1_study_name`), until the rung-1 budget
  is spent; :func:`best_rung` then represents every candidate by its highest rung.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.core import Attr, DeviceBudget, budget_metrics

#: Suffix of the rung-1 study's name.
RUNG1_SUFFIX = ":finetuned"


def rung1_study_name(name: str) -> str:
    """The name of the rung-1 study that goes with study ``name``."""
    return name + RUNG1_SUFFIX


def promotion_order(
    trials: Iterable[FrozenTrial],
    budgets: Sequence[DeviceBudget],
    *,
    per_device: int,
    front: Iterable[FrozenTrial] = (),
) -> list[FrozenTrial]:
    """The rung-0 stitches to fine-tune, most promising first.

    First each device's ``per_device`` best feasible stitches by rung-0 accuracy, round-robin
    over the devices (rank 1 of every device, then rank 2, ...); then the stitches on the
    rung-0 Pareto front (by MACs); then every device's further stitches, round-robin, so that
    a larger rung-1 budget keeps going down the devices' rankings.

    Args:
        trials: Evaluated rung-0 trials.
        budgets: The devices.
        per_device: Ranks per device before the front's stitches.
        front: Rung-0 Pareto-optimal trials (``study.best_trials``).

    Returns:
        Distinct stitches (anchors excluded), in promotion order.
    """
    stitches = [
        t
        for t in trials
        if t.user_attrs.get(Attr.KIND) == "stitch" and t.user_attrs.get(Attr.VAL_ACC) is not None
    ]
    ranked = sorted(stitches, key=lambda t: (-t.user_attrs[Attr.VAL_ACC], t.number))
    per = [[t for t in ranked if b.fits(budget_metrics(t.user_attrs, b))] for b in budgets]
    by_key = {t.user_attrs[Attr.KEY]: t for t in stitches}
    order: dict[str, FrozenTrial] = {}

    def rounds(ranks: range) -> None:
        for rank in ranks:
            for picks in per:
                if rank < len(picks):
                    order.setdefault(picks[rank].user_attrs[Attr.KEY], picks[rank])

    rounds(range(per_device))
    for t in sorted(front, key=lambda t: (t.user_attrs.get(Attr.MACS, 0), t.number)):
        key = t.user_attrs.get(Attr.KEY)
        if key in by_key:
            order.setdefault(key, by_key[key])
    rounds(range(per_device, max((len(p) for p in per), default=0)))
    return list(order.values())


def rung1_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE rung-1 trials."""
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def best_rung(rung0: Sequence[FrozenTrial], rung1: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """Every evaluated candidate at the highest rung it reached.

    A candidate fine-tuned at rung 1 is represented by its rung-1 trial, every other one by
    its rung-0 trial; order follows ``rung0``.
    """
    finetuned = {t.user_attrs.get(Attr.KEY): t for t in rung1}
    return [finetuned.get(t.user_attrs.get(Attr.KEY), t) for t in rung0]
