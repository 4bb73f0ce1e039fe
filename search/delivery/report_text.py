"""The report's shared text: escaping, formats, a trial's status, row id and hover text.

The figure and the tables show the same rows; both format them with these helpers.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from search.core import DeviceBudget, format_quantity

#: The statuses drawn as points on the plot (complete trials with a measure and MACs).
PLOTTED = ("feasible", "infeasible", "unchecked")


def esc(value: Any) -> str:
    """HTML-escapes a value for the page (quotes too)."""
    return html.escape(str(value), quote=True)


def plot_text(value: Any) -> str:
    """Escapes a value for plotly text and hover labels."""
    # Plotly renders a subset of HTML in text and hover labels and decodes &lt; &gt; &amp;.
    return html.escape(str(value), quote=False)


def number(value: Any) -> float | None:
    """The value as a finite float, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def fmt_acc(value: Any) -> str:
    """A percentage with two decimals, or a dash."""
    v = number(value)
    return "—" if v is None else f"{v:.2f}%"


def fmt_count(value: Any) -> str:
    """A compact count (``2.50M``), or a dash."""
    v = number(value)
    return "—" if v is None else format_quantity(v)


def fmt_ms(value: Any) -> str:
    """Milliseconds with three significant digits, or a dash."""
    v = number(value)
    return "—" if v is None else f"{v:.3g} ms"


def fmt_cka(value: Any) -> str:
    """A CKA value with three decimals, or a dash."""
    v = number(value)
    return "—" if v is None else f"{v:.3f}"


def budget_text(budget: DeviceBudget) -> str:
    """A device's limits in words (``MACs ≤ 2.50M, ...``)."""
    parts = []
    if budget.max_macs is not None:
        parts.append(f"MACs ≤ {format_quantity(budget.max_macs)}")
    if budget.max_params is not None:
        parts.append(f"params ≤ {format_quantity(budget.max_params)}")
    if budget.max_latency_ms is not None:
        source = budget.latency_source
        if budget.latency_quantile is not None:
            source += f", quantile {budget.latency_quantile:g}"
        parts.append(f"latency ≤ {budget.max_latency_ms:g} ms ({source})")
    if budget.max_memory_mb is not None:
        parts.append(f"memory ≤ {budget.max_memory_mb:g} MB")
    return ", ".join(parts) or "no limits"


def status(trial: Mapping[str, Any]) -> str | None:
    """The plotted status of a trial, or None when it cannot be plotted."""
    state = str(trial.get("state", "")).upper()
    macs = number(trial.get("macs"))
    if macs is None or macs <= 0:
        return None  # A log axis cannot show it.
    if state == "COMPLETE":
        if number(trial.get("val_acc")) is None:
            return None
        feasible = trial.get("feasible")
        if feasible is None:
            return "unchecked"
        return "feasible" if feasible else "infeasible"
    if state == "PRUNED":
        return "pruned"
    return None


def row_id(row: Mapping[str, Any] | int | str) -> str:
    """A row's id: its ``id``, else ``#<number>`` (a trial number stands for itself)."""
    if isinstance(row, Mapping):
        return str(row.get("id") or f"#{row.get('number')}")
    return row if isinstance(row, str) else f"#{row}"


def short_measure(measure: str) -> str:
    """The measure as a column or hover label: ``acc``, or ``agreement with <teacher>``."""
    return "acc" if measure == "accuracy" else measure


def hover_of(trial: Mapping[str, Any], measure: str = "accuracy") -> str:
    """A trial's hover text on the plot."""
    lines = [
        f"<b>{plot_text(row_id(trial))}</b> {plot_text(trial.get('label', ''))}",
        f"state: {plot_text(trial.get('state', '?'))} ({plot_text(trial.get('kind', '?'))})",
        f"val {plot_text(short_measure(measure))}: {fmt_acc(trial.get('val_acc'))}",
        f"MACs: {fmt_count(trial.get('macs'))}",
        f"params: {fmt_count(trial.get('params'))}",
        f"latency: {fmt_ms(trial.get('latency_ms'))}",
        f"CKA: {fmt_cka(trial.get('cka'))}",
    ]
    if trial.get("feasible") is not None:
        lines.append(f"fits a device: {'yes' if trial.get('feasible') else 'no'}")
    if trial.get("pareto"):
        lines.append("on the Pareto front")
    if trial.get("rung") == 1:
        lines.append(f"fine-tuned (rung 1); least squares: {fmt_acc(trial.get('rung0_val_acc'))}")
    elif trial.get("rung") == 2:
        lines.append(f"trained in the family; before: {fmt_acc(trial.get('lower_val_acc'))}")
    if trial.get("reason"):
        lines.append(f"reason: {plot_text(trial['reason'])}")
    return "<br>".join(lines)
