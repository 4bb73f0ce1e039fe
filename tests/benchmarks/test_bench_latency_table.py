"""The latency-table benchmark: its judgement by hand, and one quick run on the tiny study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_latency_table import judge, main

STUDY = Path(__file__).resolve().parents[1] / "search" / "data" / "tiny_study.yaml"


def test_judge_against_the_first_measurement_and_the_ceiling() -> None:
    # Five candidates; the anchors are the first three measurements (1, 2, 3 ms).
    first = [1.0, 2.0, 3.0, 4.0, 5.0]
    second = [1.05, 2.0, 3.5, 4.0, 5.0]  # candidate 3 disagrees with itself by 16.7%
    predicted = [1.05, 2.5, 3.0, 3.9, 5.6]  # errors 5%, 25%, 0%, 2.5%, 12%
    std = [0.1, 0.2, 0.1, 0.06, 0.4]  # |error| / std: 0.5, 2.5, 0, 1.7, 1.5
    upper = [1.1, 2.9, 3.2, 4.0, 6.0]
    res = judge(predicted, std, first, second, first[:3], upper)
    assert res["candidates"] == 5
    assert res["within"] == {"10%": pytest.approx(3 / 5), "20%": pytest.approx(4 / 5)}
    assert res["ceiling_10pct"] == pytest.approx(4 / 5)
    assert res["within_10pct_of_ceiling"] == pytest.approx(3 / 4)
    assert res["median_abs_error_pct"] == pytest.approx(5.0)
    assert res["max_abs_error_pct"] == pytest.approx(25.0)
    # Budgets at the anchors' 25th, 50th, 75th percentiles: 1.5, 2, 2.5 ms.
    feas = res["feasibility"]
    assert feas["budgets_ms"] == pytest.approx([1.5, 2.0, 2.5])
    # Measured fits: [T,F,F,F,F], [T,T,F,F,F], [T,T,F,F,F]; predicted: [T,F,F,F,F],
    # [T,F,F,F,F], [T,T,F,F,F]: one of 15 decisions differs.
    assert feas["agreement"] == pytest.approx(14 / 15)
    assert feas["ceiling"] == pytest.approx(1.0)
    assert res["coverage"] == {"1_std": pytest.approx(2 / 5), "2_std": pytest.approx(4 / 5)}
    # At the median budget (2 ms): the median lets in candidate 0 only (fine); the 0.9
    # quantile too.
    q = res["quantile_0_9"]
    assert (q["fits_median"], q["too_slow_median"], q["fits_q09"], q["too_slow_q09"]) == (
        1,
        0,
        1,
        0,
    )
    assert res["kendall_tau"] == pytest.approx(1.0)


def test_a_quick_run_on_the_tiny_study(tmp_path) -> None:
    out, md = tmp_path / "lt.json", tmp_path / "B.md"
    argv = ["--study", str(STUDY), "--quick", "--sample", "6", "--out", str(out)]
    assert main([*argv, "--md", str(md)]) == 0
    res = json.loads(out.read_text())
    b = res["batches"]["1"]
    assert b["candidates"] == 2 + 6 and len(b["rows"]) == 8
    assert 0 <= b["within"]["10%"] <= 1 and 0 <= b["ceiling_10pct"] <= 1
    assert all(r["first_ms"] > 0 and r["second_ms"] > 0 for r in b["rows"])
    assert res["settings"]["rounds"] == 4 and b["noise"]["floor_pct"] >= 0
    text = md.read_text()
    assert "BEGIN latency_table -->" in text and "machine's ceiling" in text
