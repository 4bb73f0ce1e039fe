"""A self-contained HTML report of a study: accuracy against MACs, budgets and per-device picks.

The page embeds plotly.js, so it opens offline. Every user-given string (device names,
configuration labels, reasons) is HTML-escaped. Both rungs are drawn: least-squares trials
by status, fine-tuned (rung-1) trials as diamonds with an arrow from their rung-0 point
(:mod:`search.delivery.report_figure`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.core import Attr, DeviceBudget, rung_of
from search.delivery.report_figure import figure
from search.delivery.report_text import (
    budget_text,
    esc,
    fmt_acc,
    fmt_cka,
    fmt_count,
    fmt_ms,
    row_id,
    short_measure,
    status,
)
from space.files import atomic_write

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem 2rem;
       color: #222; }
h1 { font-size: 1.5rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; }
p.meta { color: #555; margin-top: 0; }
table { border-collapse: collapse; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.3rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.none { color: #999; }
code { font-size: 0.85rem; }
"""


def _cell(text: str, *, num: bool = False) -> str:
    if text == "—":
        return '<td class="none">—</td>'
    return f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"


def _table(header: Sequence[str], rows: Sequence[str]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    return (
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )


def _chosen_table(
    budgets: Sequence[DeviceBudget],
    chosen: Mapping[str, int | str | None],
    by_number: Mapping[str, Mapping[str, Any]],
    device_latency: Mapping[str, str],
    measure: str = "accuracy",
) -> str:
    devices: list[tuple[str, DeviceBudget | None]] = [(b.device, b) for b in budgets]
    known = {b.device for b in budgets}
    devices += [(d, None) for d in chosen if d not in known]
    rows = []
    for device, budget in devices:
        number = chosen.get(device)
        trial = by_number.get(row_id(number)) if number is not None else None
        budget_cell = _cell(esc(budget_text(budget)) if budget else "—")
        if number is None:
            config = '<td class="none" colspan="5">nothing fits this device</td>'
            rows.append(f"<tr><td>{esc(device)}</td><td>—</td>{config}{budget_cell}</tr>")
            continue
        if trial is None:
            missing = f"trial {esc(row_id(number))} is not in this study"
            config = f'<td class="none" colspan="5">{missing}</td>'
            rows.append(
                f"<tr><td>{esc(device)}</td><td>{esc(row_id(number))}</td>"
                f"{config}{budget_cell}</tr>"
            )
            continue
        rows.append(
            "<tr>"
            f"<td>{esc(device)}</td>"
            f'<td class="num">{esc(row_id(number))}</td>'
            f"<td><code>{esc(trial.get('label', ''))}</code></td>"
            + _cell(fmt_acc(trial.get("val_acc")), num=True)
            + _cell(fmt_count(trial.get("macs")), num=True)
            + _cell(fmt_count(trial.get("params")), num=True)
            + _cell(_latency_text(trial, device_latency.get(device)), num=True)
            + budget_cell
            + "</tr>"
        )
    val = f"val {short_measure(measure)}"
    header = ("device", "trial", "configuration", val, "MACs", "params", "latency", "budgets")
    return _table(header, rows)


def _latency_text(trial: Mapping[str, Any], device: str | None) -> str:
    """The device's latency as text (its source and interval), else the host's latency."""
    if device is None:
        return fmt_ms(trial.get("latency_ms"))
    return esc(device)


def _unplotted_table(trials: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for t in trials:
        if status(t) is not None:
            continue
        rows.append(
            "<tr>"
            f'<td class="num">{esc(row_id(t))}</td>'
            f"<td>{esc(t.get('state', '?'))}</td>"
            f"<td><code>{esc(t.get('label', ''))}</code></td>"
            + _cell(fmt_count(t.get("macs")), num=True)
            + _cell(fmt_cka(t.get("cka")), num=True)
            + _cell(esc(t["reason"]) if t.get("reason") else "—")
            + "</tr>"
        )
    if not rows:
        return "<p>None: every trial is on the plot.</p>"
    return _table(("trial", "state", "configuration", "MACs", "CKA", "reason"), rows)


def _page(
    title: str,
    study_name: str,
    trials: Sequence[Mapping[str, Any]],
    budgets: Sequence[DeviceBudget],
    chosen: Mapping[str, int | str | None],
    device_latency: Mapping[str, str],
    measure: str = "accuracy",
) -> str:
    by_number = {row_id(t): t for t in trials if t.get("number") is not None}
    fig = figure(trials, budgets, chosen, by_number, measure)
    plain = measure.split(" with ")[0]  # "agreement with <teacher>" -> "agreement"
    plot = fig.to_html(
        full_html=False,
        include_plotlyjs=True,
        div_id="stitchsearch-plot",
        config={"displaylogo": False, "responsive": True},
    )
    counts = Counter(str(t.get("state", "?")).upper() for t in trials)
    state_rows = [
        f'<tr><td>{esc(state)}</td><td class="num">{n}</td></tr>'
        for state, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    state_rows.append(f'<tr><th>total</th><td class="num">{len(trials)}</td></tr>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p class="meta">Study <code>{esc(study_name)}</code>: {len(trials)} trials,
{len(budgets)} devices. Hover over a point for its configuration; click legend entries to
hide or show them. The plot opens on the fronts, the anchors and the picks; "all trials"
shows every trial (pruned ones were not trained and sit on the strip at the bottom).</p>
{plot}
<h2>Chosen configuration per device</h2>
{_chosen_table(budgets, chosen, by_number, device_latency, measure)}
<h2>Trials by state</h2>
{_table(("state", "trials"), state_rows)}
<h2>Trials not on the plot (failed, running, or without MACs or {esc(plain)})</h2>
{_unplotted_table(trials)}
</body>
</html>
"""


def write_report(
    path: str | Path,
    trials: Sequence[Mapping[str, Any]],
    budgets: Sequence[DeviceBudget],
    *,
    study_name: str,
    chosen: Mapping[str, int | str | None],
    title: str | None = None,
    device_latency: Mapping[str, str] | None = None,
    measure: str = "accuracy",
) -> Path:
    """Writes a self-contained HTML report of a study.

    The plot shows validation accuracy against MACs (log axis) for every trial, coloured by
    status; pruned trials (no accuracy) sit on a strip at the bottom; anchors are ringed;
    the Pareto front is a step line; each device's MACs budget is a dashed vertical line and
    its chosen trial a marker of the device's colour. Tables below list the choice per
    device, the number of trials per state, and the trials the plot cannot show.

    Args:
        path: Where to write the HTML file (parent folders are created); replaced atomically.
        trials: One mapping per trial with ``number``, ``state``, ``val_acc``, ``macs``,
            ``params``, ``latency_ms``, ``label``, ``kind`` (``"anchor"`` or ``"stitch"``),
            ``feasible``, ``pareto``, ``cka`` and ``reason``; missing keys count as None.
            Rows of rung 1 (fine-tuned) also carry ``rung`` (1), ``id`` and
            ``rung0_val_acc``; they are drawn as their own markers with an arrow from the
            least-squares point, and with the front after fine-tuning.
        budgets: The devices.
        study_name: The Optuna study's name.
        chosen: Device name -> chosen row (its ``id``, or a trial number), or None when
            nothing fits.
        title: The page title; defaults to one naming the study.
        device_latency: Device name -> the chosen trial's latency on it as text, with its
            source and interval (:func:`search.core.device_latency_text`: ``"2.39 ms ±
            0.12 (table)"``); by default the host's latency.
        measure: What ``val_acc`` measures: ``"accuracy"``, or ``"agreement with <teacher>"``
            in a label-free study (axis, hover and table labels say it).

    Returns:
        The path written.
    """
    path = Path(path)
    page = _page(
        title or f"stitchsearch: {study_name}",
        study_name,
        trials,
        budgets,
        chosen,
        device_latency or {},
        measure,
    )
    atomic_write(path, page)
    return path


def trial_row_id(trial: FrozenTrial) -> str:
    """A trial's id in the report, by its rung-0 trial: ``#12``, ``#12 fine-tuned``, ...."""
    rung = rung_of(trial)
    if rung == 1:
        return f"#{trial.user_attrs.get(Attr.RUNG0_TRIAL)} fine-tuned"
    if rung == 2:
        return f"#{trial.user_attrs.get(Attr.RUNG0_TRIAL)} family"
    return f"#{trial.number}"


def trial_rows(
    study: optuna.Study,
    pareto: set[int],
    rung1: optuna.Study | None = None,
    family: Sequence[FrozenTrial] = (),
) -> list[dict[str, Any]]:
    """Trials of every rung as plain rows for the report.

    A rung-1 row carries ``rung`` 1, its rung-0 trial's number (``number``) and that trial's
    least-squares accuracy (``rung0_val_acc``); a family member's row carries ``rung`` 2 and
    its accuracy at the rung it started from (``lower_val_acc``).
    """
    rows = []
    finetuned = rung1.get_trials(deepcopy=False) if rung1 is not None else []
    for t in [*study.get_trials(deepcopy=False), *finetuned, *family]:
        a = t.user_attrs
        rows.append(
            {
                "id": trial_row_id(t),
                "number": a.get(Attr.RUNG0_TRIAL, t.number),
                "rung": rung_of(t),
                "state": t.state.name,
                "val_acc": a.get(Attr.VAL_ACC),
                "rung0_val_acc": a.get(Attr.RUNG0_VAL_ACC),
                "lower_val_acc": a.get(Attr.LOWER_VAL_ACC),
                "macs": a.get(Attr.MACS),
                "params": a.get(Attr.PARAMS),
                "latency_ms": a.get(Attr.LATENCY_MS),
                "label": a.get(Attr.LABEL, ""),
                "kind": a.get(Attr.KIND, "stitch"),
                "feasible": a.get(Attr.FEASIBLE),
                "pareto": not rung_of(t) and t.number in pareto,
                "cka": a.get(Attr.CKA),
                "reason": a.get(Attr.PRUNED_REASON) or a.get(Attr.FAIL_REASON),
            }
        )
    return rows
