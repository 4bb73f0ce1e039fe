from __future__ import annotations

import json

import pytest
from torch import nn

from evaluators import LatencyResult, measure_latency, measure_memory
from space import StitchConfig, build_stitched


def test_latency_result_is_ordered_and_short(tiny_anchor) -> None:
    model = tiny_anchor("resnet").model
    res = measure_latency(model, (3, 32, 32), warmup=1, repeats=7)
    assert isinstance(res, LatencyResult)
    assert res.repeats == 7 and res.batch_size == 1 and res.threads == 1
    assert 0 < res.p10_ms <= res.p25_ms <= res.median_ms <= res.p75_ms <= res.p90_ms
    assert res.iqr_ms == pytest.approx(res.p75_ms - res.p25_ms)
    assert json.loads(json.dumps(res.to_dict()))["iqr_ms"] >= 0
    # A time cap stops after min_repeats.
    capped = measure_latency(model, (3, 32, 32), warmup=0, repeats=50, min_repeats=3, max_seconds=0)
    assert capped.repeats == 3
    assert not model.training


def test_latency_at_a_larger_batch(tiny_anchor) -> None:
    anchor = tiny_anchor("vit")
    net = build_stitched(anchor, anchor, StitchConfig(anchor.name, anchor.name, 1, 1))
    net.train()
    res = measure_latency(net, anchor.input_size, batch_size=4, warmup=1, repeats=3)
    assert res.batch_size == 4 and res.per_image_ms == pytest.approx(res.median_ms / 4)
    assert net.stitch.training and not anchor.model.training  # modes restored
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        measure_latency(net, anchor.input_size, batch_size=0)


def test_peak_activation_memory_of_a_known_mlp() -> None:
    model = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(), nn.Linear(1000, 10))
    res = measure_memory(model, (10,), batch_size=4)
    hidden = 4 * 1000 * 4  # float32 (4, 1000)
    # Linear output and ReLU output are alive together; then the last (4, 10) output.
    assert res.peak_activation_bytes == 2 * hidden
    assert res.param_bytes == 4 * (10 * 1000 + 1000 + 1000 * 10 + 10)
    assert res.total_bytes == res.peak_activation_bytes + res.param_bytes
    assert res.method == "dispatch"
    inplace = nn.Sequential(nn.Linear(10, 1000), nn.ReLU(inplace=True), nn.Linear(1000, 10))
    assert measure_memory(inplace, (10,), batch_size=4).peak_activation_bytes == hidden + 4 * 10 * 4


def test_memory_grows_with_batch_and_counts_given_parameters(tiny_anchor) -> None:
    anchor = tiny_anchor("resnet")
    one = measure_memory(anchor.model, anchor.input_size)
    eight = measure_memory(anchor.model, anchor.input_size, batch_size=8)
    assert 0 < one.peak_activation_bytes < eight.peak_activation_bytes
    assert eight.peak_activation_bytes >= 6 * one.peak_activation_bytes
    head = list(anchor.model.fc.parameters())
    only = measure_memory(anchor.model, anchor.input_size, parameters=head)
    assert only.param_bytes == sum(p.numel() * 4 for p in head) < one.param_bytes


def test_memory_of_vit_and_stitched_net(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    net = build_stitched(front, back, StitchConfig(front.name, back.name, 2, 1))
    res = measure_memory(net, front.input_size)
    assert res.peak_activation_bytes > 0
    vit = measure_memory(back.model, back.input_size, batch_size=2)
    # at least the token sequence (B, L, C) in float32 is held
    tokens = 2 * back.feature_info(0).shape[0] * back.feature_info(0).shape[1] * 4
    assert vit.peak_activation_bytes >= tokens
    assert json.loads(json.dumps(vit.to_dict()))["total_bytes"] == vit.total_bytes
