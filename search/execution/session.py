"""A run session: this driver's hold on the study, from opening it to the end of the search.

:class:`RunSession` opens (or resumes) the rung-0 study and, when the study fine-tunes and
trains a family, the rung-1 and family studies in the same storage; keeps this driver's
heartbeat in each; sets the study up once (anchors enqueued, pruned points recorded); fails
the trials that stopped drivers left RUNNING; and seeds the sampler (mixed with the driver id
when other drivers share the study). :meth:`RunSession.search` then runs rung 0, rung 1 and
the family. One error policy: an input
error (the stored study does not match the definition) or a lost storage propagates to the
command; an interrupt during the search stops it cleanly (Ray shut down, this driver's
RUNNING trials failed) and is kept in :attr:`RunSession.interrupted` for delivery.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import optuna

from search.core import evaluated_trials, masked_url
from search.execution.console import SignalGuard
from search.execution.driver import RunState, driver_seed, run_rung1, run_search, shutdown_ray
from search.execution.family import run_family
from search.execution.pair_signals import PairSignals
from search.inputs import Plan
from search.store import (
    Heartbeat,
    fail_own_trials,
    fail_stale_trials,
    live_drivers,
    make_storage,
    open_study,
)
from search.strategy import family_study_name, make_sampler, rung1_study_name, setup_study


def open_storage(plan: Plan, log: Callable[..., Any]) -> optuna.storages.RDBStorage:
    """The run's storage, retrying calls while it does not answer (``--storage-retry``)."""
    return make_storage(
        plan.storage_url, retry_s=plan.storage_retry_s, on_retry=lambda m: log(f"\n{m}")
    )


class RunSession:
    """This driver's session on the study (a context manager; see the module docstring).

    Args:
        plan: The run's plan.
        storage: The open storage (:func:`open_storage`).
        signals: The pair signals (:func:`search.execution.study_signals`).
        guard: The run's signal guard (defers Ctrl-C while trials are written).
        log: Prints a progress line.

    Attributes:
        study: The rung-0 study.
        rung1: The rung-1 study, or None when the study does not fine-tune.
        family: The family study, or None when the study trains no family.
        state: What this driver has done so far.
        others: Other live drivers of the study when the session opened.
        sampler: The sampler every search round shares.
        interrupted: The signal that stopped the search (``"SIGINT"``), or None.
    """

    def __init__(
        self,
        plan: Plan,
        storage: optuna.storages.BaseStorage,
        signals: PairSignals,
        *,
        guard: SignalGuard,
        log: Callable[..., Any],
    ) -> None:
        self.plan = plan
        self.storage = storage
        self.signals = signals
        self.guard = guard
        self.log = log
        self.space = plan.space
        self.state = RunState()
        self.study: optuna.Study
        self.rung1: optuna.Study | None = None
        self.family: optuna.Study | None = None
        self.others: set[str] = set()
        self.sampler: optuna.samplers.BaseSampler
        self.interrupted: str | None = None
        self._beats = contextlib.ExitStack()

    def __enter__(self) -> RunSession:
        plan = self.plan
        self.study, created = open_study(self.storage, plan.study, plan.driver_id)
        if plan.study.finetune.enabled:
            name = rung1_study_name(plan.study.name)
            self.rung1, _ = open_study(self.storage, plan.study, plan.driver_id, name=name)
        if plan.study.family.enabled:
            name = family_study_name(plan.study.name)
            self.family, _ = open_study(self.storage, plan.study, plan.driver_id, name=name)
        for study in self.studies():
            beat = Heartbeat(study, plan.driver_id, log=lambda m: self.log(f"\n{m}"))
            self._beats.enter_context(beat)
        try:
            self._set_up(created)
        except BaseException:
            self._beats.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._beats.close()

    def studies(self) -> list[optuna.Study]:
        """The rung-0 study, and the rung-1 and family studies when there are."""
        return [s for s in (self.study, self.rung1, self.family) if s is not None]

    def _set_up(self, created: bool) -> None:
        plan, log = self.plan, self.log
        self.state.pruned_recorded = setup_study(
            self.study,
            self.space,
            self.signals.cka,
            plan.study.pruning_rule,
            created=created,
            log=log,
            critical=self.guard.critical,
            signals=self.signals.pruning,
        )
        self.others = live_drivers(self.study) - {plan.driver_id}
        self.sampler = make_sampler(
            plan.study.sampler, driver_seed(plan, self.others), len(plan.study.objectives)
        )
        if self.others and plan.storage_url.startswith("sqlite"):
            log(
                f"note: {len(self.others)} other driver(s) share this SQLite study: SQLite "
                "writes one at a time (a busy file is waited for), so for drivers on "
                "several machines or many at once use --storage postgresql+psycopg://..."
            )
        stale = [n for study in self.studies() for n in fail_stale_trials(study)]
        if stale:
            log(f"failed {len(stale)} trial(s) left RUNNING by a stopped driver: {stale}")
        log(self._summary_line())
        if plan.study.label_free:
            log(
                f"label-free: {plan.data.name} has no labels; the search maximises "
                f"{plan.measure} (top-1 agreement on {plan.data.validation.num_images} "
                "validation images) and rung 1 distils from it"
            )

    def _summary_line(self) -> str:
        plan, space = self.plan, self.space
        at = ""
        if space.resolutions is not None:
            at = ", at " + "/".join(str(r) for r in space.resolutions) + " px"
        cuts = ", stage boundaries only" if plan.study.cuts == "stages" else ""
        return (
            f"study {plan.study.name!r}: {len(space)} candidates "
            f"({len(space.pairs())} ordered pairs, {len(plan.anchors)} anchors{at}{cuts}), "
            f"{len(evaluated_trials(self.study))}/{plan.trials} evaluated, "
            f"{self.state.pruned_recorded} pruned points recorded, {len(self.others)} other "
            f"driver(s) running, storage {masked_url(plan.storage_url)}"
        )

    def search(self) -> None:
        """Rung 0 until the study holds its total, then rung 1 and the family (when enabled).

        An interrupt (Ctrl-C, SIGTERM) stops the search: Ray is shut down, this driver's
        RUNNING trials are failed, and the signal is kept in :attr:`interrupted`.
        """
        plan, state, guard, log = self.plan, self.state, self.guard, self.log
        try:
            run_search(
                plan,
                self.study,
                self.space,
                self.signals.cka,
                state=state,
                sampler=self.sampler,
                guard=guard,
                log=log,
                signals=self.signals.pruning,
            )
            if self.rung1 is not None:
                run_rung1(
                    plan, self.study, self.rung1, self.space, state=state, guard=guard, log=log
                )
            if self.family is not None:
                run_family(
                    plan,
                    self.study,
                    self.rung1,
                    self.family,
                    self.space,
                    state=state,
                    guard=guard,
                    log=log,
                )
        except KeyboardInterrupt as e:
            self.interrupted = guard.name(e)
        finally:
            with guard.ignored():
                shutdown_ray(plan, state)
                if self.interrupted:
                    state.interrupted_trials = [
                        n
                        for study in self.studies()
                        for n in fail_own_trials(study, plan.driver_id, self.interrupted)
                    ]

    @property
    def complete(self) -> bool:
        """Whether the study holds what was asked at every rung it has."""
        state = self.state
        return (
            state.complete
            and (self.rung1 is None or state.rung1_complete)
            and (self.family is None or state.family_complete)
        )
