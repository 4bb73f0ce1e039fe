"""Pruning of the search space by a stitch-point signal, applied to a study.

:class:`search.core.PruningRule` says why one stitch point is pruned; this module
applies it to the whole space (:func:`pruned_reasons`) and records the pruned points in the
study, once, as PRUNED trials carrying their CKA and the reason (:func:`record_pruned_trials`),
so that optuna-dashboard shows them and no driver evaluates them. The rule reads the CKA
matrices, or the :class:`PruningSignals` of another signal (``residual``, ``kl``; see
:mod:`evaluators.signals`) with the stitch points' MACs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from search.core import Attr, PruningRule, SearchSpace, SignalKey, annotation, signal_key
from space import Candidate

#: CKA matrix per ordered anchor pair ``(front, back)`` (``(front, back, resolution)`` in a
#: study that searches resolutions; :func:`search.core.signal_key`), indexed
#: ``[front cut, back cut]``.
CkaMatrices = Mapping[SignalKey, np.ndarray]


def cka_at(cka: CkaMatrices, c: Candidate) -> float | None:
    """The CKA at a candidate's stitch point (``None`` for an anchor or an unknown pair)."""
    if c.is_anchor:
        return None
    m = cka.get(signal_key(c))
    return None if m is None else float(m[c.front_block, c.back_block])


@dataclass(frozen=True)
class PruningSignals:
    """What a pruning rule reads per ordered pair, when it is not the CKA matrices alone.

    Attributes:
        values: The rule's signal per ordered pair (and resolution: keys as
            :func:`search.core.signal_key`), indexed ``[front cut, back cut]``.
        macs: MACs of every stitch point per ordered pair, same indexing (``depth`` rules).
    """

    values: Mapping[SignalKey, np.ndarray]
    macs: Mapping[SignalKey, np.ndarray] | None = None


def pruned_reasons(
    space: SearchSpace,
    cka: CkaMatrices,
    rule: PruningRule,
    signals: PruningSignals | None = None,
) -> dict[str, tuple[Candidate, str]]:
    """Candidate key -> (candidate, reason) for every candidate the rule prunes.

    Args:
        space: The search space.
        cka: The CKA matrices (what the rule reads when ``signals`` is ``None``).
        rule: The rule.
        signals: The rule's signal and MACs, when given.
    """
    out: dict[str, tuple[Candidate, str]] = {}
    values = signals.values if signals is not None else cka
    macs = signals.macs if signals is not None else None
    if not values or not rule.active:
        return out
    masked: dict[SignalKey, tuple[np.ndarray, np.ndarray | None]] = {}
    for c in space.all_candidates():
        pair = signal_key(c)
        if c.is_anchor or pair not in values:
            continue
        if pair not in masked:
            m = None if macs is None else macs.get(pair)
            masked[pair] = (_within(space, pair, values[pair]), _within(space, pair, m))
        matrix, m = masked[pair]
        reason = rule.reason(c, matrix, m)
        if reason is not None:
            out[c.key] = (c, reason)
    return out


def _within(space: SearchSpace, key: SignalKey, matrix: np.ndarray | None) -> np.ndarray | None:
    """``matrix`` with NaN outside the pair's stitch points when the space restricts them.

    A rule then ranks a stitch point (``top_k``, ``depth``) only among the points the space
    holds (``cuts: stages``), not among every cut of the anchors.
    """
    points = space.restricted_points(key[0], key[1])
    if matrix is None or points is None:
        return matrix
    out = np.full(matrix.shape, np.nan)
    for k, j in points:
        out[k, j] = matrix[k, j]
    return out


def _pruned_attrs(c: Candidate, cka: float | None, reason: str) -> dict[str, object]:
    attrs = annotation(c, driver_id="", cka=cka)
    del attrs[Attr.DRIVER]  # recorded for the study, by no driver in particular
    attrs[Attr.PRUNED_REASON] = reason
    return attrs


def record_pruned_trials(
    study: optuna.Study,
    space: SearchSpace,
    cka: CkaMatrices,
    rule: PruningRule,
    signals: PruningSignals | None = None,
) -> int:
    """Records every candidate the rule prunes as a PRUNED trial, once per study.

    Returns:
        How many were newly recorded.
    """
    reasons = pruned_reasons(space, cka, rule, signals)
    if not reasons:
        return 0
    recorded = {
        t.user_attrs.get(Attr.KEY)
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    }
    dists = space.distributions()
    new = [
        optuna.trial.create_trial(
            state=TrialState.PRUNED,
            params=space.encode(c),
            distributions=dists,
            user_attrs=_pruned_attrs(c, cka_at(cka, c), reason),
        )
        for key, (c, reason) in reasons.items()
        if key not in recorded
    ]
    if new:
        study.add_trials(new)
    return len(new)
