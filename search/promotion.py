"""Rung 1 of the fidelity ladder: which rung-0 candidates to fine-tune, and the searcher that does.

Rung 0 fits every proposed stitch by least squares on calibration images (cheap, every
candidate). Rung 1 fine-tunes the stitching layer alone on training images (seconds per
candidate), so only promoted candidates get it. Optuna cannot prune multi-objective studies
and Ray's ASHA needs one scalar, so the ladder is staged here:

- :func:`promotion_order` ranks the rung-0 stitches: for every device, its best feasible
  stitches by rung-0 accuracy (round-robin over the devices, rank 1 of every device first),
  then the stitches on the rung-0 Pareto front, then the devices' further ranks. Anchors are
  not promoted (nothing to train). The rung-1 budget cuts the list.
- :class:`Rung1Searcher` feeds them, in that order, to Ray Tune workers as trials of a second
  Optuna study (``<study>:finetuned``) in the same storage, until the rung-1 budget (trials in
  that study, seconds in this run) is spent. Each rung-1 trial names its rung-0 trial; its
  objective values are the fine-tuned accuracy and the rung-0 costs (fine-tuning changes
  weights, not the architecture), so optuna-dashboard shows the fine-tuned front on its own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from ray.tune.search import Searcher

from search import optuna_access
from search.budgets import DeviceBudget
from search.candidates import SearchSpace
from search.plan import Plan
from search.recorder import Recorder, objective_values
from search.storage import StorageUnavailable, stops_on_storage_loss
from search.trials import BUDGET_METRICS, Attr, budget_metrics, candidate_of, evaluated_trials

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


def teacher_of(plan: Plan, study: optuna.Study) -> str | None:
    """The anchor rung 1 distils from: the study's, else the most accurate at rung 0.

    A label-free study distils from its teacher (the anchor its agreement is measured
    with). None when rung 1 does not distil.
    """
    if plan.study.label_free:
        return plan.study.teacher
    ft = plan.study.finetune
    if ft.distill <= 0:
        return None
    if ft.teacher is not None:
        return ft.teacher
    anchors = [t for t in evaluated_trials(study) if t.user_attrs.get(Attr.KIND) == "anchor"]
    if not anchors:
        return max(plan.anchors, key=lambda n: plan.anchors[n].num_blocks)
    best = max(anchors, key=lambda t: t.user_attrs.get(Attr.VAL_ACC, -1.0))
    return candidate_of(best).front


class Rung1Searcher(Searcher):
    """Ray Tune searcher that fine-tunes promoted candidates as trials of the rung-1 study.

    Args:
        study: The rung-1 study.
        space: The search space (the trials' parameter encoding).
        queue: Promoted rung-0 trials, in order.
        budgets: The device budgets.
        objectives: Objective names in study order.
        driver_id: Written into each trial.
        max_trials: Rung-1 evaluations the study may hold (all drivers together).
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
        deadline: float | None = None,
        on_event: Callable[[str, FrozenTrial], None] | None = None,
        guard: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        super().__init__(metric=None, mode=None)
        self.study = study
        self.space = space
        self.queue = list(queue)
        self.objectives = list(objectives)
        self.driver_id = driver_id
        self.max_trials = max_trials
        self.deadline = deadline
        self.on_event = on_event
        self.guard = guard
        self.recorder = Recorder(study, driver_id=driver_id, budgets=budgets, cka={})
        self._live: dict[str, tuple[optuna.Trial, FrozenTrial]] = {}
        self.completed = self.failed = 0
        self.out_of_time = False
        self.storage_lost: StorageUnavailable | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["on_event"] = None
        state["guard"] = None
        return state

    def _taken(self) -> tuple[set[str], int]:
        """Keys complete or running in the rung-1 study, and how many are complete."""
        trials = optuna_access.trials(self.study, (TrialState.COMPLETE, TrialState.RUNNING))
        keys = {t.user_attrs.get(Attr.KEY) for t in trials}
        return keys, sum(t.state == TrialState.COMPLETE for t in trials)

    @stops_on_storage_loss(Searcher.FINISHED)
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next promoted candidate to fine-tune."""
        with (self.guard or contextlib.nullcontext)():
            return self._suggest(trial_id)

    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        finished = None if self._live else Searcher.FINISHED
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

    @stops_on_storage_loss()
    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Stores a fine-tuning result in the rung-1 study."""
        with (self.guard or contextlib.nullcontext)():
            self._complete(trial_id, result, error)

    def _complete(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        trial, source = entry
        if error or result is None:
            reason = str((result or {}).get("worker_error") or "the Ray worker died or was lost")
            if self.recorder.fail(trial, reason, result):
                self.failed += 1
                self._emit("failed", trial.number)
            return
        merged = _with_rung0_costs(result, source.user_attrs)
        values, reason = objective_values(merged, self.objectives)
        if reason is not None:
            if self.recorder.fail(trial, reason, result):
                self.failed += 1
                self._emit("failed", trial.number)
            return
        if self.recorder.complete(trial, merged, values):
            self.completed += 1
            self._emit("complete", trial.number)

    def fail_live(self, reason: str) -> list[int]:
        """Fails every trial dispatched and not yet told (interrupted); returns their numbers."""
        numbers = []
        for trial_id in list(self._live):
            trial, _ = self._live.pop(trial_id)
            self.recorder.fail(trial, reason)
            numbers.append(trial.number)
        return numbers

    def _emit(self, kind: str, number: int) -> None:
        if self.on_event is not None:
            self.on_event(kind, optuna_access.trial_by_number(self.study, number))


def _with_rung0_costs(result: Mapping[str, Any], rung0: Mapping[str, Any]) -> dict[str, Any]:
    """A rung-1 result with the rung-0 trial's costs (the architecture is the same)."""
    merged = dict(result)
    for k in (*BUDGET_METRICS, Attr.STITCH_PARAMS, Attr.LATENCY_SPREAD_MS, Attr.CKA):
        if rung0.get(k) is not None:
            merged[k] = rung0[k]
    merged[Attr.RUNG0_VAL_ACC] = rung0.get(Attr.VAL_ACC)
    return merged
