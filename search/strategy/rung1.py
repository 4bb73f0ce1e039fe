"""Rung 1: the Ray Tune searcher that fine-tunes promoted stitches in the rung-1 study.

It feeds the promoted rung-0 stitches (:func:`search.strategy.promotion.promotion_order`),
in order, to Ray Tune workers as trials of a second Optuna study (``<study>:finetuned``) in
the same storage, until the rung-1 budget (trials in that study, seconds in this run) is
spent. Each rung-1 trial names its rung-0 trial; its objective values are the fine-tuned
accuracy and the rung-0 costs (fine-tuning changes weights, not the architecture).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.core import BUDGET_METRICS, Attr, DeviceBudget, SearchSpace, candidate_of
from search.store import optuna_access
from search.strategy.base import StudySearcher
from search.strategy.recorder import Recorder, objective_values


class Rung1Searcher(StudySearcher):
    """Ray Tune searcher that fine-tunes promoted candidates as trials of the rung-1 study.

    Args:
        study: The rung-1 study.
        space: The search space (the trials' parameter encoding).
        queue: Promoted rung-0 trials, in order.
        budgets: The device budgets.
        objectives: Objective names in study order.
        driver_id: Written into each trial.
        max_trials: Rung-1 evaluations the study may hold (all drivers together).
        max_retries: Retries of a trial whose worker died (for the failure reason).
        deadline: ``time.monotonic()`` after which nothing new starts (None: no limit).
        on_event: Called with ``(kind, trial)`` after every tell (progress display).
        guard: Context manager factory around each ask/tell (defers Ctrl-C).
    """

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        queue: Sequence[FrozenTrial],
        *,
        budgets: Sequence[DeviceBudget],
        objectives: Sequence[str],
        driver_id: str,
        max_trials: int,
        max_retries: int = 0,
        deadline: float | None = None,
        on_event: Callable[[str, FrozenTrial], None] | None = None,
        guard: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        super().__init__(
            study,
            Recorder(study, driver_id=driver_id, budgets=budgets, cka={}),
            max_retries=max_retries,
            on_event=on_event,
            guard=guard,
        )
        self.space = space
        self.queue = list(queue)
        self.objectives = list(objectives)
        self.driver_id = driver_id
        self.max_trials = max_trials
        self.deadline = deadline
        self._live: dict[str, tuple[optuna.Trial, FrozenTrial]] = {}
        self.out_of_time = False

    def _taken(self) -> tuple[set[str], int]:
        """Keys complete or running in the rung-1 study, and how many are complete."""
        trials = optuna_access.trials(self.study, (TrialState.COMPLETE, TrialState.RUNNING))
        keys = {t.user_attrs.get(Attr.KEY) for t in trials}
        return keys, sum(t.state == TrialState.COMPLETE for t in trials)

    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        finished = self._idle(bool(self._live))
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.out_of_time = True
            return finished
        taken, complete = self._taken()
        while self.queue:
            if complete + len(self._live) >= self.max_trials:
                return finished
            source = self.queue.pop(0)
            c = candidate_of(source)
            if c.key in taken:
                continue
            self.study.enqueue_trial(self.space.encode(c), skip_if_exists=False)
            trial = self.study.ask(self.space.distributions())
            self.recorder.annotate(trial, c)
            trial.set_user_attr(Attr.RUNG, 1)
            trial.set_user_attr(Attr.RUNG0_TRIAL, source.number)
            self._live[trial_id] = (trial, source)
            return {"number": trial.number, "candidate": c.to_json(), "rung": 1}
        return finished

    def _complete(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        trial, source = entry
        if error or result is None:
            self._fail(trial, self._worker_failure(trial_id), result)
            return
        merged = with_lower_costs(result, source.user_attrs)
        values, reason = objective_values(merged, self.objectives)
        if reason is not None:
            self._fail(trial, reason, result)
            return
        self._tell(trial, merged, values)


def with_lower_costs(result: Mapping[str, Any], lower: Mapping[str, Any]) -> dict[str, Any]:
    """A higher rung's result with the lower rung's costs (the architecture is the same).

    Args:
        result: What the higher rung measured.
        lower: The lower rung's trial attributes (a rung-1 trial carries rung 0's costs
            and ``rung0_val_acc``).
    """
    merged = dict(result)
    for k in (*BUDGET_METRICS, Attr.STITCH_PARAMS, Attr.LATENCY_SPREAD_MS, Attr.CKA):
        if lower.get(k) is not None:
            merged[k] = lower[k]
    merged[Attr.RUNG0_VAL_ACC] = lower.get(Attr.RUNG0_VAL_ACC, lower.get(Attr.VAL_ACC))
    return merged
