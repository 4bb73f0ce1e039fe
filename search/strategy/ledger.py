"""Which configurations one driver's searcher may still propose.

Several parameter vectors decode to one configuration, other drivers may share the study,
and CKA prunes part of the space; the searcher evaluates each configuration once. The
:class:`Ledger` keeps, as this driver last read the study, which configurations are

- **done**: evaluated by some driver (key -> number of the trial that evaluated it);
- **running here**: dispatched by this searcher to a Ray worker, not yet told;
- **running elsewhere**: RUNNING trials of other drivers;
- **pruned**: by the CKA rule.

The proposal filter (:class:`search.strategy.FilteredSampler`) asks it what to accept and
what to fall back to; the searcher asks it what is left (:meth:`Ledger.unexplored`).
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterable, Sequence

import optuna
from optuna.trial import TrialState

from search.core import Attr, evaluated_trials, is_repeat
from search.store import STORAGE_ERRORS, fail_stale_trials, optuna_access
from space import Candidate


class Ledger:
    """Which configurations are done, running here, running elsewhere, or pruned.

    Args:
        study: The study (other drivers may share it).
        candidates: Every candidate of the search space, in a fixed order.
        pruned: Keys of the candidates the CKA rule prunes.
        driver_id: This driver (its RUNNING trials are not "elsewhere").
        seed: Seed for the fallback choice of unexplored candidates.
        stale_check_s: Seconds between two sweeps for trials of drivers that died.
    """

    def __init__(
        self,
        study: optuna.Study,
        candidates: Sequence[Candidate],
        *,
        pruned: Iterable[str],
        driver_id: str,
        seed: int,
        stale_check_s: float,
    ) -> None:
        self.study = study
        self.candidates = list(candidates)
        self.driver_id = driver_id
        self.stale_check_s = stale_check_s
        self.done: dict[str, int] = {}
        for t in evaluated_trials(study):
            key = t.user_attrs.get(Attr.KEY)
            if key:
                self.done.setdefault(key, t.number)
        self.pruned: set[str] = set(pruned)
        self.elsewhere: set[str] = set()
        self._here: dict[str, tuple[optuna.Trial, Candidate]] = {}
        self._rng = random.Random(seed)
        self._last_stale_check = time.monotonic()

    # ------------------------------------------------------------- running here
    def dispatch(self, trial_id: str, trial: optuna.Trial, c: Candidate) -> None:
        """Notes that Ray trial ``trial_id`` evaluates ``c`` as Optuna ``trial``."""
        self._here[trial_id] = (trial, c)

    def release(self, trial_id: str) -> tuple[optuna.Trial, Candidate] | None:
        """Forgets a dispatched trial; returns it (``None`` if it was not running here)."""
        return self._here.pop(trial_id, None)

    def running_here(self) -> list[str]:
        """Ray trial ids dispatched here and not yet released, in dispatch order."""
        return list(self._here)

    def _here_keys(self) -> set[str]:
        return {c.key for _, c in self._here.values()}

    # ------------------------------------------------------------- the study
    def sync(self) -> tuple[int, int]:
        """Reads what every driver of the study has finished or is running.

        Every ``stale_check_s`` seconds it first fails the trials of drivers that died, whose
        configurations would otherwise stay "running elsewhere" for good.

        Returns:
            ``(evaluated, running)``: evaluated candidates in the study, trials running now.
        """
        if time.monotonic() - self._last_stale_check > self.stale_check_s:
            self._last_stale_check = time.monotonic()
            # A storage hiccup must not stop the run (the next sweep tries again); any other
            # error is a bug and propagates.
            with contextlib.suppress(*STORAGE_ERRORS):
                fail_stale_trials(self.study)
        trials = optuna_access.trials(self.study, (TrialState.COMPLETE, TrialState.RUNNING))
        evaluated = running = 0
        self.elsewhere = set()
        for t in trials:
            key = t.user_attrs.get(Attr.KEY)
            if t.state == TrialState.COMPLETE:
                if not is_repeat(t):
                    evaluated += 1
                if key:
                    self.done.setdefault(key, t.number)
            else:
                running += 1
                if key and t.user_attrs.get(Attr.DRIVER) != self.driver_id:
                    self.elsewhere.add(key)
        return evaluated, running

    def mark_done(self, key: str, number: int) -> None:
        """Notes that trial ``number`` evaluated the configuration ``key``."""
        self.done[key] = number

    def mark_elsewhere(self, key: str) -> None:
        """Notes that another driver evaluates the configuration ``key`` now."""
        self.elsewhere.add(key)

    def mark_pruned(self, keys: Iterable[str]) -> None:
        """Notes configurations the CKA rule prunes."""
        self.pruned.update(keys)

    # ------------------------------------------------------------- proposals
    def accept(self, c: Candidate) -> bool:
        """Whether a sampled candidate is worth evaluating (not pruned, not explored)."""
        if c.key in self.done or c.key in self.pruned or c.key in self.elsewhere:
            return False
        return c.key not in self._here_keys()

    def unexplored(self) -> list[Candidate]:
        """The candidates neither done, running (here or elsewhere) nor pruned."""
        skip = self.done.keys() | self.pruned | self._here_keys() | self.elsewhere
        return [c for c in self.candidates if c.key not in skip]

    def fallback(self) -> Candidate | None:
        """An unexplored, unpruned candidate chosen at random (``None`` when none is left)."""
        options = self.unexplored()
        return self._rng.choice(options) if options else None

    def exhausted(self) -> bool:
        """Whether every unpruned candidate has been evaluated or is being evaluated."""
        self.sync()
        return not self.unexplored()
