"""Writes what became of a driver's trials into the study.

Every trial the searcher asks for is annotated with its candidate, then ends one of four
ways: a repeat answered from the stored result of an earlier trial, PRUNED with a reason,
FAIL with a reason, or COMPLETE. A complete trial stores the worker's metrics as user
attributes, the budget constraint (``trial.set_constraint``; value <= 0 means the candidate
fits at least one device) and, because optuna-dashboard does not read Optuna 5 constraints,
the ``fits_devices`` and ``feasible`` user attributes too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import TrialState

from search.core import (
    OBJECTIVES,
    RESULT_ATTRS,
    Attr,
    DeviceBudget,
    annotation,
    budget_metrics,
    constraint_value,
    device_latency_estimate,
    device_latency_text,
    fitting_devices,
    unflatten,
)
from search.store import optuna_access
from search.strategy.pruning import CkaMatrices, cka_at
from space import Candidate

#: The name of the budget constraint (``trial.constraints``).
BUDGET_CONSTRAINT = "budgets"
#: What a failed trial keeps of a worker's report, besides the reason.
_FAIL_ATTRS = (Attr.HOST, Attr.EVAL_PID, Attr.TRIAL_SECONDS)
#: Longest failure reason stored.
_MAX_REASON = 2000


def objective_values(
    result: Mapping[str, Any], objectives: Sequence[str]
) -> tuple[list[float], str | None]:
    """The objective values a worker reported, in study order.

    Returns:
        ``(values, None)``, or ``(values so far, reason)`` when the worker reported an error
        or an objective is missing or not finite.
    """
    if result.get("error"):
        return [], str(result["error"])
    values = []
    for o in objectives:
        v = result.get(OBJECTIVES[o].metric)
        if v is None or not math.isfinite(float(v)):
            return values, f"objective {o} is {v!r}"
        values.append(float(v))
    return values, None


class Recorder:
    """Writes the outcomes of one driver's trials (attributes, constraints, tell).

    Args:
        study: The study.
        driver_id: Written into each trial this driver asks for.
        budgets: The device budgets (the constraint of a complete trial).
        cka: CKA matrices (a stitch trial records the CKA at its stitch point).
    """

    def __init__(
        self,
        study: optuna.Study,
        *,
        driver_id: str,
        budgets: Sequence[DeviceBudget],
        cka: CkaMatrices,
    ) -> None:
        self.study = study
        self.driver_id = driver_id
        self.budgets = list(budgets)
        self.cka = cka

    def annotate(self, trial: optuna.Trial, c: Candidate) -> None:
        """Says which candidate the trial evaluates, and for which driver."""
        for k, v in annotation(c, self.driver_id, cka_at(self.cka, c)).items():
            trial.set_user_attr(k, v)

    def repeat(self, trial: optuna.Trial, source: int) -> None:
        """Completes ``trial`` with the stored result of trial number ``source``."""
        earlier = optuna_access.trial_by_number(self.study, source)
        for k, v in earlier.user_attrs.items():
            if k not in (Attr.DRIVER, Attr.DUPLICATE_OF):
                trial.set_user_attr(k, v)
        trial.set_user_attr(Attr.DUPLICATE_OF, earlier.number)
        trial.set_user_attr(Attr.DRIVER, self.driver_id)
        for name, value in earlier.constraints.items():
            trial.set_constraint(name, value)
        self.study.tell(trial, earlier.values)

    def prune(self, trial: optuna.Trial, reason: str) -> None:
        """Records ``trial`` as PRUNED (not evaluated) with the reason."""
        trial.set_user_attr(Attr.PRUNED_REASON, reason)
        self.study.tell(trial, state=TrialState.PRUNED)

    def fail(
        self, trial: optuna.Trial, reason: str, result: Mapping[str, Any] | None = None
    ) -> bool:
        """Records ``trial`` as FAIL with the reason and where it ran.

        Returns:
            False when another driver finished the trial first (took this driver for dead).
        """

        def write() -> None:
            trial.set_user_attr(Attr.FAIL_REASON, reason[:_MAX_REASON])
            for k in _FAIL_ATTRS:
                if result and result.get(k) is not None:
                    trial.set_user_attr(k, result[k])
            self.study.tell(trial, state=TrialState.FAIL)

        return self._guarded(trial, write)

    def complete(
        self, trial: optuna.Trial, result: Mapping[str, Any], values: Sequence[float]
    ) -> bool:
        """Stores an evaluation: metrics, budget fit and constraint, objective values.

        Returns:
            False when another driver finished the trial first (took this driver for dead).
        """
        result = unflatten(result)

        def write() -> None:
            for k, v in result.items():
                if k in RESULT_ATTRS and v is not None:
                    trial.set_user_attr(k, v)
            attrs = {**trial.user_attrs, **result}
            tabled = [b for b in self.budgets if b.table is not None]
            if tabled:
                estimates = {b.device: device_latency_estimate(attrs, b) for b in tabled}
                trial.set_user_attr(
                    Attr.DEVICE_LATENCY_MS, {d: v for d, (v, _) in estimates.items()}
                )
                trial.set_user_attr(
                    Attr.DEVICE_LATENCY_STD_MS, {d: sd for d, (_, sd) in estimates.items()}
                )
                texts = {b.device: device_latency_text(attrs, b) for b in tabled}
                trial.set_user_attr(Attr.DEVICE_LATENCY_TEXT, texts)

            def metrics(b: DeviceBudget) -> dict[str, float | None]:
                return budget_metrics(attrs, b)

            devices = fitting_devices(self.budgets, metrics)
            trial.set_user_attr(Attr.FITS_DEVICES, devices)
            trial.set_user_attr(Attr.FEASIBLE, bool(devices))
            if self.budgets:
                value = float(constraint_value(self.budgets, metrics))
                trial.set_constraint(BUDGET_CONSTRAINT, value)
            self.study.tell(trial, list(values))

        return self._guarded(trial, write)

    def _guarded(self, trial: optuna.Trial, write: Callable[[], None]) -> bool:
        """Runs ``write``; False if the trial was finished by someone else meanwhile."""
        try:
            write()
        except (RuntimeError, ValueError):
            if optuna_access.is_finished(self.study, trial):
                return False
            raise
        return True
