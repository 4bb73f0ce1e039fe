"""Signals per ordered anchor pair, computed before the study opens.

The CKA matrices and the pruning rule's signal (with each stitch point's MACs), cached on
disk under ``--out``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluators import cka_matrix, stitch_macs, stitch_signals
from search.core import SearchSpace, SignalKey, key_resolution
from search.inputs import Plan
from search.strategy import CkaMatrices, PruningSignals
from space import Anchor


def _pair_anchors(plan: Plan, key: SignalKey) -> tuple[Anchor, Anchor]:
    """The front and back anchor of a signal key, at its resolution (if any)."""
    front, back = plan.anchors[key[0]], plan.anchors[key[1]]
    r = key_resolution(key)
    if r is None:
        return front, back
    return front.at_resolution(r), back.at_resolution(r)


def _pairs_word(space: SearchSpace) -> str:
    return "pairs" if space.resolutions is None else "pairs x resolutions"


def cka_matrices(plan: Plan, space: SearchSpace, log: Callable[..., Any]) -> CkaMatrices:
    """The CKA matrix of every ordered anchor pair (cached on disk under ``plan.out``)."""
    cache = plan.out / "cache" / "cka"
    loader = plan.data.calibration.subset(plan.study.cka.images)
    matrices = {}
    t0 = time.perf_counter()
    keys = space.signal_keys()
    for i, key in enumerate(keys, start=1):
        front, back = _pair_anchors(plan, key)
        matrices[key] = cka_matrix(front, back, loader, cache_dir=cache)
        log(
            f"\rCKA matrices: {i}/{len(keys)} {_pairs_word(space)} "
            f"({time.perf_counter() - t0:.1f}s)",
            end="",
        )
    log("")
    return matrices


def pruning_signals(
    plan: Plan, space: SearchSpace, matrices: CkaMatrices, log: Callable[..., Any]
) -> PruningSignals | None:
    """What the study's pruning rule reads besides the CKA matrices (``None``: nothing).

    ``residual`` and ``kl`` are computed per ordered pair by :func:`evaluators.stitch_signals`
    on the first ``study.pruning_images`` calibration images (cached on disk under
    ``plan.out``); a ``depth`` rule also takes every stitch point's MACs
    (:func:`evaluators.stitch_macs`). A space restricted to some stitch points
    (``cuts: stages``) gets both for those points only.
    """
    rule = plan.study.pruning_rule
    if not rule.active or (rule.signal == "cka" and rule.depth is None):
        return None
    cache = plan.out / "cache" / "signals"
    loader = plan.data.calibration.subset(plan.study.pruning_images)
    values: dict[SignalKey, np.ndarray] = {}
    macs: dict[SignalKey, np.ndarray] | None = {} if rule.depth is not None else None
    t0 = time.perf_counter()
    keys = space.signal_keys()
    for i, key in enumerate(keys, start=1):
        front, back = _pair_anchors(plan, key)
        points = space.restricted_points(key[0], key[1])
        if rule.signal == "cka":
            values[key] = matrices[key]
        else:
            sig = stitch_signals(
                front, back, loader, signals=[rule.signal], cache_dir=cache, points=points
            )
            values[key] = sig[rule.signal]
        if macs is not None:
            allow = plan.study.macs.allow_unsupported
            macs[key] = stitch_macs(front, back, points, allow_unsupported=allow)
        log(
            f"\rpruning signal {rule.signal!r}: {i}/{len(keys)} {_pairs_word(space)} "
            f"({time.perf_counter() - t0:.1f}s)",
            end="",
        )
    log("")
    return PruningSignals(values, macs)


@dataclass(frozen=True)
class PairSignals:
    """What the search reads per ordered pair, computed once before the study opens.

    Attributes:
        cka: The CKA matrices (recorded on every stitch trial).
        pruning: The pruning rule's signal and MACs (``None``: the rule reads ``cka``, or
            prunes nothing).
    """

    cka: CkaMatrices
    pruning: PruningSignals | None


def study_signals(plan: Plan, log: Callable[..., Any]) -> PairSignals:
    """The CKA matrices and the pruning rule's signals of every ordered pair (cached)."""
    matrices = cka_matrices(plan, plan.space, log)
    return PairSignals(matrices, pruning_signals(plan, plan.space, matrices, log))
