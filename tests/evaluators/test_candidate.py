from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from evaluators import (
    CandidateResult,
    count_macs,
    count_params,
    evaluate_candidate,
    stitched_param_counts,
    synthetic_splits,
)
from space import StitchConfig, StitchedNet
from tests.conftest import make_tiny


@pytest.fixture(scope="module")
def data():
    return synthetic_splits(
        num_classes=10, calibration=32, validation=40, test=24, batch_size=16, seed=5
    )


def _anchors(tiny_anchor, *families):
    return {a.name: a for a in (tiny_anchor(f) for f in families)}


def test_stitch_candidate_end_to_end(tiny_anchor, data) -> None:
    anchors = _anchors(tiny_anchor, "resnet", "vit")
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    cfg = StitchConfig(front.name, back.name, 2, 1)
    matrix = np.arange(30, dtype=float).reshape(front.num_blocks + 1, -1)[:, : back.num_blocks + 1]
    before = {k: v.clone() for k, v in front.model.state_dict().items()}
    res = evaluate_candidate(
        cfg, anchors, data, fit_steps=3, cka_matrix=matrix, latency_batch=4, threads=1
    )
    assert isinstance(res, CandidateResult) and res.kind == "stitch"
    assert res.config == cfg.to_dict() and res.anchors == [front.name, back.name]
    assert 0.0 <= res.val_acc <= res.val_top5 <= 100.0 and res.val_images == 40
    assert res.test_acc is None and res.test_top5 is None
    assert isinstance(res.net, StitchedNet)
    assert res.macs == count_macs(res.net, front.input_size)
    counts = stitched_param_counts(res.net)
    assert res.params == counts["total"] and res.stitch_params == count_params(res.net.stitch) > 0
    assert res.params < count_params(front.model) + count_params(back.model) + res.stitch_params
    assert res.cka == matrix[2, 1]
    assert res.latency_ms > 0 and res.latency_spread_ms >= 0 and res.latency_batch_ms > 0
    assert res.latency_batch == 4
    assert res.memory_mb > res.activation_mb > 0
    assert set(res.fit_residual) == {"proj", "prefix"} and res.fit_steps == 3
    assert res.fit_seconds > 0 and res.eval_seconds > 0
    d = res.to_dict()
    assert "net" not in d and json.loads(json.dumps(d)) == d
    assert d["config"] == cfg.to_dict()
    assert all(torch.equal(before[k], v) for k, v in front.model.state_dict().items())
    assert torch.get_num_threads() == 1  # restored (the test fixture's setting)


def test_anchor_candidate(tiny_anchor, data) -> None:
    anchors = _anchors(tiny_anchor, "resnet", "vit")
    vit = tiny_anchor("vit")
    res = evaluate_candidate(vit.name, anchors, data, test=True, cka=0.5, measure_latency=False)
    assert res.kind == "anchor" and res.config is None and res.anchors == [vit.name]
    assert res.net is vit.model
    assert res.params == count_params(vit.model) and res.stitch_params == 0
    assert res.macs == count_macs(vit.model, vit.input_size)
    assert res.test_acc is not None and 0 <= res.test_acc <= 100
    assert res.latency_ms is None and res.memory_mb is None
    assert res.cka is None and res.fit_residual == {} and res.fit_seconds == 0.0
    assert json.loads(json.dumps(res.to_dict()))["kind"] == "anchor"


def test_cka_value_given_directly_and_bad_matrix(tiny_anchor, data) -> None:
    anchors = _anchors(tiny_anchor, "resnet")
    a = tiny_anchor("resnet")
    cfg = StitchConfig(a.name, a.name, 2, 2)
    res = evaluate_candidate(cfg, anchors, data, cka=0.25, measure_latency=False)
    assert res.cka == 0.25 and res.latency_ms is None
    with pytest.raises(ValueError, match=r"has no entry \[2, 2\]"):
        evaluate_candidate(cfg, anchors, data, cka_matrix=np.zeros((2, 2)))


def test_candidate_errors(tiny_anchor, data) -> None:
    anchors = _anchors(tiny_anchor, "resnet")
    a = tiny_anchor("resnet")
    with pytest.raises(ValueError, match="not among the loaded anchors"):
        evaluate_candidate(StitchConfig(a.name, "nope", 1, 1), anchors, data)
    with pytest.raises(ValueError, match="not among the loaded anchors"):
        evaluate_candidate("nope", anchors, data)
    few = synthetic_splits(num_classes=4, calibration=8, validation=8, test=8)
    with pytest.raises(ValueError, match="has 10 classes but the data 'synthetic' has 4"):
        evaluate_candidate(StitchConfig(a.name, a.name, 1, 1), anchors, few)
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        evaluate_candidate(a.name, anchors, data, threads=0)
    with pytest.raises(ValueError, match="latency_batch"):
        evaluate_candidate(a.name, anchors, data, latency_batch=0)


def test_non_finite_logits_raise(data) -> None:
    bad = make_tiny("resnet")
    with torch.no_grad():
        bad.model.fc.weight[0, 0] = float("nan")
    cfg = StitchConfig(bad.name, bad.name, 2, 2)
    with pytest.raises(ValueError, match="non-finite logits"):
        evaluate_candidate(cfg, {bad.name: bad}, data, measure_latency=False)


def test_threads_are_set_during_and_restored_after(tiny_anchor, data, monkeypatch) -> None:
    import evaluators.candidate as cand

    seen = []
    real = cand.accuracy

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(cand, "accuracy", spy)
    a = tiny_anchor("resnet")
    evaluate_candidate(a.name, {a.name: a}, data, threads=2, measure_latency=False)
    assert seen == [2] and torch.get_num_threads() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_candidate_on_cuda(data) -> None:
    front, back = make_tiny("resnet"), make_tiny("vit")
    cfg = StitchConfig(front.name, back.name, 2, 1)
    res = evaluate_candidate(cfg, {front.name: front, back.name: back}, data, device="cuda")
    assert res.device.startswith("cuda") and res.memory_mb > 0 and res.latency_ms > 0
    assert next(res.net.stitch.parameters()).is_cuda
