"""The report's figure: accuracy against MACs, with fronts, budgets and picks.

Every trial of both rungs, the Pareto fronts, each device's MACs budget and its pick. The
first view zooms on the fronts, the anchors and the picks (the interesting points sit at the
top of an axis that reaches down to the worst stitch); a button shows every trial. Budget
labels stand upright at the foot of their lines and each picked point carries one label
for all the devices that chose it, so that no label lies on another.
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from typing import Any

import plotly.graph_objects as go

from search.core import DeviceBudget, format_quantity
from search.delivery.report_text import (
    PLOTTED,
    budget_text,
    hover_of,
    number,
    plot_text,
    row_id,
    status,
)

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

#: How a higher rung is drawn: (legend name, colour, symbol, the row key of its lower point,
#: the name of its front).
_HIGHER = {
    1: ("fine-tuned, rung 1", "#b8860b", "diamond", "rung0_val_acc", "after fine-tuning"),
    2: ("family, trained jointly", "#2e8b57", "star", "lower_val_acc", "at the best rung"),
}


def best_rung_front(trials: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The Pareto front (accuracy up, MACs down) of the candidates at their highest rung.

    A higher rung's row replaces the candidate's lower ones; rows that fit no device are
    left out.
    """
    best: dict[Any, Mapping[str, Any]] = {}
    for t in trials:
        if t.get("rung") and status(t) not in PLOTTED:
            continue
        if not t.get("rung") and status(t) not in ("feasible", "unchecked"):
            continue
        held = best.get(t["number"])
        if held is None or int(t.get("rung") or 0) > int(held.get("rung") or 0):
            best[t["number"]] = t
    rows = [t for t in best.values() if status(t) in ("feasible", "unchecked")]
    front: list[Mapping[str, Any]] = []
    for t in sorted(rows, key=lambda t: (float(t["macs"]), -float(t["val_acc"]))):
        if not front or float(t["val_acc"]) > float(front[-1]["val_acc"]):
            front.append(t)
    return front


def _add_higher(
    fig: go.Figure,
    rung: int,
    rows: Sequence[Mapping[str, Any]],
    front: Sequence[Mapping[str, Any]],
    measure: str = "accuracy",
) -> None:
    """A higher rung's points, an arrow from each one's lower-rung point, and the front."""
    name, colour, symbol, lower_key, front_name = _HIGHER[rung]
    fig.add_trace(
        go.Scatter(
            x=[float(t["macs"]) for t in rows],
            y=[float(t["val_acc"]) for t in rows],
            mode="markers",
            name=f"{name} ({len(rows)})",
            marker={
                "color": colour,
                "symbol": symbol,
                "size": 11 if rung == 2 else 10,
                "line": {"color": "black", "width": 1},
            },
            hovertext=[hover_of(t, measure) for t in rows],
            hoverinfo="text",
        )
    )
    # Arrows as a line trace (clipped to the axes, unlike annotations, so that a zoomed view
    # does not draw them over the margins), the head on the higher rung's point.
    xs: list[float | None] = []
    ys: list[float | None] = []
    sizes: list[int] = []
    for t in rows:
        before = number(t.get(lower_key))
        if before is None:
            continue
        xs += [float(t["macs"]), float(t["macs"]), None]
        ys += [before, float(t["val_acc"]), None]
        sizes += [0, 9, 0]
    if xs:
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                line={"color": colour, "width": 1},
                marker={"symbol": "arrow", "angleref": "previous", "size": sizes, "color": colour},
                opacity=0.7,
                name=f"{name}: from rung {rung - 1}",
                showlegend=False,
                hoverinfo="skip",
            )
        )
    if front:
        fig.add_trace(
            go.Scatter(
                x=[float(t["macs"]) for t in front],
                y=[float(t["val_acc"]) for t in front],
                mode="lines",
                line={"shape": "hv", "color": colour, "width": 2, "dash": "dash"},
                name=f"Pareto front {front_name} ({len(front)})",
                hoverinfo="skip",
            )
        )


def _focus(
    rows: Sequence[Mapping[str, Any]], y_bottom: float, y_top: float
) -> tuple[float, float] | None:
    """The y range around ``rows`` (fronts, anchors, picks), or None when it is no zoom."""
    accs = [a for t in rows if (a := number(t.get("val_acc"))) is not None]
    if not accs:
        return None
    lo, hi = min(accs), max(accs)
    span = max(hi - lo, 2.0)
    low, high = max(lo - 0.25 * span, y_bottom), min(hi + 0.15 * span, y_top)
    if (high - low) > 0.7 * (y_top - y_bottom):
        return None
    return low, high


def _y_layout(trials: Sequence[Mapping[str, Any]]) -> tuple[float, float, float]:
    """Returns (strip y for pruned trials, axis bottom, axis top)."""
    accs = [
        a
        for t in trials
        if status(t) in ("feasible", "infeasible", "unchecked")
        and (a := number(t.get("val_acc"))) is not None
    ]
    lo, hi = (min(accs), max(accs)) if accs else (0.0, 100.0)
    span = max(hi - lo, 1.0)
    strip = lo - 0.12 * span
    return strip, strip - 0.06 * span, hi + 0.1 * span


def figure(
    trials: Sequence[Mapping[str, Any]],
    budgets: Sequence[DeviceBudget],
    chosen: Mapping[str, int | str | None],
    by_number: Mapping[str, Mapping[str, Any]],
    measure: str = "accuracy",
) -> go.Figure:
    """Validation accuracy (or agreement) against MACs: every trial, fronts, budgets, picks.

    Args:
        trials: The report rows (:func:`search.delivery.report.trial_rows`).
        budgets: The devices.
        chosen: Device name -> its pick's row id (None: nothing fits).
        by_number: Rows by row id.
        measure: What ``val_acc`` measures (axis and hover labels).
    """
    fig = go.Figure()
    strip, y_bottom, y_top = _y_layout(trials)
    plot = _Plot(fig, strip, measure)
    rung0 = [t for t in trials if not t.get("rung")]
    higher = {
        r: [t for t in trials if t.get("rung") == r and status(t) in PLOTTED] for r in _HIGHER
    }
    for state, (name, colour, symbol) in _STATUS_STYLE.items():
        group = [t for t in rung0 if status(t) == state]
        if group:
            plot.points(group, f"{name} ({len(group)})", colour, symbol)
    top = max((r for r, rows in higher.items() if rows), default=0)
    for r, rows in higher.items():
        if rows:  # the front is drawn for the highest rung (every candidate at its best)
            front = best_rung_front(trials) if r == top else []
            _add_higher(fig, r, rows, front, measure)
    anchors = [t for t in rung0 if t.get("kind") == "anchor" and status(t) is not None]
    macs = [float(t["macs"]) for t in trials if status(t) in PLOTTED and t.get("macs")]
    x_middle = math.sqrt(min(macs) * max(macs)) if macs else 0.0  # the log axis' middle
    raised = {t["number"] for rows in higher.values() for t in rows}
    plot.anchors(anchors, x_middle, below=raised)
    _add_front(fig, rung0, tuned=bool(top))
    picks: dict[str, tuple[Mapping[str, Any], list[str]]] = {}
    for i, budget in enumerate(budgets):
        if budget.max_macs is not None:
            plot.budget_line(i, budget, y_bottom, y_top)
        picked = chosen.get(budget.device)
        pick = by_number.get(row_id(picked)) if picked is not None else None
        if pick is not None and status(pick) is not None:
            plot.pick(i, budget, pick)
            picks.setdefault(row_id(pick), (pick, []))[1].append(plot_text(budget.device))
    plot.pick_labels(list(picks.values()), x_middle)
    # The first view: the candidates at their best rung that no other beats, the anchors
    # and the picks (not the least-squares front below a fine-tuned one).
    shown = [*best_rung_front(trials), *anchors, *(p for p, _ in picks.values())]
    _layout(fig, trials, strip, y_bottom, y_top, measure, _focus(shown, y_bottom, y_top))
    return fig


class _Plot:
    """Adds traces to the figure; pruned trials sit on the strip below the measured ones."""

    def __init__(self, fig: go.Figure, strip: float, measure: str) -> None:
        self.fig = fig
        self.strip = strip
        self.measure = measure

    def y_of(self, trial: Mapping[str, Any]) -> float:
        return self.strip if status(trial) == "pruned" else float(trial["val_acc"])

    def hover(self, trial: Mapping[str, Any]) -> str:
        return hover_of(trial, self.measure)

    def points(
        self, group: Sequence[Mapping[str, Any]], name: str, colour: str, symbol: str
    ) -> None:
        self.fig.add_trace(
            go.Scatter(
                x=[float(t["macs"]) for t in group],
                y=[self.y_of(t) for t in group],
                mode="markers",
                name=name,
                marker={"color": colour, "symbol": symbol, "size": 8, "opacity": 0.8},
                hovertext=[self.hover(t) for t in group],
                hoverinfo="text",
            )
        )

    def anchors(
        self,
        anchors: Sequence[Mapping[str, Any]],
        x_middle: float,
        below: Container[Any] = (),
    ) -> None:
        """The anchors ringed, labelled above and towards the plot's middle.

        Two checkpoints of one architecture have the same MACs: their labels stack above
        their own points instead of spreading sideways over each other. An anchor whose
        trial number is in ``below`` reached a higher rung, drawn above its ring with its own
        label (a pick's), so its label goes below the ring.
        """
        if not anchors:
            return
        self.fig.add_trace(
            go.Scatter(
                x=[float(t["macs"]) for t in anchors],
                y=[self.y_of(t) for t in anchors],
                mode="markers+text",
                name="anchors",
                text=[plot_text(t.get("label", "")) for t in anchors],
                textposition=[
                    ("bottom" if t["number"] in below else "top")
                    + (" right" if float(t["macs"]) <= x_middle else " left")
                    for t in anchors
                ],
                textfont={"size": 10},
                marker={
                    "symbol": "circle-open",
                    "size": 16,
                    "color": "black",
                    "line": {"width": 2},
                },
                hovertext=[self.hover(t) for t in anchors],
                hoverinfo="text",
                cliponaxis=False,
            )
        )

    def budget_line(self, i: int, budget: DeviceBudget, y_bottom: float, y_top: float) -> None:
        """The budget's dashed line over the whole axis, its label upright at the foot."""
        colour = _DEVICE_COLOURS[i % len(_DEVICE_COLOURS)]
        name = plot_text(budget.device)
        self.fig.add_annotation(
            x=math.log10(budget.max_macs),  # annotations on a log axis take log10 positions
            xref="x",
            y=0.01,
            yref="paper",
            text=name,  # the limit is in the legend and the hover text
            textangle=-90,
            xanchor="right",
            yanchor="bottom",
            showarrow=False,
            font={"color": colour, "size": 11},
            bgcolor="rgba(255,255,255,0.8)",
        )
        self.fig.add_trace(
            go.Scatter(
                x=[budget.max_macs, budget.max_macs],
                y=[y_bottom, y_top],
                mode="lines",
                line={"color": colour, "dash": "dash", "width": 1.5},
                name=f"{name}: MACs ≤ {format_quantity(budget.max_macs)}",
                legendgroup=f"device-{i}",
                hovertext=f"{name}<br>{plot_text(budget_text(budget))}",
                hoverinfo="text",
            )
        )

    def pick(self, i: int, budget: DeviceBudget, pick: Mapping[str, Any]) -> None:
        """The device's marker on its pick (labelled by :meth:`pick_labels`)."""
        colour = _DEVICE_COLOURS[i % len(_DEVICE_COLOURS)]
        name = plot_text(budget.device)
        self.fig.add_trace(
            go.Scatter(
                x=[float(pick["macs"])],
                y=[self.y_of(pick)],
                mode="markers",
                marker={
                    "symbol": _DEVICE_SYMBOLS[i % len(_DEVICE_SYMBOLS)],
                    "size": 17,
                    "color": colour,
                    "line": {"color": "white", "width": 1},
                },
                name=f"{name}: chosen {plot_text(row_id(pick))}",
                legendgroup=f"device-{i}",
                hovertext=f"chosen for {name}<br>{self.hover(pick)}",
                hoverinfo="text",
                cliponaxis=False,
            )
        )

    def pick_labels(
        self, picks: Sequence[tuple[Mapping[str, Any], Sequence[str]]], x_middle: float
    ) -> None:
        """One label per picked point, naming every device that chose it, below the point.

        Below, because the anchors' labels sit above theirs; towards the plot's middle, so
        that a label is not cut off at its edge.
        """
        if not picks:
            return
        self.fig.add_trace(
            go.Scatter(
                x=[float(p["macs"]) for p, _ in picks],
                y=[self.y_of(p) for p, _ in picks],
                mode="text",
                text=[f"{', '.join(devices)} → {plot_text(row_id(p))}" for p, devices in picks],
                textposition=[
                    "bottom right" if float(p["macs"]) <= x_middle else "bottom left"
                    for p, _ in picks
                ],
                textfont={"size": 11, "color": "#333"},
                name="chosen (labels)",
                showlegend=False,
                hoverinfo="skip",
                cliponaxis=False,
            )
        )


def _add_front(fig: go.Figure, rung0: Sequence[Mapping[str, Any]], *, tuned: bool) -> None:
    """The least-squares Pareto front as a step line."""
    front = sorted(
        (t for t in rung0 if t.get("pareto") and status(t) in ("feasible", "unchecked")),
        key=lambda t: float(t["macs"]),
    )
    if not front:  # Pareto flags may be set on trials that fit no device.
        front = sorted(
            (t for t in rung0 if t.get("pareto") and status(t) == "infeasible"),
            key=lambda t: float(t["macs"]),
        )
    if not front:
        return
    fig.add_trace(
        go.Scatter(
            x=[float(t["macs"]) for t in front],
            y=[float(t["val_acc"]) for t in front],
            mode="lines",
            line={"shape": "hv", "color": "#1f77b4", "width": 2},
            name=f"Pareto front ({len(front)})"
            if not tuned
            else f"Pareto front, least squares ({len(front)})",
            hoverinfo="skip",
        )
    )


def _layout(
    fig: go.Figure,
    trials: Sequence[Mapping[str, Any]],
    strip: float,
    y_bottom: float,
    y_top: float,
    measure: str,
    focus: tuple[float, float] | None = None,
) -> None:
    """Axes, the strip of pruned trials, and a note when there are no trials yet.

    With a ``focus`` the first view shows that y range, and two buttons switch between it
    and every trial (the pruned ones on their strip included).
    """
    full = [y_bottom, y_top]
    fig.update_layout(
        height=640,
        margin={"l": 60, "r": 30, "t": 30, "b": 60},
        template="plotly_white",
        hovermode="closest",
        legend={"font": {"size": 11}},
        xaxis={"type": "log", "title": {"text": "MACs per image (log scale)"}},
        yaxis={
            "title": {"text": f"validation {plot_text(measure)} (%)"},
            "range": list(focus) if focus else full,
        },
    )
    if focus:
        fig.update_layout(
            updatemenus=[
                {
                    "type": "buttons",
                    "direction": "right",
                    "x": 0.0,
                    "xanchor": "left",
                    "y": 1.0,
                    "yanchor": "bottom",
                    "pad": {"b": 4},
                    "showactive": True,
                    "buttons": [
                        {
                            "label": "fronts, anchors and picks",
                            "method": "relayout",
                            "args": [{"yaxis.range": list(focus)}],
                        },
                        {
                            "label": "all trials",
                            "method": "relayout",
                            "args": [{"yaxis.range": full}],
                        },
                    ],
                }
            ],
            margin={"l": 60, "r": 30, "t": 50, "b": 60},
        )
    if any(status(t) == "pruned" for t in trials):
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
