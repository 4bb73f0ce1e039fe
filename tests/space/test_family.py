"""A stitched family: members, switching by name or budget, saving and loading verified."""

from __future__ import annotations

import json

import pytest
import torch

from space import (
    Candidate,
    ExportError,
    StitchedFamily,
    build_stitched,
    load_family,
    member_names,
    save_family,
)
from tests.conftest import make_tiny


def _family() -> StitchedFamily:
    cnn, vit = make_tiny("resnet"), make_tiny("vit")
    anchors = {cnn.name: cnn, vit.name: vit}
    stitches = [Candidate(cnn.name, vit.name, 2, 1), Candidate(vit.name, cnn.name, 1, 2)]
    members = member_names([Candidate.anchor(cnn.name), Candidate.anchor(vit.name), *stitches])
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    layers = {}
    for c in stitches:
        net = build_stitched(anchors[c.front], anchors[c.back], c.config, calibration=x)
        layers[c.label] = net.stitch
    metrics = {
        cnn.name: {"accuracy": 60.0, "macs": 5e6, "params": 4e6},
        vit.name: {"accuracy": 50.0, "macs": 1e6, "params": 1e5},
        stitches[0].label: {"accuracy": 58.0, "macs": 3e6, "params": 2e6},
        stitches[1].label: {"accuracy": 55.0, "macs": 2e6, "params": 3e5},
    }
    return StitchedFamily(anchors, members, layers, metrics=metrics)


def test_members_run_as_their_networks() -> None:
    family = _family().eval()
    x = torch.rand(4, 3, 32, 32)
    for name, c in family.members.items():
        with torch.no_grad():
            got = family(x, name)
            if c.is_anchor:
                want = family.anchors[c.front].model(x)
            else:
                front, back = family.anchors[c.front], family.anchors[c.back]
                h = family.stitch_of(name)(front.forward_front(x, c.front_block))
                want = back.forward_back(h, c.back_block)
        assert torch.equal(got, want), name
    family.switch(family.names[2])
    with torch.no_grad():
        assert torch.equal(family(x), family(x, family.names[2]))


def test_select_picks_the_most_accurate_member_within_the_budget() -> None:
    family = _family()
    names = family.names
    assert family.select(max_macs=2.5e6) == names[3]  # 55% at 2M beats 50% at 1M
    assert family.active == names[3]
    assert family.select(max_macs=2.5e6, max_params=2e5) == names[1]
    assert family.select() == names[0]
    assert family.select(names[2]) == names[2]
    with pytest.raises(ValueError, match="no member of the family fits"):
        family.select(max_macs=10)
    with pytest.raises(ValueError, match="not both"):
        family.select(names[0], max_macs=1e9)
    with pytest.raises(KeyError, match="no member"):
        family.switch("nobody")


def test_a_member_at_another_anchor_or_without_its_layer_is_refused() -> None:
    family = _family()
    anchors = dict(family.anchors)
    cnn = next(iter(anchors))
    with pytest.raises(ValueError, match="not one of the family's anchors"):
        StitchedFamily(anchors, {"x": Candidate("other", cnn, 1, 1)}, {})
    c = family.members[family.names[2]]
    with pytest.raises(ValueError, match="has no stitching layer"):
        StitchedFamily(anchors, {c.label: c}, {})


def test_saving_and_loading_gives_the_same_family(tmp_path) -> None:
    family = _family()
    with torch.no_grad():  # pretend training changed an anchor
        next(family.anchors[family.names[0]].model.parameters()).add_(0.01)
    path = save_family(family, tmp_path / "fam" / "family.json", training={"epochs": 3})
    doc = json.loads(path.read_text())
    weights = [a["trained"]["weights"] for a in doc["anchors"]]
    assert all(w.startswith("anchors/") for w in weights)
    assert all((path.parent / w).is_file() for w in weights)
    loaded = load_family(path).eval()
    x = torch.rand(4, 3, 32, 32)
    for name in family.names:
        with torch.no_grad():
            assert torch.equal(loaded(x, name), family.eval()(x, name)), name
    assert loaded.metrics == family.metrics
    assert all(a.trained_sha256 for a in loaded.anchors.values())
    # Saving again writes no second copy of an anchor's weights.
    save_family(loaded, path)
    assert len(list((path.parent / "anchors").glob("*.safetensors"))) == 2


def test_an_altered_anchor_file_is_refused_by_name(tmp_path) -> None:
    path = save_family(_family(), tmp_path / "family.json")
    doc = json.loads(path.read_text())
    target = path.parent / doc["anchors"][1]["trained"]["weights"]
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"anchors\[1\]\.trained\.sha256"):
        load_family(path)


def test_a_family_file_of_another_format_is_refused(tmp_path) -> None:
    path = save_family(_family(), tmp_path / "family.json")
    doc = json.loads(path.read_text())
    doc["format"] = "stitchsearch-family/0"
    path.write_text(json.dumps(doc))
    with pytest.raises(ExportError, match="unsupported format"):
        load_family(path)
