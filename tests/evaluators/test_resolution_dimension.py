"""A candidate evaluated at a searched input resolution (issue 14, item 2).

Accuracy, MACs, parameters, latency and memory are measured at the candidate's resolution,
and a device latency table holds every part at each resolution of the study.
"""

from __future__ import annotations

import pytest
import torch

from evaluators import (
    LatencyTable,
    accuracy,
    count_macs,
    evaluate_candidate,
    profile_parts,
    synthetic_splits,
    torch_runner,
)
from search.core import SearchSpace
from space import Candidate, adapt_images
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    cnn, vit = make_tiny("resnet"), make_tiny("vit", seed=1)
    data = synthetic_splits(
        num_classes=10, input_size=(3, 28, 28), calibration=32, validation=32, test=8, batch_size=16
    )
    return {cnn.name: cnn, vit.name: vit}, data


@pytest.mark.parametrize("kind", ["stitch", "anchor"])
def test_costs_are_measured_at_the_resolution(setup, kind) -> None:
    anchors, data = setup
    cnn, vit = anchors.values()
    cand = Candidate(cnn.name, vit.name, 2, 1) if kind == "stitch" else Candidate.anchor(vit.name)
    results = {}
    for r in (32, 48):
        res = evaluate_candidate(cand.config, anchors, data, threads=1, resolution=r)
        assert res.input_size == [3, r, r]
        assert res.latency_ms > 0 and res.memory_mb > 0
        results[r] = res
    native = evaluate_candidate(cand.config, anchors, data, threads=1, measure_latency=False)
    assert native.input_size == [3, 32, 32] and native.macs == results[32].macs
    # A ViT's and a ResNet's MACs grow with the number of pixels (tokens, feature maps).
    assert results[48].macs > 1.8 * results[32].macs
    assert results[48].macs == count_macs(results[48].net, (3, 48, 48))
    assert results[48].activation_mb > results[32].activation_mb
    # Accuracy is that of the network on images resized to 48 px.
    pre = [(adapt_images(x, (3, 48, 48)), y) for x, y in data.validation]
    assert accuracy(results[48].net, pre).top1 == pytest.approx(results[48].val_acc)


def test_an_anchor_that_cannot_run_at_the_resolution_says_why(setup) -> None:
    anchors, data = setup
    vit = list(anchors.values())[1]
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        evaluate_candidate(vit.name, anchors, data, threads=1, resolution=44)


def test_latency_table_holds_every_part_at_each_resolution(setup) -> None:
    anchors, _ = setup
    depths = {n: a.num_blocks for n, a in anchors.items()}
    cands = SearchSpace(depths, [32, 48]).all_candidates()
    table = profile_parts(
        anchors,
        cands,
        device="dev",
        study_name="res",
        host={},
        runtimes={"torch": torch_runner},
        warmup=1,
        rounds=2,
        calibration=2,
    )
    assert table.missing_parts(cands) == []
    parts = table.runtimes["torch"]["1"]["parts"]
    for name, a in anchors.items():
        for r in (32, 48):
            assert f"anchor|{name}@{r}" in parts
            assert {f"prefix|{name}|{k}@{r}" for k in range(1, a.num_blocks + 1)} <= set(parts)
            assert {f"suffix|{name}|{j}@{r}" for j in range(a.num_blocks)} <= set(parts)
        assert f"anchor|{name}" not in parts  # this study never runs at the native size
        assert f"prefix|{name}|1" not in parts
    rec = table.anchors[next(iter(anchors))]
    assert set(rec["cuts_at"]) == {"32", "48"}
    assert len(table.runtimes["torch"]["1"]["fit"]["networks"]) == 2 * 2 + 2
    at48 = [c for c in cands if c.resolution == 48]
    assert all(table.predict(c) > 0 for c in at48)
    stitch = next(c for c in at48 if not c.is_anchor)
    keys = table.runtimes["torch"]["1"]["parts"]
    assert f"prefix|{stitch.front}|{stitch.front_block}@48" in keys
    assert table.missing_parts([stitch]) == []
    # Round trip through JSON, and a native table lacks the parts of another resolution.
    again = LatencyTable.from_json(table.to_json())
    assert again.missing_parts(cands) == []
    native = SearchSpace(depths).all_candidates()
    assert table.missing_parts(native) != []
