"""A Ray Tune searcher backed by an Optuna multi-objective study (ask and tell).

Only the driver talks to the study. For each Ray trial the searcher asks the study for a
parameter vector, decodes it to a candidate and then:

- answers a configuration evaluated before (the sampler repeating itself) from the stored
  result, without evaluating it again;
- records a candidate below the CKA rule as PRUNED, with its CKA and the reason, without
  dispatching it;
- otherwise dispatches it to a Ray worker.

On completion it stores the metrics as user attributes, sets the budget constraint
(``trial.set_constraint``; value <= 0 means the candidate fits at least one device, and
``feasible`` / ``fits_devices`` user attributes keep this visible in optuna-dashboard, which
does not read Optuna 5 constraints) and tells the objective values.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search.budgets import DeviceBudget, constraint_value, fitting_devices
from search.sampler import FilteredSampler
from search.space import Candidate, PruningRule, SearchSpace

#: Metric reported by workers -> Optuna objective name.
OBJECTIVE_METRIC = {
    "accuracy": "val_acc",
    "macs": "macs",
    "params": "params",
    "latency_ms": "latency_ms",
}

HEARTBEAT_KEY = "heartbeat:"
STALE_AFTER_S = 60.0


def evaluated_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials that evaluated a candidate (repeats answered from storage excluded)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "duplicate_of" not in t.user_attrs
    ]


def budget_metrics(values: Mapping[str, Any]) -> dict[str, float | None]:
    """The metrics budgets are checked against, from a result or user attributes."""
    return {k: values.get(k) for k in ("macs", "params", "latency_ms", "memory_mb")}


def fail_stale_trials(study: optuna.Study, *, now: float | None = None) -> list[int]:
    """Marks RUNNING trials whose driver stopped heart-beating as FAIL.

    A driver writes ``heartbeat:<driver id>`` into the study's user attributes every few
    seconds; trials left RUNNING by a driver that has not done so for
    :data:`STALE_AFTER_S` (killed, crashed) are failed with a reason.

    Returns:
        The numbers of the trials marked failed.
    """
    now = time.time() if now is None else now
    beats = {
        k.removeprefix(HEARTBEAT_KEY): v
        for k, v in study.user_attrs.items()
        if k.startswith(HEARTBEAT_KEY)
    }
    storage = study._storage
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = beats.get(t.user_attrs.get("driver", ""))
        if beat is not None and now - float(beat) < STALE_AFTER_S:
            continue
        storage.set_trial_user_attr(
            t._trial_id, "fail_reason", "left RUNNING by a driver that stopped (killed or crashed)"
        )
        try:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except RuntimeError:  # finished meanwhile by its (live) driver
            continue
        failed.append(t.number)
    return failed


class Heartbeat:
    """Writes this driver's heartbeat into the study every ``interval`` seconds."""

    def __init__(self, study: optuna.Study, driver_id: str, interval: float = 10.0) -> None:
        self.study = study
        self.key = HEARTBEAT_KEY + driver_id
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            # The storage being briefly unavailable must not kill the run.
            with contextlib.suppress(Exception):
                self.study.set_user_attr(self.key, time.time())
            self._stop.wait(self.interval)

    def __enter__(self) -> Heartbeat:
        self.study.set_user_attr(self.key, time.time())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self.study.set_user_attr(self.key, 0.0)  # stopped: its RUNNING trials are stale


class StitchSearcher(Searcher):
    """Ray Tune searcher that asks and tells an Optuna study.

    Args:
        study: The study (its storage is only written by this driver process).
        space: The search space.
        objectives: Objective names in study order.
        budgets: The device budgets.
        cka: CKA matrix per ordered pair ``(front, back)``, indexed by cuts.
        rule: The CKA pruning rule.
        total: How many candidate evaluations the study should hold (all drivers together).
        driver_id: Written into each trial's user attributes.
        seed: Seed for the fallback choice of unexplored candidates.
        on_event: Called with ``(kind, trial)`` after every tell (progress display).
        max_failures: Stop after this many failed evaluations in this run.
    """

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        *,
        objectives: Sequence[str],
        budgets: Sequence[DeviceBudget],
        cka: Mapping[tuple[str, str], np.ndarray],
        rule: PruningRule,
        total: int,
        driver_id: str,
        seed: int = 0,
        on_event: Callable[[str, optuna.trial.FrozenTrial], None] | None = None,
        max_failures: int | None = None,
    ) -> None:
        super().__init__(metric=None, mode=None)
        self.study = study
        self.space = space
        self.objectives = list(objectives)
        self.budgets = list(budgets)
        self.cka = cka
        self.rule = rule
        self.total = total
        self.driver_id = driver_id
        self.on_event = on_event
        self.max_failures = max_failures if max_failures is not None else max(10, total)
        self._rng = random.Random(seed)
        self._live: dict[str, tuple[optuna.Trial, Candidate]] = {}
        self._done: dict[str, int] = {}
        for t in evaluated_trials(study):
            key = t.user_attrs.get("key")
            if key:
                self._done.setdefault(key, t.number)
        self._pruned: set[str] = set()
        self._foreign: set[str] = set()
        self._candidates = space.all_candidates()
        self.completed = 0
        self.failed = 0
        self.pruned = 0
        self.repeats = 0
        study.sampler = FilteredSampler(study.sampler, space, self.accept, self.fallback)

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles the searcher with the experiment state; the progress callback
        # holds the terminal stream and stays behind.
        state = self.__dict__.copy()
        state["on_event"] = None
        return state

    # ------------------------------------------------------------- helpers
    def _cka_of(self, c: Candidate) -> float | None:
        if c.is_anchor:
            return None
        m = self.cka.get((c.front, c.back))
        return None if m is None else float(m[c.front_block, c.back_block])

    def _annotate(self, trial: optuna.Trial, c: Candidate) -> None:
        trial.set_user_attr("key", c.key)
        trial.set_user_attr("label", c.label)
        trial.set_user_attr("kind", "anchor" if c.is_anchor else "stitch")
        trial.set_user_attr("config", c.to_dict())
        trial.set_user_attr("driver", self.driver_id)
        cka = self._cka_of(c)
        if cka is not None:
            trial.set_user_attr("cka", round(cka, 6))

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        storage = self.study._storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(self.study._study_id, number)
        return storage.get_trial(trial_id)

    def _emit(self, kind: str, number: int) -> None:
        if self.on_event is not None:
            self.on_event(kind, self._frozen(number))

    def _repeat(self, trial: optuna.Trial, c: Candidate) -> None:
        source = self._frozen(self._done[c.key])
        for k, v in source.user_attrs.items():
            if k not in ("driver", "duplicate_of"):
                trial.set_user_attr(k, v)
        trial.set_user_attr("duplicate_of", source.number)
        trial.set_user_attr("driver", self.driver_id)
        for name, value in source.constraints.items():
            trial.set_constraint(name, value)
        self.study.tell(trial, source.values)
        self.repeats += 1
        self._emit("repeat", trial.number)

    def _prune(self, trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr("pruned_reason", reason)
        self.study.tell(trial, state=TrialState.PRUNED)
        self.pruned += 1
        self._emit("pruned", trial.number)

    def _sync(self) -> tuple[int, int]:
        """Reads what every driver of the study has finished or is running.

        Returns:
            ``(evaluated, running)``: evaluated candidates in the study, trials running now.
        """
        trials = self.study._storage.get_all_trials(
            self.study._study_id,
            deepcopy=False,
            states=(TrialState.COMPLETE, TrialState.RUNNING),
        )
        evaluated = running = 0
        self._foreign = set()
        for t in trials:
            key = t.user_attrs.get("key")
            if t.state == TrialState.COMPLETE:
                if "duplicate_of" not in t.user_attrs:
                    evaluated += 1
                if key:
                    self._done.setdefault(key, t.number)
            else:
                running += 1
                if key and t.user_attrs.get("driver") != self.driver_id:
                    self._foreign.add(key)
        return evaluated, running

    def _unexplored(self) -> list[Candidate]:
        live = {c.key for _, c in self._live.values()}
        skip = self._done.keys() | self._pruned | live | self._foreign
        return [c for c in self._candidates if c.key not in skip]

    def accept(self, c: Candidate) -> bool:
        """Whether a sampled candidate is worth evaluating (not pruned, not explored)."""
        if c.key in self._done or c.key in self._pruned or c.key in self._foreign:
            return False
        return c.key not in {x.key for _, x in self._live.values()}

    def fallback(self) -> Candidate | None:
        """An unexplored, unpruned candidate chosen at random (``None`` when none is left)."""
        options = self._unexplored()
        return self._rng.choice(options) if options else None

    def record_pruned(self) -> int:
        """Records every candidate the CKA rule prunes as a PRUNED trial, once per study.

        Returns:
            How many were newly recorded.
        """
        if not self.cka or not self.rule.active:
            return 0
        recorded = {
            t.user_attrs.get("key")
            for t in self.study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        }
        dists = self.space.distributions()
        new = []
        for c in self.space.all_candidates():
            if c.is_anchor or (c.front, c.back) not in self.cka:
                continue
            reason = self.rule.reason(c, self.cka[(c.front, c.back)])
            if reason is None:
                continue
            self._pruned.add(c.key)
            if c.key in recorded:
                continue
            new.append(
                optuna.trial.create_trial(
                    state=TrialState.PRUNED,
                    params=self.space.encode(c),
                    distributions=dists,
                    user_attrs={
                        "key": c.key,
                        "label": c.label,
                        "kind": "stitch",
                        "config": c.to_dict(),
                        "cka": round(self._cka_of(c), 6),
                        "pruned_reason": reason,
                    },
                )
            )
        if new:
            self.study.add_trials(new)
        self.pruned += len(new)
        return len(new)

    # ------------------------------------------------------------- Searcher API
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """Asks the study for the next candidate to evaluate."""
        evaluated, running = self._sync()
        if evaluated + running >= self.total or self.failed >= self.max_failures:
            return None if self._live else Searcher.FINISHED
        if not self._unexplored():  # the whole (unpruned) space has been evaluated
            return None if self._live else Searcher.FINISHED
        dists = self.space.distributions()
        for _ in range(3):
            trial = self.study.ask(dists)
            c = self.space.decode(trial.params)
            self._annotate(trial, c)
            if self.accept(c):
                return self._dispatch(trial_id, trial, c)
            # Only enqueued (fixed) parameters can get here: the sampler filters the rest.
            if c.key in self._done:
                self._repeat(trial, c)
            else:
                self._prune(trial, "repeat of a pruned or running configuration")
        return None

    def _dispatch(self, trial_id: str, trial: optuna.Trial, c: Candidate) -> dict[str, Any]:
        self._live[trial_id] = (trial, c)
        return {
            "number": trial.number,
            "candidate": json.dumps(c.to_dict()),
            "cka": self._cka_of(c),
        }

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Stores a finished evaluation in the study."""
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        trial, c = entry
        reason = None
        if error or result is None:
            reason = "the worker failed or was lost (see the Ray logs); retries exhausted"
        elif result.get("error"):
            reason = str(result["error"])
        else:
            values = []
            for o in self.objectives:
                v = result.get(OBJECTIVE_METRIC[o])
                if v is None or not math.isfinite(float(v)):
                    reason = f"objective {o} is {v!r}"
                    break
                values.append(float(v))
        if reason is not None:
            trial.set_user_attr("fail_reason", reason[:2000])
            self.study.tell(trial, state=TrialState.FAIL)
            self.failed += 1
            self._emit("failed", trial.number)
            return
        for k, v in result.items():
            if k in _RESULT_ATTRS and v is not None:
                trial.set_user_attr(k, v)
        metrics = budget_metrics(result)
        devices = fitting_devices(self.budgets, metrics)
        trial.set_user_attr("fits_devices", devices)
        trial.set_user_attr("feasible", bool(devices))
        if self.budgets:
            trial.set_constraint("budgets", float(constraint_value(self.budgets, metrics)))
        self.study.tell(trial, values)
        self._done[c.key] = trial.number
        self.completed += 1
        self._emit("complete", trial.number)


_RESULT_ATTRS = {
    "val_acc",
    "val_top5",
    "macs",
    "params",
    "stitch_params",
    "latency_ms",
    "latency_spread_ms",
    "memory_mb",
    "cka",
    "fit_residual",
    "fit_seconds",
    "eval_seconds",
    "trial_seconds",
    "host",
}
