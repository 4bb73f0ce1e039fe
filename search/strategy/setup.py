"""A study's set-up, once: the anchors enqueued first and the pruned stitch points recorded.

The driver that created the study does it; another driver joining waits for it, and takes
over when the creator died first or the study predates this protocol.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import optuna

from search.core import Attr, PruningRule, SearchSpace, StudyAttr
from search.store import driver_status, heartbeats, optuna_access
from search.strategy.pruning import PruningSignals, record_pruned_trials


def setup_study(
    study: optuna.Study,
    space: SearchSpace,
    matrices: Mapping[tuple[str, str], np.ndarray],
    rule: PruningRule,
    *,
    created: bool,
    signals: PruningSignals | None = None,
    log: Callable[[str], Any],
    critical: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> int:
    """Enqueues the anchors and records the CKA-pruned points, once per study.

    The driver that created the study does it; another driver joining waits for it (so that
    two drivers starting together record nothing twice), and takes over when the creator
    died first or the study predates this protocol.

    Args:
        study: The study.
        space: The search space.
        matrices: The CKA matrices.
        rule: The pruning rule.
        created: Whether this driver created the study.
        signals: The rule's signal and MACs (``None``: the rule reads ``matrices``).
        log: Prints a progress line.
        critical: Context manager factory around the writes (defers Ctrl-C).

    Returns:
        How many PRUNED trials were newly recorded.
    """
    if not created:
        t0 = time.monotonic()
        while True:
            attrs = optuna_access.study_attrs(study)
            if attrs.get(StudyAttr.SETUP_COMPLETE):
                return 0
            creator = attrs.get(StudyAttr.CREATOR)
            waited = time.monotonic() - t0
            if creator is None:  # an older study, or its creator has not got that far
                if study.get_trials(deepcopy=False) or waited > 3:
                    break
            else:
                beat = heartbeats(study).get(creator)
                if (beat is not None and not driver_status(beat)[0]) or waited > 60:
                    break
            time.sleep(0.2)
        log("setting up the study (its creator did not finish that)")
    with critical():
        trials = study.get_trials(deepcopy=False)
        if not any(t.user_attrs.get(Attr.SEEDED) == "anchor" for t in trials):
            for c in space.anchors():
                study.enqueue_trial(space.encode(c), user_attrs={Attr.SEEDED: "anchor"})
        new = record_pruned_trials(study, space, matrices, rule, signals)
        study.set_user_attr(StudyAttr.SETUP_COMPLETE, True)
    return new
