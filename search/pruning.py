"""CKA pruning of the search space, applied to a study.

:class:`search.candidates.PruningRule` says why one stitch point is pruned; this module
applies it to the whole space (:func:`pruned_reasons`) and records the pruned points in the
study, once, as PRUNED trials carrying their CKA and the reason (:func:`record_pruned_trials`),
so that optuna-dashboard shows them and no driver evaluates them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import optuna
from optuna.trial import TrialState

from search.candidates import PruningRule, SearchSpace
from search.trials import Attr, annotation
from space import Candidate

#: CKA matrix per ordered anchor pair ``(front, back)``, indexed ``[front cut, back cut]``.
CkaMatrices = Mapping[tuple[str, str], np.ndarray]


def cka_at(cka: CkaMatrices, c: Candidate) -> float | None:
    """The CKA at a candidate's stitch point (``None`` for an anchor or an unknown pair)."""
    if c.is_anchor:
        return None
    m = cka.get((c.front, c.back))
    return None if m is None else float(m[c.front_block, c.back_block])


def pruned_reasons(
    space: SearchSpace, cka: CkaMatrices, rule: PruningRule
) -> dict[str, tuple[Candidate, str]]:
    """Candidate key -> (candidate, reason) for every candidate the CKA rule prunes."""
    out: dict[str, tuple[Candidate, str]] = {}
    if not cka or not rule.active:
        return out
    for c in space.all_candidates():
        if c.is_anchor or (c.front, c.back) not in cka:
            continue
        reason = rule.reason(c, cka[(c.front, c.back)])
        if reason is not None:
            out[c.key] = (c, reason)
    return out


def _pruned_attrs(c: Candidate, cka: float | None, reason: str) -> dict[str, object]:
    attrs = annotation(c, driver_id="", cka=cka)
    del attrs[Attr.DRIVER]  # recorded for the study, by no driver in particular
    attrs[Attr.PRUNED_REASON] = reason
    return attrs


def record_pruned_trials(
    study: optuna.Study, space: SearchSpace, cka: CkaMatrices, rule: PruningRule
) -> int:
    """Records every candidate the CKA rule prunes as a PRUNED trial, once per study.

    Returns:
        How many were newly recorded.
    """
    reasons = pruned_reasons(space, cka, rule)
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
