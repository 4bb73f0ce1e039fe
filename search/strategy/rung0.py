"""Rung 0: the Ray Tune searcher that asks the Optuna study for candidates (ask and tell).

Only the driver talks to the study. For each Ray trial :class:`StitchSearcher` asks the study
for a parameter vector, decodes it to a candidate and then:

- answers a configuration evaluated before (the sampler repeating itself) from the stored
  result, without evaluating it again;
- records a candidate below the CKA rule as PRUNED, with its CKA and the reason, without
  dispatching it;
- otherwise dispatches it to a Ray worker, and tells the study the worker's result.

Several drivers may share one study (PostgreSQL storage); each claims a trial after asking
for it: a trial that would exceed the requested total, or repeat a configuration another
driver is already evaluating, is recorded as PRUNED with the reason instead of being
dispatched. Trials left RUNNING by a driver that died are marked failed
(:func:`search.store.fail_stale_trials`).

The searcher is the Ray Tune adapter (its lifecycle: :class:`search.strategy.base.StudySearcher`);
the decisions are small policies it composes:

- :class:`~search.strategy.ledger.Ledger`: which configurations are done, running here,
  running elsewhere or pruned (and so what the sampler may propose);
- :class:`~search.strategy.claims.ClaimPolicy`: whether this driver may evaluate an
  asked-for trial;
- :class:`~search.strategy.recorder.Recorder`: how each outcome is written into the study;
- :func:`~search.strategy.sampler.install_sampler`: the study proposes only what the ledger
  accepts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial

from search.core import DeviceBudget, PruningRule, SearchSpace
from search.strategy.base import StudySearcher
from search.strategy.claims import ClaimPolicy
from search.strategy.ledger import Ledger
from search.strategy.pruning import (
    CkaMatrices,
    PruningSignals,
    cka_at,
    pruned_reasons,
    record_pruned_trials,
)
from search.strategy.recorder import Recorder, objective_values
from search.strategy.sampler import install_sampler
from space import Candidate

_PRUNED_OR_RUNNING = "repeat of a pruned or running configuration"
_RUNNING_ELSEWHERE = "repeat of a configuration another driver is evaluating"


@dataclass(frozen=True, kw_only=True)
class SearcherSettings:
    """What one driver's searcher does, besides the study, the space and the CKA matrices.

    Attributes:
        objectives: Objective names in study order (keys of :data:`search.core.OBJECTIVES`).
        budgets: The device budgets.
        rule: The CKA pruning rule.
        total: How many candidate evaluations the study should hold (all drivers together).
        driver_id: Written into each trial's user attributes.
        seed: Seed for the fallback choice of unexplored candidates.
        max_failures: Stop after this many failed evaluations in this run (``None``:
            ``max(10, total)``).
        max_retries: Retries of a trial whose worker died (for the failure reason).
        stale_check_s: Seconds between two sweeps for trials of dead drivers.
    """

    objectives: Sequence[str]
    budgets: Sequence[DeviceBudget]
    rule: PruningRule
    total: int
    driver_id: str
    seed: int = 0
    max_failures: int | None = None
    max_retries: int = 0
    stale_check_s: float = 15.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        object.__setattr__(self, "budgets", tuple(self.budgets))


class StitchSearcher(StudySearcher):
    """Ray Tune searcher that asks and tells an Optuna study.

    Counters for this run besides ``completed`` and ``failed`` (the driver and its progress
    display read them): ``pruned``, ``repeats``, ``surplus``; ``max_failures`` is the
    failure limit.

    Args:
        study: The study (other drivers may share it).
        space: The search space.
        settings: What this driver's searcher does.
        sampler: The sampler that models the objectives (:func:`search.strategy.make_sampler`);
            the searcher installs it on the study, filtered by its ledger. Pass the same
            object to every round's searcher so that its state carries over.
        cka: CKA matrix per ordered pair ``(front, back)``, indexed by cuts.
        signals: The pruning rule's signal and MACs, when the rule does not read ``cka``.
        on_event: Called with ``(kind, trial)`` after every tell (progress display).
        guard: Context manager factory wrapped around each ask/tell sequence (the driver
            defers Ctrl-C there, so that no trial is left half-written).
    """

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        settings: SearcherSettings,
        *,
        sampler: BaseSampler,
        cka: CkaMatrices,
        signals: PruningSignals | None = None,
        on_event: Callable[[str, FrozenTrial], None] | None = None,
        guard: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        super().__init__(
            study,
            Recorder(study, driver_id=settings.driver_id, budgets=settings.budgets, cka=cka),
            max_retries=settings.max_retries,
            on_event=on_event,
            guard=guard,
        )
        self.space = space
        self.settings = settings
        self.cka = cka
        self.signals = signals
        self.max_failures = (
            settings.max_failures if settings.max_failures is not None else max(10, settings.total)
        )
        self.ledger = Ledger(
            study,
            space.all_candidates(),
            pruned=pruned_reasons(space, cka, settings.rule, signals),
            driver_id=settings.driver_id,
            seed=settings.seed,
            stale_check_s=settings.stale_check_s,
        )
        self.claims = ClaimPolicy(study, settings.total)
        self.pruned = 0
        self.repeats = 0
        self.surplus = 0
        install_sampler(study, sampler, space, self.ledger.accept, self.ledger.fallback)

    def exhausted(self) -> bool:
        """Whether every unpruned candidate has been evaluated or is being evaluated."""
        return self.ledger.exhausted()

    def record_pruned(self) -> int:
        """Records every candidate the CKA rule prunes as a PRUNED trial, once per study.

        Returns:
            How many were newly recorded.
        """
        rule = self.settings.rule
        self.ledger.mark_pruned(pruned_reasons(self.space, self.cka, rule, self.signals))
        new = record_pruned_trials(self.study, self.space, self.cka, rule, self.signals)
        self.pruned += new
        return new

    # ------------------------------------------------------------- asking
    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        evaluated, running = self.ledger.sync()
        total = self.settings.total
        if evaluated + running >= total or self.failed >= self.max_failures:
            return self._idle(bool(self.ledger.running_here()))
        if not self.ledger.unexplored():  # the whole (unpruned) space has been evaluated
            return self._idle(bool(self.ledger.running_here()))
        dists = self.space.distributions()
        for _ in range(3):
            trial = self.study.ask(dists)
            c = self.space.decode(trial.params)
            self.recorder.annotate(trial, c)
            if not self.ledger.accept(c):
                # Only enqueued (fixed) parameters can get here: the sampler filters the rest.
                if c.key in self.ledger.done:
                    self._repeat(trial, self.ledger.done[c.key])
                else:
                    self._prune(trial, _PRUNED_OR_RUNNING)
                continue
            claim = self.claims.decide(trial, c)
            if claim.verdict == "ok":
                return self._dispatch(trial_id, trial, c)
            if claim.verdict == "done":
                self.ledger.mark_done(c.key, claim.number)
                self._repeat(trial, claim.number)
            elif claim.verdict == "running":
                self.ledger.mark_elsewhere(c.key)
                self._prune(trial, _RUNNING_ELSEWHERE)
            else:
                self.surplus += 1
                self._prune(
                    trial,
                    f"surplus: the study holds its {total} trials already "
                    "(another driver took the last one)",
                )
                return self._idle(bool(self.ledger.running_here()))
        return None

    def _dispatch(self, trial_id: str, trial: optuna.Trial, c: Candidate) -> dict[str, Any]:
        self.ledger.dispatch(trial_id, trial, c)
        return {"number": trial.number, "candidate": c.to_json(), "cka": cka_at(self.cka, c)}

    # ------------------------------------------------------------- telling
    def _complete(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        entry = self.ledger.release(trial_id)
        if entry is None:
            return
        trial, c = entry
        if error or result is None:
            values, reason = [], self._worker_failure(trial_id)
        else:
            values, reason = objective_values(result, self.settings.objectives)
        if reason is not None:
            self._fail(trial, reason, result)
            return
        if self._tell(trial, result, values):
            self.ledger.mark_done(c.key, trial.number)

    def _repeat(self, trial: optuna.Trial, source: int) -> None:
        self.recorder.repeat(trial, source)
        self.repeats += 1
        self._emit("repeat", trial.number)

    def _prune(self, trial: optuna.Trial, reason: str) -> None:
        self.recorder.prune(trial, reason)
        self.pruned += 1
        self._emit("pruned", trial.number)
