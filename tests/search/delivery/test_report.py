"""Tests for the HTML report: self-contained, escaped, every trial state rendered."""

from __future__ import annotations

import html
import json
import re

from search.core import DeviceBudget
from search.delivery import write_report

NASTY = "<script>alert(1)</script> déviçe 设备 \"q\" 'a' & co"


def trial(number, state, **kw):
    base = {
        "number": number,
        "state": state,
        "val_acc": None,
        "macs": None,
        "params": None,
        "latency_ms": None,
        "label": f"cfg-{number}",
        "kind": "stitch",
        "feasible": None,
        "pareto": False,
        "cka": None,
        "reason": None,
    }
    base.update(kw)
    return base


TRIALS = [
    trial(
        0,
        "COMPLETE",
        val_acc=88.1,
        macs=1_950_000,
        params=320_000,
        latency_ms=0.41,
        label="zoo:resnet-s",
        kind="anchor",
        feasible=True,
        pareto=True,
    ),
    trial(
        1,
        "COMPLETE",
        val_acc=90.4,
        macs=9_300_000,
        params=2_800_000,
        latency_ms=1.9,
        label="zoo:resnet-l",
        kind="anchor",
        feasible=True,
        pareto=True,
    ),
    trial(
        2,
        "COMPLETE",
        val_acc=89.2,
        macs=4_100_000,
        params=900_000,
        latency_ms=1.1,
        label="zoo:resnet-s[:3] -> zoo:vit-l[2:]",
        feasible=True,
        pareto=True,
        cka=0.81,
    ),
    trial(
        3,
        "COMPLETE",
        val_acc=85.0,
        macs=60_000_000,
        params=5_000_000,
        latency_ms=9.0,
        label="zoo:vit-l[:5] -> <b>resnet</b>",
        feasible=False,
        cka=0.7,
    ),
    trial(
        4,
        "PRUNED",
        macs=3_300_000,
        params=400_000,
        label="zoo:vit-s[:1] -> zoo:resnet-l[3:]",
        cka=0.12,
        reason="CKA 0.120 ranks 9 of 10 for front cut 1 (top_k=3)",
    ),
    trial(
        5,
        "FAIL",
        label="zoo:vit-l[:7] -> zoo:resnet-s[1:]",
        reason="RuntimeError: shape mismatch <4x4>",
    ),
    trial(6, "RUNNING", label="zoo:vit-s[:2] -> zoo:vit-l[4:]", macs=5_000_000),
    trial(7, "WAITING", label="queued anchor"),
    trial(8, "COMPLETE", val_acc=87.0, macs=3_000_000, label="unchecked feasibility"),
]

BUDGETS = [
    DeviceBudget("cortex-m7-mcu", max_macs=2.5e6, max_params=4e5, max_memory_mb=2.0),
    DeviceBudget(NASTY, max_macs=5e6, max_latency_ms=3.0),
    DeviceBudget("edge-server", max_params=1e7),
    DeviceBudget("tiny-sensor", max_macs=1e5),
]
CHOSEN = {"cortex-m7-mcu": 0, NASTY: 2, "edge-server": 1, "tiny-sensor": None}


def figure_json(page: str) -> list:
    """The data array passed to Plotly.newPlot."""
    match = re.search(r'Plotly\.newPlot\(\s*"stitchsearch-plot",\s*(\[.*?\]),\s*\{', page, re.S)
    assert match, "no Plotly.newPlot call with the figure data"
    return json.loads(match.group(1))


def test_report_is_self_contained_escaped_and_complete(tmp_path):
    out = write_report(
        tmp_path / "reports" / "study.html",
        TRIALS,
        BUDGETS,
        study_name="fmnist <demo>",
        chosen=CHOSEN,
    )
    assert out == tmp_path / "reports" / "study.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    # plotly.js is embedded (no CDN), so the page opens offline.
    assert "Plotly.newPlot" in page
    assert len(page) > 1_000_000
    assert 'src="https://cdn.plot.ly' not in page
    # No raw user markup anywhere; the escaped names are there.
    assert "<script>alert" not in page
    assert "<b>resnet</b>" not in page
    assert html.escape(NASTY) in page
    assert html.escape("fmnist <demo>") in page
    assert html.escape("RuntimeError: shape mismatch <4x4>") in page
    # The chosen table names every device, its trial and configuration.
    chosen_html = page.split("<h2>Chosen configuration per device</h2>")[1].split("<h2>")[0]
    for device, number in CHOSEN.items():
        assert html.escape(device) in chosen_html
        if number is not None:
            assert f"#{number}" in chosen_html
    assert html.escape("zoo:resnet-s[:3] -> zoo:vit-l[2:]") in chosen_html
    assert "nothing fits this device" in chosen_html
    assert "MACs ≤ 2.50M" in chosen_html
    # Counts by state.
    states = page.split("<h2>Trials by state</h2>")[1].split("<h2>")[0]
    for state, n in {"COMPLETE": 5, "PRUNED": 1, "FAIL": 1, "RUNNING": 1, "WAITING": 1}.items():
        assert f'<td>{state}</td><td class="num">{n}</td>' in states
    # Trials the plot cannot show are listed: failed, running, waiting.
    unplotted = page.split("<h2>Trials not on the plot")[1]
    for number in (5, 6, 7):
        assert f"#{number}</td>" in unplotted
    for number in (0, 1, 2, 3, 4, 8):
        assert f"#{number}</td>" not in unplotted


def test_figure_traces(tmp_path):
    page = write_report(
        tmp_path / "r.html", TRIALS, BUDGETS, study_name="s", chosen=CHOSEN, title="T"
    ).read_text(encoding="utf-8")
    assert "<title>T</title>" in page
    data = figure_json(page)
    by_name = {t.get("name", ""): t for t in data}

    def trace(prefix):
        hits = [t for n, t in by_name.items() if n.startswith(prefix)]
        assert len(hits) == 1, (prefix, list(by_name))
        return hits[0]

    assert trace("complete, fits a device")["x"] == [1_950_000, 9_300_000, 4_100_000]
    assert trace("complete, fits no device")["x"] == [60_000_000]
    assert trace("complete, budgets not checked")["x"] == [3_000_000]
    pruned = trace("pruned")
    assert pruned["x"] == [3_300_000]
    assert pruned["y"][0] < 85.0  # below every accuracy
    assert "CKA: 0.120" in pruned["hovertext"][0]
    assert "ranks 9 of 10" in pruned["hovertext"][0]
    assert "&lt;b&gt;resnet&lt;/b&gt;" in trace("complete, fits no device")["hovertext"][0]
    # Anchors ringed; Pareto front a step line sorted by MACs.
    assert sorted(trace("anchors")["x"]) == [1_950_000, 9_300_000]
    front = trace("Pareto front")
    assert front["x"] == [1_950_000, 4_100_000, 9_300_000]
    assert front["line"]["shape"] == "hv"
    # Budget lines (devices with a MACs limit) and chosen points.
    mcu_line = trace("cortex-m7-mcu: MACs")
    assert mcu_line["x"] == [2.5e6, 2.5e6] and mcu_line["line"]["dash"] == "dash"
    assert trace("tiny-sensor: MACs")["x"] == [1e5, 1e5]
    assert not [n for n in by_name if n.startswith("edge-server: MACs")]
    assert trace("cortex-m7-mcu: chosen #0")["x"] == [1_950_000]
    assert trace("edge-server: chosen #1")["x"] == [9_300_000]
    nasty = trace(html.escape(NASTY, quote=False) + ": chosen #2")
    assert nasty["x"] == [4_100_000]
    symbols = [t["marker"]["symbol"] for n, t in by_name.items() if ": chosen #" in n]
    assert len(set(symbols)) == len(symbols) == 3
    assert layout_is_log(page)


def layout_is_log(page: str) -> bool:
    return '"type":"log"' in page.replace(" ", "")


def test_empty_trial_list_still_writes_a_valid_report(tmp_path):
    out = write_report(tmp_path / "empty.html", [], BUDGETS, study_name="empty", chosen={})
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "Plotly.newPlot" in page
    assert "no trials yet" in page
    assert '<tr><th>total</th><td class="num">0</td></tr>' in page
    assert "<script>alert" not in page
    data = figure_json(page)
    assert {t["name"] for t in data} >= {"cortex-m7-mcu: MACs ≤ 2.50M"}


def test_no_budgets_and_unknown_chosen_trial(tmp_path):
    page = write_report(
        tmp_path / "x.html", TRIALS[:2], [], study_name="s", chosen={"ghost": 99}
    ).read_text(encoding="utf-8")
    assert "trial #99 is not in this study" in page
    assert "ghost" in page


def test_rewrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "r.html"
    path.write_text("old")
    write_report(path, TRIALS, BUDGETS, study_name="s", chosen=CHOSEN)
    write_report(path, TRIALS[:3], BUDGETS, study_name="s", chosen=CHOSEN)
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    assert "Plotly.newPlot" in path.read_text(encoding="utf-8")


def figure_layout(page: str) -> dict:
    """The layout passed to Plotly.newPlot (after the data array)."""
    start = page.index("Plotly.newPlot(\n") if "Plotly.newPlot(\n" in page else None
    start = page.index("Plotly.newPlot(") if start is None else start
    decoder = json.JSONDecoder()
    i = page.index("[", start)
    _, end = decoder.raw_decode(page, i)
    i = page.index("{", end)
    layout, _ = decoder.raw_decode(page, i)
    return layout


def test_first_view_zooms_on_fronts_anchors_and_picks_with_labels_apart(tmp_path):
    # Issue 25: the interesting points are no longer squeezed into the top of the axis, and
    # the device labels no longer sit on the anchors' labels at the top.
    page = write_report(
        tmp_path / "r.html", TRIALS, BUDGETS, study_name="s", chosen=CHOSEN
    ).read_text(encoding="utf-8")
    data, layout = figure_json(page), figure_layout(page)
    first = layout["yaxis"]["range"]
    assert 85.0 < first[0] < 88.1 and first[1] > 90.4  # worse trials below the first view
    buttons = layout["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["fronts, anchors and picks", "all trials"]
    assert buttons[0]["args"][0]["yaxis.range"] == first
    full = buttons[1]["args"][0]["yaxis.range"]
    pruned = next(t for t in data if t.get("name", "").startswith("pruned"))
    assert full[0] < pruned["y"][0] < 85.0 < full[1]  # every trial reachable
    # Budget labels upright at the foot of their lines, in their device's colour.
    labels = [a for a in layout["annotations"] if a.get("textangle") == -90]
    assert sorted(a["text"] for a in labels) == sorted(
        ["cortex-m7-mcu", html.escape(NASTY, quote=False), "tiny-sensor"]
    )
    assert all(a["yref"] == "paper" and a["y"] < 0.05 for a in labels)
    # One label per picked point, below it (the anchors' labels are above theirs).
    texts = next(t for t in data if t.get("name") == "chosen (labels)")
    assert len(texts["text"]) == 3
    assert all(p.startswith("bottom") for p in texts["textposition"])
    anchor_labels = next(t for t in data if t.get("name") == "anchors")["textposition"]
    assert all(p.startswith("top") for p in anchor_labels)
    assert not any(t.get("mode") == "lines+text" for t in data)


def test_one_label_names_every_device_that_chose_a_point(tmp_path):
    budgets = [DeviceBudget("a", max_macs=1e7), DeviceBudget("b", max_macs=2e7)]
    page = write_report(
        tmp_path / "r.html", TRIALS, budgets, study_name="s", chosen={"a": 1, "b": 1}
    ).read_text(encoding="utf-8")
    texts = next(t for t in figure_json(page) if t.get("name") == "chosen (labels)")
    assert texts["text"] == ["a, b → #1"]


def test_an_anchor_trained_in_the_family_is_labelled_below_its_ring(tmp_path):
    # Its family point sits above the ring with the pick's label below it: the anchor's own
    # label goes below the ring, so the two do not overlap.
    retrained = {
        **TRIALS[0],
        "rung": 2,
        "val_acc": 89.3,
        "lower_val_acc": 88.1,
        "label": "zoo:resnet-s",
    }
    page = write_report(
        tmp_path / "r.html", [*TRIALS, retrained], BUDGETS, study_name="s", chosen=CHOSEN
    ).read_text(encoding="utf-8")
    anchors = next(t for t in figure_json(page) if t.get("name") == "anchors")
    where = dict(zip(anchors["x"], anchors["textposition"], strict=True))
    assert where[1_950_000].startswith("bottom") and where[9_300_000].startswith("top")
