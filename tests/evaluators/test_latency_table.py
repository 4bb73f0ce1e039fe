"""Device latency tables: prefixes, suffixes and anchors timed in context, and predictions."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from evaluators import (
    TABLE_FORMAT,
    LatencyTable,
    LatencyTableError,
    anchor_key,
    count_steps,
    part_keys,
    prefix_key,
    profile_parts,
    suffix_key,
    torch_runner,
)
from evaluators.latency_parts import fit_keys, split_cut
from evaluators.latency_profile import fit_overhead, fit_residual_pct
from evaluators.latency_timing import (
    apply_timing,
    current_affinity,
    noise_advice,
    noise_floor,
    parse_cpus,
    time_interleaved,
)
from search.core import SearchSpace
from space import Candidate
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def profiled():
    torch.set_num_threads(1)
    cnn, vit = make_tiny("resnet"), make_tiny("vit", seed=1)
    anchors = {cnn.name: cnn, vit.name: vit}
    candidates = SearchSpace({n: a.num_blocks for n, a in anchors.items()}).all_candidates()
    steps: list[str] = []
    table = profile_parts(
        anchors,
        candidates,
        device="dev",
        study_name="unit",
        host={},
        runtimes={"torch": torch_runner},
        warmup=1,
        rounds=2,
        calibration=3,
        on_step=steps.append,
    )
    # The progress bar's total is every timing made: the parts and the stitches end to end,
    # once per round, and the reference at the start, middle and end.
    total = count_steps(anchors, candidates, runtimes=1, batch_sizes=[1], calibration=3, rounds=2)
    assert len(steps) == total == (len(table.runtimes["torch"]["1"]["parts"]) + 3) * 2 + 3
    return anchors, candidates, table


def test_every_prefix_suffix_and_anchor_is_timed(profiled) -> None:
    anchors, candidates, table = profiled
    parts = table.runtimes["torch"]["1"]["parts"]
    assert table.missing_parts(candidates) == []
    for name, a in anchors.items():
        n = a.num_blocks
        assert n >= 2
        # A stitch cuts a front anchor after 1..n blocks and a back anchor before 0..n-1.
        assert {prefix_key(name, k) for k in range(1, n + 1)} <= set(parts)
        assert {suffix_key(name, j) for j in range(n)} <= set(parts)
        assert anchor_key(name) in parts
    # Nothing of the old per-block layout is left.
    assert not [k for k in parts if k.split("|")[0] in ("stem", "block", "head")]
    assert all(v["median_ms"] > 0 for v in parts.values())
    # A whole anchor takes longer than its first block alone, and its suffix from cut 0
    # (every block and the head) longer than its suffix from the last cut (the head).
    for name, a in anchors.items():
        assert parts[anchor_key(name)]["median_ms"] > parts[prefix_key(name, 1)]["median_ms"]
        last = suffix_key(name, a.num_blocks - 1)
        assert parts[suffix_key(name, 0)]["median_ms"] > parts[last]["median_ms"]


def test_a_bare_anchor_is_predicted_as_its_measurement(profiled) -> None:
    anchors, _, table = profiled
    entry = table.runtimes["torch"]["1"]
    fitted = {f["candidate"]: f for f in entry["fit"]["networks"]}
    for name in anchors:
        c = Candidate.anchor(name)
        assert part_keys(c, table.anchors) == [anchor_key(name)]
        measured = entry["parts"][anchor_key(name)]["median_ms"]
        assert table.predict(c) == measured
        # The fit relates the anchor's measurement to its prefix + suffix at the middle cut.
        m = split_cut(anchors[name].num_blocks)
        assert fit_keys(c, table.anchors) == [prefix_key(name, m), suffix_key(name, m)]
        assert fitted[c.label]["measured_ms"] == measured
        assert fitted[c.label]["parts_ms"] == pytest.approx(
            entry["parts"][prefix_key(name, m)]["median_ms"]
            + entry["parts"][suffix_key(name, m)]["median_ms"]
        )
    assert len(entry["fit"]["networks"]) == 2 + 3


def test_a_stitch_is_predicted_from_its_own_prefix_and_suffix(profiled) -> None:
    _, candidates, table = profiled
    doc = copy.deepcopy(table.to_dict())
    entry = doc["runtimes"]["torch"]["1"]
    # Every entry gets a value that says which it is: prefix k -> 1000 k, suffix j -> 10 j.
    marks = {"prefix": 1000.0, "suffix": 10.0}
    for key, timing in entry["parts"].items():
        kind, *rest = key.split("|")
        if kind in marks:
            timing["median_ms"] = marks[kind] * int(rest[1])
        else:
            timing["median_ms"] = {"stitch": 0.5, "anchor": 7.0}[kind]
    entry["scale"], entry["overhead_ms"] = 2.0, -0.25
    marked = LatencyTable.from_json(json.dumps(doc))
    stitches = [c for c in candidates if not c.is_anchor]
    assert stitches
    for c in stitches:
        keys = part_keys(c, marked.anchors)
        assert keys[0] == prefix_key(c.front, c.front_block)
        assert keys[1].startswith("stitch|")
        assert keys[2] == suffix_key(c.back, c.back_block)
        expected = 2.0 * (1000.0 * c.front_block + 0.5 + 10.0 * c.back_block) - 0.25
        assert marked.predict(c) == pytest.approx(expected)
    for c in candidates:
        if c.is_anchor:
            assert marked.predict(c) == 7.0  # no scale, no overhead
    # The real table: the fitted scale and overhead on the sum of the three entries.
    real = table.runtimes["torch"]["1"]
    c = stitches[len(stitches) // 2]
    total = sum(real["parts"][k]["median_ms"] for k in part_keys(c, table.anchors))
    assert table.predict(c) == pytest.approx(max(real["scale"] * total + real["overhead_ms"], 0))


def test_a_missing_prefix_is_named(profiled) -> None:
    anchors, candidates, table = profiled
    doc = copy.deepcopy(table.to_dict())
    name = next(iter(anchors))
    del doc["runtimes"]["torch"]["1"]["parts"][prefix_key(name, 1)]
    partial = LatencyTable.from_json(json.dumps(doc))
    assert partial.missing_parts(candidates) == [prefix_key(name, 1)]
    with pytest.raises(KeyError):
        partial.predict(next(c for c in candidates if c.front == name and c.front_block == 1))


def test_an_old_format_table_is_refused(profiled) -> None:
    _, _, table = profiled
    assert TABLE_FORMAT.endswith("/3")
    doc = table.to_dict()
    for old in ("stitchsearch-latency-table/1", "stitchsearch-latency-table/2"):
        doc["format"] = old
        with pytest.raises(LatencyTableError) as e:
            LatencyTable.from_json(json.dumps(doc))
        assert e.value.field == "format"
        assert f"'{old}' (an older table format" in str(e.value)
    assert "\n" not in str(e.value)
    doc["format"] = "something-else"
    with pytest.raises(LatencyTableError, match="not a latency table of this version"):
        LatencyTable.from_json(json.dumps(doc))


# A clamped fit says so (issue 26, item 5e).


def test_a_scale_out_of_range_falls_back_and_says_why() -> None:
    # 9x the parts: a scale far outside [0.5, 2] is replaced by 1 and the median difference.
    scale, overhead, why = fit_overhead([1.0, 2.0, 3.0], [1.0, 10.0, 19.0])
    assert (scale, overhead) == (1.0, 8.0)
    assert why.startswith("the fitted scale 9 is outside [0.5, 2]")
    assert why.endswith("scale 1 and the median difference +8.000 ms used")
    assert fit_overhead([1.0, 2.0, 3.0], [1.5, 2.5, 3.5]) == pytest.approx((1.0, 0.5, None))
    assert "2 network(s) timed end to end are too few" in fit_overhead([1.0, 2.0], [2.0, 3.0])[2]


# Issue 24: interleaved rounds, the noise floor, predictions with their uncertainty.


class _FakeClock:
    """A clock that logs which runner each timing was for and returns set times."""

    def __init__(self, ms: dict[str, list[float]]) -> None:
        self.ms = {k: list(v) for k, v in ms.items()}
        self.log: list[str] = []

    def __call__(self, run, calls: int) -> float:
        name = run()
        self.log.append(name)
        values = self.ms[name]
        return values.pop(0) if len(values) > 1 else values[0]


def test_every_round_times_every_runner_once_in_a_shuffled_order() -> None:
    names = [f"r{i}" for i in range(6)]
    runners = {n: (lambda n=n: n) for n in names}
    clock = _FakeClock({n: [1.0] for n in names})
    timings, ref = time_interleaved(runners, rounds=8, warmup=0, seed=3, clock=clock)
    assert ref is None
    # Three calls per runner size its loop, then the rounds.
    rounds_log = clock.log[3 * len(names) :]
    assert len(rounds_log) == 8 * len(names)
    orders = [rounds_log[i * 6 : (i + 1) * 6] for i in range(8)]
    assert all(sorted(o) == names for o in orders)  # each round: each runner once
    assert len({tuple(o) for o in orders}) > 1  # and not always in the same order
    assert all(t["rounds"] == 8 and t["median_ms"] == 1.0 for t in timings.values())


def test_a_slow_stretch_hits_every_runner_and_the_median_ignores_it() -> None:
    # Times per runner over 10 rounds: round 4 is 3x slow for all of them.
    base = {"a": 1.0, "b": 2.0}
    seq = {n: [v] * 3 + [v * (3 if r == 4 else 1) for r in range(10)] for n, v in base.items()}
    clock = _FakeClock(seq)
    timings, _ = time_interleaved(
        {n: (lambda n=n: n) for n in base}, rounds=10, warmup=0, clock=clock
    )
    assert timings["a"]["median_ms"] == 1.0 and timings["b"]["median_ms"] == 2.0
    assert timings["a"]["halves_ms"] == [1.0, 1.0]


def test_the_noise_floor_is_the_reference_drift_or_the_halves_disagreement() -> None:
    timings = {
        "a": {"halves_ms": [1.0, 1.02]},  # 2% apart
        "b": {"halves_ms": [2.0, 2.5]},  # 20% apart
        "c": {"halves_ms": [4.0, 4.16]},  # 3.8% apart
    }
    quiet = noise_floor(timings, {"name": "a", "times_ms": [1.0, 1.0, 1.01], "drift_pct": 1.0})
    assert quiet["halves_within_10pct"] == pytest.approx(2 / 3)
    assert quiet["halves_median_diff_pct"] == pytest.approx(100 * 0.16 / 4.16)
    assert quiet["floor_pct"] == pytest.approx(100 * 0.16 / 4.16) and not quiet["noisy"]
    assert noise_advice(quiet) is None
    drifting = noise_floor(timings, {"name": "a", "times_ms": [1, 1.2, 1.1], "drift_pct": 18.2})
    assert drifting["floor_pct"] == 18.2 and drifting["noisy"]
    advice = noise_advice(drifting)
    assert advice.startswith("warning: this machine's timings are noisy (floor ±18.2% > ±5%)")
    assert "close other jobs" in advice and "--threads 1 --cpus 0" in advice
    assert "frequency governor" in advice and "\n" not in advice


def test_a_profile_records_its_noise_floor_and_timing_settings(profiled) -> None:
    anchors, _, table = profiled
    entry = table.runtimes["torch"]["1"]
    noise = entry["noise"]
    assert noise["reference"]["name"] == anchor_key(next(iter(anchors)))
    assert len(noise["reference"]["times_ms"]) == 3
    assert noise["runners"] == len(entry["parts"]) + 3
    assert noise["floor_pct"] >= noise["halves_median_diff_pct"] >= 0
    assert table.noise == noise
    assert table.timing() == {
        "device_type": "cpu",
        "threads": 1,
        "affinity": table.settings["affinity"],
    }
    assert table.settings["rounds"] == 2
    assert all(p["std_ms"] >= 0 and len(p["halves_ms"]) == 2 for p in entry["parts"].values())
    assert entry["fit"]["residual_pct"] >= 0


def _marked(table, *, std: float, residual_pct: float, scale: float, overhead: float):
    """The table with every part at 1 ms +- ``std`` and the fit set by hand."""
    doc = copy.deepcopy(table.to_dict())
    entry = doc["runtimes"]["torch"]["1"]
    for timing in entry["parts"].values():
        timing["median_ms"], timing["std_ms"] = 1.0, std
    entry["scale"], entry["overhead_ms"] = scale, overhead
    entry["fit"]["residual_pct"] = residual_pct
    return LatencyTable.from_json(json.dumps(doc))


def test_a_prediction_carries_its_parts_spread_and_the_fit_error(profiled) -> None:
    _, candidates, table = profiled
    marked = _marked(table, std=0.1, residual_pct=5.0, scale=2.0, overhead=0.5)
    stitch = next(c for c in candidates if not c.is_anchor)
    anchor = next(c for c in candidates if c.is_anchor)
    # A stitch: 2 * (1 + 1 + 1) + 0.5 = 6.5 ms; parts add (2 * 0.3 = 0.6), the fit's 5% of
    # 6.5 = 0.325 in quadrature.
    value, std = marked.estimate(stitch)
    assert value == pytest.approx(6.5) and marked.predict(stitch) == pytest.approx(6.5)
    assert std == pytest.approx(math.hypot(0.6, 0.325))
    # A bare anchor: its own timing and spread, no fit.
    assert marked.estimate(anchor) == pytest.approx((1.0, 0.1))
    # Quantiles of a normal: the median is the prediction, 0.9 is 1.2816 std above.
    assert marked.quantile(stitch, 0.5) == pytest.approx(6.5)
    assert marked.quantile(stitch, 0.9) == pytest.approx(6.5 + 1.2815516 * std, rel=1e-6)
    assert marked.quantile(stitch, 0.1) == pytest.approx(6.5 - 1.2815516 * std, rel=1e-6)
    for q in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            marked.quantile(stitch, q)


def test_the_leave_one_out_error_is_out_of_sample() -> None:
    # Four points on a line: the fit is exact in and out of sample.
    assert fit_residual_pct([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]) == pytest.approx(0.0)
    # One outlier: the in-sample fit absorbs part of it; leaving it out shows it whole.
    xs, ys = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 3.0, 4.0, 5.0, 9.0]
    loo = fit_residual_pct(xs, ys)
    scale, overhead, _ = fit_overhead(xs, ys)
    in_sample = math.sqrt(
        sum(((scale * x + overhead - y) / y) ** 2 for x, y in zip(xs, ys, strict=True)) / 5
    )
    assert loo > in_sample * 100
    # Without the outlier the line (y = x + 1) predicts it as 6: 33% low.
    assert loo >= abs(6 - 9) / 9 * 100 / math.sqrt(5)
    assert fit_residual_pct([], []) == 0.0


NOISE_CASES = {
    "missing": (lambda e: e.pop("noise"), "noise", "missing: the noise floor"),
    "floor-not-a-number": (
        lambda e: e["noise"].update(floor_pct="low"),
        "noise.floor_pct",
        "must be a number >= 0, got 'low'",
    ),
    "floor-negative": (
        lambda e: e["noise"].update(floor_pct=-1),
        "noise.floor_pct",
        "got -1",
    ),
    "share-above-1": (
        lambda e: e["noise"].update(halves_within_10pct=1.5),
        "noise.halves_within_10pct",
        "must be a share between 0 and 1, got 1.5",
    ),
    "part-without-std": (
        lambda e: next(iter(e["parts"].values())).pop("std_ms"),
        "parts.",
        "must be a number >= 0, got None",
    ),
}


@pytest.mark.parametrize("name", list(NOISE_CASES))
def test_a_missing_or_malformed_noise_floor_is_named(profiled, name) -> None:
    _, _, table = profiled
    change, field, needle = NOISE_CASES[name]
    doc = copy.deepcopy(table.to_dict())
    change(doc["runtimes"]["torch"]["1"])
    with pytest.raises(LatencyTableError) as e:
        LatencyTable.from_json(json.dumps(doc))
    assert e.value.field.startswith("runtimes.torch.1.") and field in e.value.field
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cpu_lists_are_parsed_and_checked() -> None:
    assert parse_cpus("0") == [0]
    available = current_affinity()
    if available is not None and len(available) >= 2:
        a, b = available[:2]
        assert parse_cpus(f"{b},{a}") == sorted([a, b])
    for bad, needle in (("x", "not a CPU list"), ("3-1", "runs backwards"), ("", "not a CPU")):
        with pytest.raises(ValueError, match=needle):
            parse_cpus(bad)
    with pytest.raises(ValueError, match=r"CPU\(s\) \[4096\] are not available here"):
        parse_cpus("4096")


def test_apply_timing_sets_threads_and_restores_them() -> None:
    before = torch.get_num_threads()
    affinity = current_affinity()
    want = 1 if before != 1 else 2
    with apply_timing({"threads": want, "affinity": affinity[:1] if affinity else None}):
        assert torch.get_num_threads() == want
        if affinity:
            assert current_affinity() == affinity[:1]
    assert torch.get_num_threads() == before
    assert current_affinity() == affinity
