"""A self-contained HTML report of a study: accuracy against MACs, budgets and per-device picks.

The page embeds plotly.js, so it opens offline. Every user-given string (device names,
configuration labels, reasons) is HTML-escaped. Both rungs are drawn: least-squares trials
by status, fine-tuned (rung-1) trials as diamonds with an arrow from their rung-0 point.

(Over 500 lines: it is one page whose figure and tables share the row format and the
escaping helpers; splitting it would scatter one format over several modules.)
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from search.budgets import DeviceBudget, format_quantity
from space.files import atomic_write

#: Marker style per plotted status: (legend name, colour, symbol).
_STATUS_STYLE: dict[str, tuple[str, str, str]] = {
    "feasible": ("complete, fits a device", "#1f77b4", "circle"),
    "infeasible": ("complete, fits no device", "#ff7f0e", "x"),
    "unchecked": ("complete, budgets not checked", "#7f7f7f", "circle"),
    "pruned": ("pruned (not trained)", "#9467bd", "triangle-down"),
}

#: Colours for devices (budget line and chosen point share one).
_DEVICE_COLOURS = (
    "#d62728",
    "#2ca02c",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#9467bd",
    "#ff7f0e",
)
_DEVICE_SYMBOLS = ("star", "diamond", "hexagram", "square", "pentagon", "star-diamond", "bowtie")

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


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _plot_text(value: Any) -> str:
    # Plotly renders a subset of HTML in text and hover labels and decodes &lt; &gt; &amp;.
    return html.escape(str(value), quote=False)


def _number(value: Any) -> float | None:
    """The value as a finite float, or None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _fmt_acc(value: Any) -> str:
    v = _number(value)
    return "—" if v is None else f"{v:.2f}%"


def _fmt_count(value: Any) -> str:
    v = _number(value)
    return "—" if v is None else format_quantity(v)


def _fmt_ms(value: Any) -> str:
    v = _number(value)
    return "—" if v is None else f"{v:.3g} ms"


def _fmt_cka(value: Any) -> str:
    v = _number(value)
    return "—" if v is None else f"{v:.3f}"


def _budget_text(budget: DeviceBudget) -> str:
    parts = []
    if budget.max_macs is not None:
        parts.append(f"MACs ≤ {format_quantity(budget.max_macs)}")
    if budget.max_params is not None:
        parts.append(f"params ≤ {format_quantity(budget.max_params)}")
    if budget.max_latency_ms is not None:
        parts.append(f"latency ≤ {budget.max_latency_ms:g} ms ({budget.latency_source})")
    if budget.max_memory_mb is not None:
        parts.append(f"memory ≤ {budget.max_memory_mb:g} MB")
    return ", ".join(parts) or "no limits"


def _status(trial: Mapping[str, Any]) -> str | None:
    """The plotted status of a trial, or None when it cannot be plotted."""
    state = str(trial.get("state", "")).upper()
    macs = _number(trial.get("macs"))
    if macs is None or macs <= 0:
        return None  # A log axis cannot show it.
    if state == "COMPLETE":
        if _number(trial.get("val_acc")) is None:
            return None
        feasible = trial.get("feasible")
        if feasible is None:
            return "unchecked"
        return "feasible" if feasible else "infeasible"
    if state == "PRUNED":
        return "pruned"
    return None


_PLOTTED = ("feasible", "infeasible", "unchecked")
_RUNG1_COLOUR = "#b8860b"


def row_id(row: Mapping[str, Any] | int | str) -> str:
    """A row's id: its ``id``, else ``#<number>`` (a trial number stands for itself)."""
    if isinstance(row, Mapping):
        return str(row.get("id") or f"#{row.get('number')}")
    return row if isinstance(row, str) else f"#{row}"


def best_rung_front(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Pareto front (accuracy up, MACs down) of the candidates at their highest rung.

    Fine-tuned rows replace their rung-0 rows; rows that fit no device are left out.
    """
    tuned = {t["number"]: t for t in trials if t.get("rung") and _status(t) in _PLOTTED}
    best = [
        tuned.get(t["number"], t)
        for t in trials
        if not t.get("rung") and _status(t) in ("feasible", "unchecked")
    ]
    best = [t for t in best if _status(t) in ("feasible", "unchecked")]
    front = []
    for t in sorted(best, key=lambda t: (float(t["macs"]), -float(t["val_acc"]))):
        if not front or float(t["val_acc"]) > float(front[-1]["val_acc"]):
            front.append(t)
    return front


def _add_rung1(
    fig: go.Figure,
    finetuned: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    measure: str = "accuracy",
) -> None:
    """Fine-tuned points, an arrow from each one's least-squares point, and their front."""
    fig.add_trace(
        go.Scatter(
            x=[float(t["macs"]) for t in finetuned],
            y=[float(t["val_acc"]) for t in finetuned],
            mode="markers",
            name=f"fine-tuned, rung 1 ({len(finetuned)})",
            marker={
                "color": _RUNG1_COLOUR,
                "symbol": "diamond",
                "size": 10,
                "line": {"color": "black", "width": 1},
            },
            hovertext=[_hover_of(t, measure) for t in finetuned],
            hoverinfo="text",
        )
    )
    for t in finetuned:
        before = _number(t.get("rung0_val_acc"))
        if before is None:
            continue
        x = math.log10(float(t["macs"]))  # annotations on a log axis take log10 positions
        fig.add_annotation(
            x=x,
            y=float(t["val_acc"]),
            ax=x,
            ay=before,
            xref="x",
            yref="y",
            axref="x",
            ayref="y",
            showarrow=True,
            arrowhead=2,
            arrowsize=1,
            arrowwidth=1,
            arrowcolor=_RUNG1_COLOUR,
            opacity=0.7,
            text="",
        )
    if front:
        fig.add_trace(
            go.Scatter(
                x=[float(t["macs"]) for t in front],
                y=[float(t["val_acc"]) for t in front],
                mode="lines",
                line={"shape": "hv", "color": _RUNG1_COLOUR, "width": 2, "dash": "dash"},
                name=f"Pareto front after fine-tuning ({len(front)})",
                hoverinfo="skip",
            )
        )


def _short(measure: str) -> str:
    """The measure as a column or hover label: ``acc``, or ``agreement with <teacher>``."""
    return "acc" if measure == "accuracy" else measure


def _hover_of(trial: Mapping[str, Any], measure: str = "accuracy") -> str:
    lines = [
        f"<b>{_plot_text(row_id(trial))}</b> {_plot_text(trial.get('label', ''))}",
        f"state: {_plot_text(trial.get('state', '?'))} ({_plot_text(trial.get('kind', '?'))})",
        f"val {_plot_text(_short(measure))}: {_fmt_acc(trial.get('val_acc'))}",
        f"MACs: {_fmt_count(trial.get('macs'))}",
        f"params: {_fmt_count(trial.get('params'))}",
        f"latency: {_fmt_ms(trial.get('latency_ms'))}",
        f"CKA: {_fmt_cka(trial.get('cka'))}",
    ]
    if trial.get("feasible") is not None:
        lines.append(f"fits a device: {'yes' if trial.get('feasible') else 'no'}")
    if trial.get("pareto"):
        lines.append("on the Pareto front")
    if trial.get("rung"):
        lines.append(f"fine-tuned (rung 1); least squares: {_fmt_acc(trial.get('rung0_val_acc'))}")
    if trial.get("reason"):
        lines.append(f"reason: {_plot_text(trial['reason'])}")
    return "<br>".join(lines)


def _y_layout(trials: Sequence[Mapping[str, Any]]) -> tuple[float, float, float]:
    """Returns (strip y for pruned trials, axis bottom, axis top)."""
    accs = [
        a
        for t in trials
        if _status(t) in ("feasible", "infeasible", "unchecked")
        and (a := _number(t.get("val_acc"))) is not None
    ]
    lo, hi = (min(accs), max(accs)) if accs else (0.0, 100.0)
    span = max(hi - lo, 1.0)
    strip = lo - 0.12 * span
    return strip, strip - 0.06 * span, hi + 0.1 * span


def _figure(
    trials: Sequence[Mapping[str, Any]],
    budgets: Sequence[DeviceBudget],
    chosen: Mapping[str, int | None],
    by_number: Mapping[int, Mapping[str, Any]],
    measure: str = "accuracy",
) -> go.Figure:
    fig = go.Figure()

    def _hover(trial: Mapping[str, Any]) -> str:
        return _hover_of(trial, measure)

    strip, y_bottom, y_top = _y_layout(trials)

    def y_of(trial: Mapping[str, Any]) -> float:
        return strip if _status(trial) == "pruned" else float(trial["val_acc"])

    rung0 = [t for t in trials if not t.get("rung")]
    finetuned = [t for t in trials if t.get("rung") and _status(t) in _PLOTTED]
    for status, (name, colour, symbol) in _STATUS_STYLE.items():
        group = [t for t in rung0 if _status(t) == status]
        if not group:
            continue
        fig.add_trace(
            go.Scatter(
                x=[float(t["macs"]) for t in group],
                y=[y_of(t) for t in group],
                mode="markers",
                name=f"{name} ({len(group)})",
                marker={"color": colour, "symbol": symbol, "size": 8, "opacity": 0.8},
                hovertext=[_hover(t) for t in group],
                hoverinfo="text",
            )
        )

    if finetuned:
        _add_rung1(fig, finetuned, best_rung_front(trials), measure)

    anchors = [t for t in rung0 if t.get("kind") == "anchor" and _status(t) is not None]
    if anchors:
        fig.add_trace(
            go.Scatter(
                x=[float(t["macs"]) for t in anchors],
                y=[y_of(t) for t in anchors],
                mode="markers+text",
                name="anchors",
                text=[_plot_text(t.get("label", "")) for t in anchors],
                textposition="top center",
                textfont={"size": 10},
                marker={
                    "symbol": "circle-open",
                    "size": 16,
                    "color": "black",
                    "line": {"width": 2},
                },
                hovertext=[_hover(t) for t in anchors],
                hoverinfo="text",
                cliponaxis=False,
            )
        )

    front = sorted(
        (t for t in rung0 if t.get("pareto") and _status(t) in ("feasible", "unchecked")),
        key=lambda t: float(t["macs"]),
    )
    if not front:  # Pareto flags may be set on trials that fit no device.
        front = sorted(
            (t for t in rung0 if t.get("pareto") and _status(t) == "infeasible"),
            key=lambda t: float(t["macs"]),
        )
    if front:
        fig.add_trace(
            go.Scatter(
                x=[float(t["macs"]) for t in front],
                y=[float(t["val_acc"]) for t in front],
                mode="lines",
                line={"shape": "hv", "color": "#1f77b4", "width": 2},
                name=f"Pareto front ({len(front)})"
                if not finetuned
                else f"Pareto front, least squares ({len(front)})",
                hoverinfo="skip",
            )
        )

    macs = [float(t["macs"]) for t in trials if _status(t) in _PLOTTED and t.get("macs")]
    # The middle of the log-scale x axis.
    x_middle = math.sqrt(min(macs) * max(macs)) if macs else 0.0
    for i, budget in enumerate(budgets):
        colour = _DEVICE_COLOURS[i % len(_DEVICE_COLOURS)]
        group = f"device-{i}"
        name = _plot_text(budget.device)
        if budget.max_macs is not None:
            label_y = y_top - (0.03 + (i % 4) * 0.045) * (y_top - y_bottom)
            fig.add_trace(
                go.Scatter(
                    x=[budget.max_macs, budget.max_macs],
                    y=[y_bottom, label_y],
                    mode="lines+text",
                    text=["", f" {name}"],
                    textposition="middle right",
                    textfont={"color": colour, "size": 11},
                    line={"color": colour, "dash": "dash", "width": 1.5},
                    name=f"{name}: MACs ≤ {format_quantity(budget.max_macs)}",
                    legendgroup=group,
                    hovertext=f"{name}<br>{_plot_text(_budget_text(budget))}",
                    hoverinfo="text",
                )
            )
        number = chosen.get(budget.device)
        pick = by_number.get(row_id(number)) if number is not None else None
        if pick is not None and _status(pick) is not None:
            fig.add_trace(
                go.Scatter(
                    x=[float(pick["macs"])],
                    y=[y_of(pick)],
                    mode="markers+text",
                    text=[f"{name} → {_plot_text(row_id(pick))}"],
                    # Towards the plot's middle, so that a label is not cut off at its edge.
                    textposition=("bottom " if i % 2 else "top ")
                    + ("right" if float(pick["macs"]) <= x_middle else "left"),
                    textfont={"color": colour, "size": 11},
                    marker={
                        "symbol": _DEVICE_SYMBOLS[i % len(_DEVICE_SYMBOLS)],
                        "size": 17,
                        "color": colour,
                        "line": {"color": "white", "width": 1},
                    },
                    name=f"{name}: chosen {_plot_text(row_id(pick))}",
                    legendgroup=group,
                    hovertext=f"chosen for {name}<br>{_hover(pick)}",
                    hoverinfo="text",
                    cliponaxis=False,
                )
            )

    fig.update_layout(
        height=640,
        margin={"l": 60, "r": 30, "t": 30, "b": 60},
        template="plotly_white",
        hovermode="closest",
        legend={"font": {"size": 11}},
        xaxis={"type": "log", "title": {"text": "MACs per image (log scale)"}},
        yaxis={
            "title": {"text": f"validation {_plot_text(measure)} (%)"},
            "range": [y_bottom, y_top],
        },
    )
    if any(_status(t) == "pruned" for t in trials):
        fig.add_shape(
            type="line",
            xref="paper",
            x0=0,
            x1=1,
            y0=strip,
            y1=strip,
            line={"color": "#9467bd", "width": 1, "dash": "dot"},
            layer="below",
        )
        fig.add_annotation(
            xref="paper",
            x=0.0,
            xanchor="left",
            y=strip,
            yanchor="bottom",
            text=f"pruned: not trained, no {measure.split(' with ')[0]}",
            showarrow=False,
            font={"size": 10, "color": "#9467bd"},
        )
    if not trials:
        fig.add_annotation(
            xref="paper",
            yref="paper",
            x=0.5,
            y=0.5,
            text="no trials yet",
            showarrow=False,
            font={"size": 16, "color": "#999"},
        )
    return fig


def _cell(text: str, *, num: bool = False) -> str:
    if text == "—":
        return '<td class="none">—</td>'
    return f'<td class="num">{text}</td>' if num else f"<td>{text}</td>"


def _table(header: Sequence[str], rows: Sequence[str]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    return (
        f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>"
    )


def _chosen_table(
    budgets: Sequence[DeviceBudget],
    chosen: Mapping[str, int | str | None],
    by_number: Mapping[str, Mapping[str, Any]],
    device_latency: Mapping[str, tuple[float | None, str]],
    measure: str = "accuracy",
) -> str:
    devices: list[tuple[str, DeviceBudget | None]] = [(b.device, b) for b in budgets]
    known = {b.device for b in budgets}
    devices += [(d, None) for d in chosen if d not in known]
    rows = []
    for device, budget in devices:
        number = chosen.get(device)
        trial = by_number.get(row_id(number)) if number is not None else None
        budget_cell = _cell(_esc(_budget_text(budget)) if budget else "—")
        if number is None:
            config = '<td class="none" colspan="5">nothing fits this device</td>'
            rows.append(f"<tr><td>{_esc(device)}</td><td>—</td>{config}{budget_cell}</tr>")
            continue
        if trial is None:
            missing = f"trial {_esc(row_id(number))} is not in this study"
            config = f'<td class="none" colspan="5">{missing}</td>'
            rows.append(
                f"<tr><td>{_esc(device)}</td><td>{_esc(row_id(number))}</td>"
                f"{config}{budget_cell}</tr>"
            )
            continue
        rows.append(
            "<tr>"
            f"<td>{_esc(device)}</td>"
            f'<td class="num">{_esc(row_id(number))}</td>'
            f"<td><code>{_esc(trial.get('label', ''))}</code></td>"
            + _cell(_fmt_acc(trial.get("val_acc")), num=True)
            + _cell(_fmt_count(trial.get("macs")), num=True)
            + _cell(_fmt_count(trial.get("params")), num=True)
            + _cell(_latency_text(trial, device_latency.get(device)), num=True)
            + budget_cell
            + "</tr>"
        )
    val = f"val {_short(measure)}"
    header = ("device", "trial", "configuration", val, "MACs", "params", "latency", "budgets")
    return _table(header, rows)


def _latency_text(trial: Mapping[str, Any], device: tuple[float | None, str] | None) -> str:
    """The device's latency (from its table, or the host's measurement) with its source."""
    if device is None:
        return _fmt_ms(trial.get("latency_ms"))
    value, source = device
    return f"{_fmt_ms(value)} ({_esc(source)})"


def _unplotted_table(trials: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for t in trials:
        if _status(t) is not None:
            continue
        rows.append(
            "<tr>"
            f'<td class="num">{_esc(row_id(t))}</td>'
            f"<td>{_esc(t.get('state', '?'))}</td>"
            f"<td><code>{_esc(t.get('label', ''))}</code></td>"
            + _cell(_fmt_count(t.get("macs")), num=True)
            + _cell(_fmt_cka(t.get("cka")), num=True)
            + _cell(_esc(t["reason"]) if t.get("reason") else "—")
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
    device_latency: Mapping[str, tuple[float | None, str]],
    measure: str = "accuracy",
) -> str:
    by_number = {row_id(t): t for t in trials if t.get("number") is not None}
    fig = _figure(trials, budgets, chosen, by_number, measure)
    plain = measure.split(" with ")[0]  # "agreement with <teacher>" -> "agreement"
    plot = fig.to_html(
        full_html=False,
        include_plotlyjs=True,
        div_id="stitchsearch-plot",
        config={"displaylogo": False, "responsive": True},
    )
    counts = Counter(str(t.get("state", "?")).upper() for t in trials)
    state_rows = [
        f'<tr><td>{_esc(state)}</td><td class="num">{n}</td></tr>'
        for state, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    state_rows.append(f'<tr><th>total</th><td class="num">{len(trials)}</td></tr>')
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_esc(title)}</h1>
<p class="meta">Study <code>{_esc(study_name)}</code>: {len(trials)} trials,
{len(budgets)} devices. Hover over a point for its configuration; click legend entries to
hide or show them. Pruned trials were not trained and sit on the strip at the bottom.</p>
{plot}
<h2>Chosen configuration per device</h2>
{_chosen_table(budgets, chosen, by_number, device_latency, measure)}
<h2>Trials by state</h2>
{_table(("state", "trials"), state_rows)}
<h2>Trials not on the plot (failed, running, or without MACs or {_esc(plain)})</h2>
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
    device_latency: Mapping[str, tuple[float | None, str]] | None = None,
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
        device_latency: Device name -> (the chosen trial's latency on it, its source:
            ``"latency table"`` or ``"host-measured"``); by default the host's latency.
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
