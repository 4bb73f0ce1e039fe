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

Several drivers may share one study (PostgreSQL storage). Each writes a heartbeat naming its
host and process into the study, so that trials left RUNNING by a driver that died are
marked failed (:func:`fail_stale_trials`), and claims each trial after asking for it: a trial
that would exceed the requested total, or repeat a configuration another driver is already
evaluating, is recorded as PRUNED with the reason instead of being dispatched.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search import Searcher

from search import optuna_access
from search.budgets import DeviceBudget, constraint_value, fitting_devices
from search.liveness import fail_stale_trials
from search.sampler import FilteredSampler
from search.space import PruningRule, SearchSpace
from search.trials import OBJECTIVES, RESULT_ATTRS, budget_metrics, evaluated_trials
from space import Candidate


def _guarded(study: optuna.Study, trial: optuna.Trial, write: Callable[[], Any]) -> bool:
    """Runs ``write`` (attributes, tell); False if the trial was finished by someone else."""
    try:
        write()
    except (RuntimeError, ValueError):
        if optuna_access.is_finished(study, trial):  # another driver took this one for dead
            return False
        raise
    return True


def pruned_reasons(
    space: SearchSpace, cka: Mapping[tuple[str, str], np.ndarray], rule: PruningRule
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


def record_pruned_trials(
    study: optuna.Study,
    space: SearchSpace,
    cka: Mapping[tuple[str, str], np.ndarray],
    rule: PruningRule,
) -> int:
    """Records every candidate the CKA rule prunes as a PRUNED trial, once per study.

    Returns:
        How many were newly recorded.
    """
    reasons = pruned_reasons(space, cka, rule)
    if not reasons:
        return 0
    recorded = {
        t.user_attrs.get("key")
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    }
    dists = space.distributions()
    new = [
        optuna.trial.create_trial(
            state=TrialState.PRUNED,
            params=space.encode(c),
            distributions=dists,
            user_attrs={
                "key": c.key,
                "label": c.label,
                "kind": "stitch",
                "config": c.to_dict(),
                "cka": round(float(cka[(c.front, c.back)][c.front_block, c.back_block]), 6),
                "pruned_reason": reason,
            },
        )
        for key, (c, reason) in reasons.items()
        if key not in recorded
    ]
    if new:
        study.add_trials(new)
    return len(new)


class RetryCounter(Callback):
    """Ray Tune callback that tells the searcher about retried trials (worker died)."""

    def __init__(self, searcher: StitchSearcher) -> None:
        self.searcher = searcher

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.searcher.note_retry(trial.trial_id)


class StitchSearcher(Searcher):
    """Ray Tune searcher that asks and tells an Optuna study.

    Args:
        study: The study (other drivers may share it).
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
        max_retries: Retries of a trial whose worker died (for the failure reason).
        stale_check_s: Seconds between two sweeps for trials of dead drivers.
        guard: Context manager factory wrapped around each ask/tell sequence (the driver
            defers Ctrl-C there, so that no trial is left half-written).
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
        max_retries: int = 0,
        stale_check_s: float = 15.0,
        guard: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
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
        self.max_retries = max_retries
        self.stale_check_s = stale_check_s
        self.guard = guard
        self._rng = random.Random(seed)
        self._live: dict[str, tuple[optuna.Trial, Candidate]] = {}
        self._done: dict[str, int] = {}
        for t in evaluated_trials(study):
            key = t.user_attrs.get("key")
            if key:
                self._done.setdefault(key, t.number)
        self._pruned: set[str] = set(self.pruned_reasons())
        self._foreign: set[str] = set()
        self._candidates = space.all_candidates()
        self._worker_errors: dict[str, str] = {}
        self._retries: dict[str, int] = {}
        self._last_stale_check = time.monotonic()
        self.completed = 0
        self.failed = 0
        self.pruned = 0
        self.repeats = 0
        self.surplus = 0
        inner = study.sampler.inner if isinstance(study.sampler, FilteredSampler) else study.sampler
        study.sampler = FilteredSampler(inner, space, self.accept, self.fallback)

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles the searcher with the experiment state; the progress callback
        # holds the terminal stream and stays behind.
        state = self.__dict__.copy()
        state["on_event"] = None
        state["guard"] = None
        return state

    # ------------------------------------------------------------- helpers
    def _cka_of(self, c: Candidate) -> float | None:
        if c.is_anchor:
            return None
        m = self.cka.get((c.front, c.back))
        return None if m is None else float(m[c.front_block, c.back_block])

    def _annotate(self, trial: optuna.Trial, c: Candidate) -> None:
        trial.set_user_attr("driver", self.driver_id)
        trial.set_user_attr("key", c.key)
        trial.set_user_attr("label", c.label)
        trial.set_user_attr("kind", "anchor" if c.is_anchor else "stitch")
        trial.set_user_attr("config", c.to_dict())
        cka = self._cka_of(c)
        if cka is not None:
            trial.set_user_attr("cka", round(cka, 6))

    def _frozen(self, number: int) -> optuna.trial.FrozenTrial:
        return optuna_access.trial_by_number(self.study, number)

    def _emit(self, kind: str, number: int) -> None:
        if self.on_event is not None:
            self.on_event(kind, self._frozen(number))

    def _repeat(self, trial: optuna.Trial, c: Candidate, number: int | None = None) -> None:
        source = self._frozen(self._done[c.key] if number is None else number)
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

        Every ``stale_check_s`` seconds it first fails the trials of drivers that died.

        Returns:
            ``(evaluated, running)``: evaluated candidates in the study, trials running now.
        """
        if time.monotonic() - self._last_stale_check > self.stale_check_s:
            self._last_stale_check = time.monotonic()
            with contextlib.suppress(Exception):  # a storage hiccup must not stop the run
                fail_stale_trials(self.study)
        trials = optuna_access.trials(self.study, (TrialState.COMPLETE, TrialState.RUNNING))
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

    def _claim(self, trial: optuna.Trial, c: Candidate) -> tuple[str, int | None]:
        """Decides, against every driver's trials, whether this driver may evaluate ``c``.

        Trials are ordered by their storage id: of two trials asked at the same time for the
        same configuration, or for the last free slot of the total, the earlier one wins.
        A RUNNING trial asked just before this one whose configuration is not recorded yet
        is waited for (briefly).

        Returns:
            ``("ok", None)``, ``("done", number)`` (evaluated before: answer from storage),
            ``("running", None)`` (another trial evaluates it now) or ``("surplus", None)``
            (the study holds the requested total already).
        """
        mine = optuna_access.storage_id(trial)
        deadline = time.monotonic() + 2.0
        recent = time.time() - 10.0  # older keyless trials belong to drivers that died
        while True:
            trials = optuna_access.trials(self.study, (TrialState.COMPLETE, TrialState.RUNNING))
            evaluated = ahead = 0
            done: int | None = None
            running = unknown = False
            for t in trials:
                if optuna_access.storage_id(t) == mine:
                    continue
                key = t.user_attrs.get("key")
                if t.state == TrialState.COMPLETE:
                    if "duplicate_of" not in t.user_attrs:
                        evaluated += 1
                        if key == c.key:
                            done = t.number
                elif optuna_access.storage_id(t) < mine:
                    ahead += 1
                    running = running or key == c.key
                    started = t.datetime_start.timestamp() if t.datetime_start else 0.0
                    unknown = unknown or (key is None and started > recent)
            if not unknown or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if done is not None:
            return "done", done
        if running:
            return "running", None
        if evaluated + ahead >= self.total:
            return "surplus", None
        return "ok", None

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

    def exhausted(self) -> bool:
        """Whether every unpruned candidate has been evaluated or is being evaluated."""
        self._sync()
        return not self._unexplored()

    def pruned_reasons(self) -> dict[str, tuple[Candidate, str]]:
        """Candidate key -> (candidate, reason) for every candidate the CKA rule prunes."""
        return pruned_reasons(self.space, self.cka, self.rule)

    def record_pruned(self) -> int:
        """Records every candidate the CKA rule prunes as a PRUNED trial, once per study.

        Returns:
            How many were newly recorded.
        """
        self._pruned |= set(self.pruned_reasons())
        new = record_pruned_trials(self.study, self.space, self.cka, self.rule)
        self.pruned += new
        return new

    # ------------------------------------------------------------- Searcher API
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """Asks the study for the next candidate to evaluate."""
        with (self.guard or contextlib.nullcontext)():
            return self._suggest(trial_id)

    def _suggest(self, trial_id: str) -> dict[str, Any] | str | None:
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
            if not self.accept(c):
                # Only enqueued (fixed) parameters can get here: the sampler filters the rest.
                if c.key in self._done:
                    self._repeat(trial, c)
                else:
                    self._prune(trial, "repeat of a pruned or running configuration")
                continue
            verdict, number = self._claim(trial, c)
            if verdict == "ok":
                return self._dispatch(trial_id, trial, c)
            if verdict == "done":
                self._done[c.key] = number
                self._repeat(trial, c, number)
            elif verdict == "running":
                self._foreign.add(c.key)
                self._prune(trial, "repeat of a configuration another driver is evaluating")
            else:
                self.surplus += 1
                self._prune(
                    trial,
                    f"surplus: the study holds its {self.total} trials already "
                    "(another driver took the last one)",
                )
                return None if self._live else Searcher.FINISHED
        return None

    def _dispatch(self, trial_id: str, trial: optuna.Trial, c: Candidate) -> dict[str, Any]:
        self._live[trial_id] = (trial, c)
        return {
            "number": trial.number,
            "candidate": c.to_json(),
            "cka": self._cka_of(c),
        }

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keeps what a worker reported before it failed (the reason, for the trial)."""
        if result.get("worker_error"):
            self._worker_errors[trial_id] = str(result["worker_error"])

    def note_retry(self, trial_id: str) -> None:
        """Counts a retry of a trial whose worker died (called by a Tune callback)."""
        self._retries[trial_id] = self._retries.get(trial_id, 0) + 1

    def _worker_failure(self, trial_id: str) -> str:
        attempts = self._retries.get(trial_id, 0) + 1
        cause = self._worker_errors.get(trial_id, "the Ray worker process died or was lost")
        return (
            f"{cause}; {attempts} attempt(s), no retries left "
            f"(max_retries={self.max_retries}; see the Ray logs)"
        )

    def _fail(self, trial: optuna.Trial, reason: str, result: Mapping[str, Any] | None) -> None:
        def write() -> None:
            trial.set_user_attr("fail_reason", reason[:2000])
            for k in ("host", "eval_pid", "trial_seconds"):
                if result and result.get(k) is not None:
                    trial.set_user_attr(k, result[k])
            self.study.tell(trial, state=TrialState.FAIL)

        if _guarded(self.study, trial, write):
            self.failed += 1
            self._emit("failed", trial.number)

    def fail_live(self, reason: str) -> list[int]:
        """Fails every trial this searcher has dispatched and not yet told (interrupted).

        Returns:
            Their numbers.
        """
        numbers = []
        for trial_id in list(self._live):
            trial, _ = self._live.pop(trial_id)
            self._fail(trial, reason, None)
            numbers.append(trial.number)
        return numbers

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        """Stores a finished evaluation in the study."""
        with (self.guard or contextlib.nullcontext)():
            self._complete(trial_id, result, error)

    def _complete(self, trial_id: str, result: dict[str, Any] | None, error: bool) -> None:
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        trial, c = entry
        reason = None
        if error or result is None:
            reason = self._worker_failure(trial_id)
        elif result.get("error"):
            reason = str(result["error"])
        else:
            values = []
            for o in self.objectives:
                v = result.get(OBJECTIVES[o].metric)
                if v is None or not math.isfinite(float(v)):
                    reason = f"objective {o} is {v!r}"
                    break
                values.append(float(v))
        if reason is not None:
            self._fail(trial, reason, result)
            return

        def write() -> None:
            for k, v in result.items():
                if k in RESULT_ATTRS and v is not None:
                    trial.set_user_attr(k, v)
            metrics = budget_metrics(result)
            devices = fitting_devices(self.budgets, metrics)
            trial.set_user_attr("fits_devices", devices)
            trial.set_user_attr("feasible", bool(devices))
            if self.budgets:
                trial.set_constraint("budgets", float(constraint_value(self.budgets, metrics)))
            self.study.tell(trial, values)

        if not _guarded(self.study, trial, write):
            return
        self._done[c.key] = trial.number
        self.completed += 1
        self._emit("complete", trial.number)
