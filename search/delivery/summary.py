"""What the terminal shows after a search: counts, the per-device table, the dashboard."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.core import (
    PASSWORD_ENV,
    RUNG_NAMES,
    Attr,
    DeviceBudget,
    budget_metrics,
    device_latency_text,
    format_quantity,
    has_password,
    rung_of,
    url_without_password,
)
from search.inputs import Plan


def counts_line(
    plan: Plan,
    study: optuna.Study,
    *,
    evaluated: int,
    finetuned: int | None,
    stats: Mapping[str, int],
    trained: int | None = None,
    interrupted: bool,
) -> str:
    """The line that opens the summary: evaluations in the study, this run's and all trials'.

    Args:
        plan: The run's plan.
        study: The rung-0 study.
        evaluated: Evaluated candidates in the study.
        finetuned: Rung-1 trials in the study (None: the study has no rung 1).
        trained: Members of the delivered family (None: the study trains no family).
        stats: This run's counts (completed, failed, pruned, ...).
        interrupted: The run was interrupted.
    """
    all_trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(1 for t in all_trials if t.state == s) for s in TrialState}
    return (
        f"\n{'INTERRUPTED: ' if interrupted else ''}study {plan.study.name!r}: "
        f"{evaluated}/{plan.trials} candidates evaluated; this run: "
        f"{stats.get('completed', 0)} evaluated, {stats.get('pruned', 0)} pruned, "
        f"{stats.get('failed', 0)} failed"
        + (f", {stats['interrupted']} stopped in flight" if stats.get("interrupted") else "")
        + f"; all trials: {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed, {counts['RUNNING']} running"
        + (
            f"; rung 1: {finetuned} fine-tuned ({stats.get('finetuned', 0)} this run)"
            if finetuned is not None
            else ""
        )
        + (f"; family: {trained} members trained" if trained is not None else "")
    )


def summary_table(
    plan: Plan, chosen: Mapping[str, FrozenTrial | None], tests: Mapping[str, str]
) -> str:
    """One row per device: its pick, rung, accuracy, costs, latency and headroom.

    Args:
        plan: The run's plan.
        chosen: Each device's pick (None: nothing fits).
        tests: Each exported device's test accuracy, formatted (empty when not measured).
    """
    quality = "acc" if not plan.study.label_free else plan.measure
    header = ["device", "trial", "rung", "configuration", f"val {quality}", f"test {quality}"]
    rows = [[*header, "MACs", "params", "latency", "headroom"]]
    for b in plan.budgets:
        t = chosen[b.device]
        if t is None:
            rows.append([b.device, "-", "", "nothing fits this device's budget", *[""] * 6])
            continue
        head = b.headroom(budget_metrics(t.user_attrs, b))
        rows.append(
            [
                b.device,
                str(t.user_attrs.get(Attr.RUNG0_TRIAL, t.number)),
                RUNG_NAMES[rung_of(t)],
                t.user_attrs.get(Attr.LABEL, ""),
                f"{t.user_attrs[Attr.VAL_ACC]:.2f}%",
                tests.get(b.device, ""),
                format_quantity(t.user_attrs.get(Attr.MACS, 0)),
                format_quantity(t.user_attrs.get(Attr.PARAMS, 0)),
                latency_cell(b, t.user_attrs),
                ", ".join(f"{k} {v:+.0%}" for k, v in head.items()) or "no limits",
            ]
        )
    return _table(rows)


def latency_cell(device: DeviceBudget, attrs: Mapping[str, Any]) -> str:
    """A device's latency for the summary (:func:`search.core.device_latency_text`).

    ``"0.93 ms ± 0.05 (table)"`` or ``"1.16 ms (host-measured)"``.
    """
    return device_latency_text(attrs, device)


def dashboard_command(url: str) -> str:
    """The optuna-dashboard command for the storage, never with its password."""
    if not has_password(url):
        return f"optuna-dashboard {shlex.quote(url)}"
    return (
        f"optuna-dashboard {shlex.quote(url_without_password(url))}  "
        f"# the password is not shown: set ${PASSWORD_ENV} to it first"
    )


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
