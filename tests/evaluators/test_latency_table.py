"""Device latency tables: prefixes, suffixes and anchors timed in context, and predictions."""

from __future__ import annotations

import copy
import json

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
from evaluators.latency_profile import fit_overhead
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
        repeats=2,
        calibration=3,
        on_step=steps.append,
    )
    # The progress bar's total is every timing made: the parts, then the stitches end to end.
    total = count_steps(anchors, candidates, runtimes=1, batch_sizes=[1], calibration=3)
    assert len(steps) == total == len(table.runtimes["torch"]["1"]["parts"]) + 3
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
    assert TABLE_FORMAT.endswith("/2")
    doc = table.to_dict()
    doc["format"] = "stitchsearch-latency-table/1"
    with pytest.raises(LatencyTableError) as e:
        LatencyTable.from_json(json.dumps(doc))
    assert e.value.field == "format"
    assert "'stitchsearch-latency-table/1' (an older table format" in str(e.value)
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
