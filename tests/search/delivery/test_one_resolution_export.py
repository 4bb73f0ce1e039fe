"""Exports and ONNX of a stitch of anchors with different native input sizes (issue 14)."""

from __future__ import annotations

import pytest
import torch

from evaluators import accuracy, synthetic_splits
from search.delivery import export_onnx, verify_onnx
from space import Candidate, load_export, read_export
from tests.space.test_export import _checkpointed, make_export


@pytest.mark.parametrize("order", ["small_first", "large_first"])
def test_export_and_onnx_of_two_native_sizes(order, tmp_path) -> None:
    torch.set_num_threads(1)
    small = _checkpointed("resnet", tmp_path, "safetensors", (3, 32, 32))
    large = _checkpointed("convnext", tmp_path, "safetensors", (3, 48, 48))
    front, back = (small, large) if order == "small_first" else (large, small)
    size = front[0].input_size
    data = synthetic_splits(
        num_classes=10, input_size=size, calibration=32, validation=32, test=32, batch_size=16
    )
    anchors = {front[0].name: front, back[0].name: back}
    cand = Candidate(front[0].name, back[0].name, 2, 1)
    path, result = make_export(tmp_path / order, "dev", cand, anchors, data)
    loaded = read_export(path)
    assert tuple(loaded.input_size) == tuple(size)
    net = load_export(path)
    assert accuracy(net, data.test).top1 == pytest.approx(result.test_acc)
    onnx = export_onnx(net, tmp_path / f"{order}.onnx", input_size=size)
    assert verify_onnx(net, onnx, input_size=size) < 1e-3


@pytest.mark.parametrize("kind", ["cnn_vit", "vit_cnn", "anchor"])
def test_export_at_a_searched_resolution(kind, tmp_path) -> None:
    # Issue 14, item 2: the export records the candidate's resolution, and load_export,
    # ONNX and the accuracy it reproduces are at that resolution (48 px; natives are 32).
    torch.set_num_threads(1)
    cnn = _checkpointed("resnet", tmp_path, "safetensors")
    vit = _checkpointed("vit", tmp_path, "safetensors")
    front, back = (cnn, vit) if kind != "vit_cnn" else (vit, cnn)
    data = synthetic_splits(
        num_classes=10,
        input_size=(3, 32, 32),
        calibration=32,
        validation=32,
        test=32,
        batch_size=16,
    )
    anchors = {front[0].name: front, back[0].name: back}
    if kind == "anchor":
        cand = Candidate.anchor(vit[0].name, 48)
    else:
        cand = Candidate(front[0].name, back[0].name, 2, 1, 48)
    path, result = make_export(tmp_path / kind, "dev", cand, anchors, data)
    assert result.input_size == [3, 48, 48]
    loaded = read_export(path)
    assert loaded.typed_manifest.candidate == cand
    assert tuple(loaded.input_size) == (3, 48, 48)
    net = load_export(path)
    test = accuracy(net, data.test, input_size=loaded.input_size)
    assert test.top1 == pytest.approx(result.test_acc)
    onnx = export_onnx(net, tmp_path / f"{kind}.onnx", input_size=loaded.input_size)
    assert verify_onnx(net, onnx, input_size=loaded.input_size) < 1e-3
