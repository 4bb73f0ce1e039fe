"""An export written before the space/ restructuring loads after it, with the same outputs.

``data/old_export`` was written once by ``search.finish.write_export`` with the code of
commit cc5a969 (before the export module of ``space`` was split): a
``resnet10t[:2] -> vit_tiny[1:]`` stitch of seeded random anchors (no checkpoints: the
manifest records ``weights_sha256``), its fitted stitching layer, and the logits
``load_export`` returned then for a seeded input. Never regenerate it: its point is that it is old.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from space import StitchedNet, load_export, read_export

OLD = Path(__file__).resolve().parent / "data" / "old_export"


def _input() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_old_export_loads_with_the_recorded_logits() -> None:
    expected = torch.tensor(json.loads((OLD / "expected.json").read_text())["logits"])
    model = load_export(OLD / "old.json")
    assert isinstance(model, StitchedNet) and not model.training
    with torch.no_grad():
        got = model(_input())
    assert got.shape == expected.shape == (2, 10)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5), (got - expected).abs().max()


def test_old_export_reads_its_anchors_and_config() -> None:
    loaded = read_export(OLD / "old.json")
    assert loaded.config is not None and str(loaded.config) == (
        "resnet10t[:2] -> vit_tiny_patch16_224[1:]"
    )
    assert loaded.anchors["front"].checkpoint is None
    assert loaded.manifest["device"] == "old"
