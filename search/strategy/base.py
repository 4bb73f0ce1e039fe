"""The lifecycle both rungs' Ray Tune searchers share.

A searcher here is a thin Ray Tune adapter over an Optuna study: Ray Tune asks it for a
trial (:meth:`StudySearcher.suggest`) and tells it the result
(:meth:`StudySearcher.on_trial_complete`). Both calls run inside the driver's critical
section (Ctrl-C waits until the trial is written) and stop the Tune run when the storage is
lost (:func:`stops_on_storage_loss`); subclasses say only what to ask and how to record.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial
from ray.tune import Callback
from ray.tune.search import Searcher

from search.store import StorageUnavailable, optuna_access
from search.strategy.recorder import Recorder

#: Why a trial failed when its Ray worker gave no reason.
WORKER_LOST = "the Ray worker process died or was lost"


def stops_on_storage_loss(on_loss: Any = None) -> Callable[[Callable], Callable]:
    """Decorates a Ray Tune searcher method so a lost storage ends the Tune run.

    Ray Tune swallows exceptions raised by a searcher. The first
    :class:`~search.store.StorageUnavailable` is kept in the searcher's ``storage_lost``
    (the driver stops Tune and raises it after ``fit``); from then on the method returns
    ``on_loss`` without touching the storage (a result not stored then leaves its trial
    RUNNING, and the rerun fails it and evaluates the candidate again).
    """

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(self, "storage_lost", None) is not None:
                return on_loss
            try:
                return method(self, *args, **kwargs)
            except StorageUnavailable as e:
                self.storage_lost = e
                return on_loss

        return call

    return decorate


class StudySearcher(Searcher):
    """A Ray Tune searcher that asks and tells one Optuna study.

    Counters for this run (the driver and its progress display read them): ``completed``
    and ``failed``.

    Args:
        study: The study its trials go into.
        recorder: Writes the trials' outcomes into ``study``.
        max_retries: Retries of a trial whose worker died (for the failure reason).
        on_event: Called with ``(kind, trial)`` after every tell (progress display).
        guard: Context manager factory wrapped around each ask/tell sequence (the driver
            defers Ctrl-C there, so that no trial is left half-written).
    """

    def __init__(
        self,
        study: optuna.Study,
        recorder: Recorder,
        *,
        max_retries: int = 0,
        on_event: Callable[[str, FrozenTrial], None] | None = None,
        guard: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        super().__init__(metric=None, mode=None)
        self.study = study
        self.recorder = recorder
        self.max_retries = max_retries
        self.on_event = on_event
        self.guard = guard
        self.storage_lost: StorageUnavailable | None = None
        self.completed = 0
        self.failed = 0
        self._worker_errors: dict[str, str] = {}
        self._retries: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles the searcher with the experiment state; the progress callback
        # holds the terminal stream and stays behind.
        state = self.__dict__.copy()
        state["on_event"] = None
        state["guard"] = None
        return state

    # ------------------------------------------------------------- Searcher API
    @stops_on_storage_loss(Searcher.FINISHED)
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next trial's configuration, ``None`` (wait) or ``FINISHED``."""
        with (self.guard or contextlib.nullcontext)():
            return self._suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keeps what a worker reported before it failed (the reason, for the trial)."""
        if result.get("worker_error"):
            self._worker_errors[trial_id] = str(result["worker_error"])

    @stops_on_storage_loss()
    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Stores a finished evaluation in the study."""
        with (self.guard or contextlib.nullcontext)():
            self._complete(trial_id, result, error)

    def note_retry(self, trial_id: str) -> None:
        """Counts a retry of a trial whose worker died (called by :class:`RetryCounter`)."""
        self._retries[trial_id] = self._retries.get(trial_id, 0) + 1

    # ------------------------------------------------------------- subclasses
    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        raise NotImplementedError

    def _complete(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------- shared steps
    def _idle(self, running: bool) -> str | None:
        """Nothing to start now: wait for running trials, or finish when there are none."""
        return None if running else Searcher.FINISHED

    def _worker_failure(self, trial_id: str) -> str:
        """Why a trial whose worker failed did not finish (after its retries)."""
        attempts = self._retries.get(trial_id, 0) + 1
        cause = self._worker_errors.get(trial_id, WORKER_LOST)
        return (
            f"{cause}; {attempts} attempt(s), no retries left "
            f"(max_retries={self.max_retries}; see the Ray logs)"
        )

    def _fail(self, trial: optuna.Trial, reason: str, result: Mapping[str, Any] | None) -> None:
        if self.recorder.fail(trial, reason, result):
            self.failed += 1
            self._emit("failed", trial.number)

    def _tell(self, trial: optuna.Trial, result: Mapping[str, Any], values: list[float]) -> bool:
        """Completes ``trial``; whether it was this driver's to complete."""
        if not self.recorder.complete(trial, result, values):
            return False
        self.completed += 1
        self._emit("complete", trial.number)
        return True

    def _emit(self, kind: str, number: int) -> None:
        if self.on_event is not None:
            self.on_event(kind, optuna_access.trial_by_number(self.study, number))


class RetryCounter(Callback):
    """Ray Tune callback that tells the searcher about retried trials (worker died)."""

    def __init__(self, searcher: StudySearcher) -> None:
        self.searcher = searcher

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.searcher.note_retry(trial.trial_id)
