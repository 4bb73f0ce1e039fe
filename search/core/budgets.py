"""Device budgets: the limits a stitched network must meet on each target device.

:class:`DeviceBudget` is one device's row of the budget table (read and validated by
:func:`search.inputs.load_budget_table`); :func:`constraint_value` and
:func:`fitting_devices` check a candidate's measurements against all of them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Metric names, in column order: the keys of the ``metrics`` mappings and of
#: :meth:`DeviceBudget.limits`.
METRICS: tuple[str, ...] = ("macs", "params", "latency_ms", "memory_mb")

#: Budget column -> metric name.
BUDGET_COLUMNS: dict[str, str] = {f"max_{m}": m for m in METRICS}

#: How the summary, report and exports label a latency measured on the search's host.
HOST_MEASURED = "host-measured"


def _is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class DeviceBudget:
    """One target device and its limits; a limit of None means unlimited.

    Attributes:
        device: The device's name (unique within a table).
        max_macs: Most multiply-accumulates per image.
        max_params: Most parameters.
        max_latency_ms: Longest latency per image, in milliseconds.
        max_memory_mb: Most memory, in megabytes.
        line: The CSV line the device was read from, for messages.
        latency_table: The device latency table's path (resolved against the CSV's folder),
            or None: the device's latency is measured on the search's host.
        table_text: The ``latency_table`` cell as written (for messages).
        table: The loaded table (:class:`evaluators.LatencyTable`), attached when the run
            is planned; None until then.
        latency_quantile: Which quantile of a table's predicted latency is checked against
            ``max_latency_ms`` (a predicted latency carries an interval): None is the
            median (the prediction itself); 0.9 lets only networks whose upper estimate
            fits. Needs ``latency_table``.
    """

    device: str
    max_macs: float | None = None
    max_params: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    line: int | None = None
    latency_table: Path | None = None
    table_text: str | None = field(default=None, compare=False, repr=False)
    table: Any = field(default=None, compare=False, repr=False)
    latency_quantile: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"DeviceBudget.device must be a non-empty name, got {self.device!r}")
        for column in BUDGET_COLUMNS:
            value = getattr(self, column)
            if value is None:
                continue
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"DeviceBudget.{column} must be a finite number > 0 or None (no limit), "
                    f"got {value!r}"
                )
            object.__setattr__(self, column, float(value))
        q = self.latency_quantile
        if q is not None:
            if isinstance(q, bool) or not isinstance(q, numbers.Real) or not 0 < q < 1:
                raise ValueError(
                    f"DeviceBudget.latency_quantile must be between 0 and 1 (exclusive) or "
                    f"None (the median), got {q!r}"
                )
            if self.latency_table is None:
                raise ValueError(
                    "DeviceBudget.latency_quantile needs a latency_table (a host-measured "
                    "latency has no predicted interval)"
                )
            object.__setattr__(self, "latency_quantile", float(q))

    @property
    def latency_source(self) -> str:
        """How this device's latency is known: ``"latency table"`` or ``"host-measured"``."""
        return "latency table" if self.latency_table is not None else HOST_MEASURED

    def limits(self) -> dict[str, float]:
        """Returns the set limits keyed by metric name (``"macs"``, ``"params"``, ...)."""
        out = {}
        for column, metric in BUDGET_COLUMNS.items():
            value = getattr(self, column)
            if value is not None:
                out[metric] = value
        return out

    def fits(self, metrics: Mapping[str, float | None]) -> bool:
        """Whether a candidate meets every set limit.

        Args:
            metrics: The candidate's measurements keyed by metric name. A limit whose metric
                is missing (absent, None or NaN) is not met.

        Returns:
            True when every set limit is met; a device without limits fits everything.
        """
        return all(v <= 0 for v in self.violations(metrics).values())

    def violations(self, metrics: Mapping[str, float | None]) -> dict[str, float]:
        """Relative excess per set limit: ``(value - limit) / limit``.

        Args:
            metrics: The candidate's measurements keyed by metric name.

        Returns:
            Per set limit, a value <= 0 when the limit is met; ``inf`` when the metric is
            missing.
        """
        out = {}
        for metric, limit in self.limits().items():
            value = metrics.get(metric)
            out[metric] = math.inf if _is_missing(value) else (value - limit) / limit
        return out

    def headroom(self, metrics: Mapping[str, float | None]) -> dict[str, float]:
        """Fraction of each set budget left: ``1 - value / limit``.

        Args:
            metrics: The candidate's measurements keyed by metric name.

        Returns:
            Per set limit, a value >= 0 when the limit is met (1 means nothing used); ``-inf``
            when the metric is missing.
        """
        return {metric: -v for metric, v in self.violations(metrics).items()}

    def to_dict(self) -> dict[str, Any]:
        """Returns the device's budget row (for exports): the device and every budget column."""
        return {"device": self.device, **{c: getattr(self, c) for c in BUDGET_COLUMNS}}


def constraint_value(
    budgets: Sequence[DeviceBudget],
    metrics: Mapping[str, float | None] | Callable[[DeviceBudget], Mapping[str, float | None]],
) -> float:
    """The Optuna constraint value of a candidate: <= 0 iff it fits at least one device.

    It is the minimum over devices of the largest relative violation on that device, so it
    also says how far an infeasible candidate is from fitting the nearest device. A device
    without limits counts as ``-1`` (nothing used).

    Args:
        budgets: The devices.
        metrics: The candidate's measurements keyed by metric name, or a function giving
            them per device (a device with a latency table has its own latency).

    Returns:
        The constraint value; ``inf`` when a metric that every device limits is missing.

    Raises:
        ValueError: ``budgets`` is empty.
    """
    if not budgets:
        raise ValueError("constraint_value needs at least one device budget, got none")
    of = metrics if callable(metrics) else (lambda b: metrics)
    return min(max(b.violations(of(b)).values(), default=-1.0) for b in budgets)


def fitting_devices(
    budgets: Sequence[DeviceBudget],
    metrics: Mapping[str, float | None] | Callable[[DeviceBudget], Mapping[str, float | None]],
) -> list[str]:
    """Returns the names of the devices a candidate fits, in table order.

    Args:
        budgets: The devices.
        metrics: As for :func:`constraint_value`.
    """
    of = metrics if callable(metrics) else (lambda b: metrics)
    return [b.device for b in budgets if b.fits(of(b))]
