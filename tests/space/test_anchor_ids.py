"""Anchor ids (issue 25): two checkpoints of one architecture told apart by the id they carry.

The id is what candidates, labels and exports call an anchor (:attr:`space.Anchor.name`);
the timm name it is built from is :attr:`space.Anchor.model_name`. An export records both
with the checkpoint's SHA-256 and rebuilds from them; an export written before ids existed
(no ``id`` field) loads with id = name.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluators import accuracy, synthetic_splits
from space import (
    AnchorRecord,
    Candidate,
    ExportError,
    InputError,
    StitchedFamily,
    StitchedNet,
    build_stitched,
    file_sha256,
    load_anchor,
    load_export,
    load_family,
    member_names,
    read_export,
    save_family,
)
from tests.conftest import TINY, make_tiny
from tests.space.test_export import copy_export, edit, make_export
from tests.space.test_old_export import OLD

NAME, KWARGS, SIZE = TINY["resnet"]


def _save(path: Path, seed: int) -> Path:
    state = {k: v.contiguous() for k, v in make_tiny("resnet", seed).model.state_dict().items()}
    save_file(state, str(path))
    return path


def test_load_anchor_takes_an_id_apart_from_the_timm_name(tmp_path) -> None:
    ckpt = _save(tmp_path / "b.safetensors", seed=1)
    plain = load_anchor(NAME, **KWARGS)
    assert (plain.name, plain.model_name) == (NAME, NAME)
    other = load_anchor(NAME, anchor_id="resnet10t-b", checkpoint=ckpt, **KWARGS)
    assert (other.name, other.model_name) == ("resnet10t-b", NAME)
    assert other.identity.startswith("resnet10t-b@")
    assert "model_name='resnet10t'" in repr(other)
    # The view at another size keeps both.
    view = other.at_resolution(48)
    assert (view.name, view.model_name) == ("resnet10t-b", NAME)
    zoo = load_anchor("zoo:resnet-s", anchor_id="small")
    assert (zoo.name, zoo.model_name) == ("small", "zoo:resnet-s")


@pytest.mark.parametrize("bad", ["", "a/b", "a\\b", "../up", "two words", "x[1]", "a" * 65])
def test_load_anchor_refuses_an_invalid_id(bad) -> None:
    with pytest.raises(InputError, match="anchor_id") as err:
        load_anchor(NAME, anchor_id=bad, **KWARGS)
    assert "\n" not in str(err.value)


def test_two_checkpoints_of_one_architecture_export_and_load_both_ways(tmp_path) -> None:
    anchors = {}
    for anchor_id, seed in (("r10-a", 0), ("r10-b", 1)):
        ckpt = _save(tmp_path / f"{anchor_id}.safetensors", seed)
        kw = {"anchor_id": anchor_id, "checkpoint": str(ckpt), "input_size": SIZE, **KWARGS}
        anchors[anchor_id] = (load_anchor(NAME, **kw), kw)
    a, b = anchors["r10-a"][0], anchors["r10-b"][0]
    assert a.weights_sha256 != b.weights_sha256
    data = synthetic_splits(
        num_classes=10, input_size=SIZE, calibration=32, validation=48, test=64, batch_size=32
    )
    for front, back, device in (("r10-a", "r10-b", "ab"), ("r10-b", "r10-a", "ba")):
        path, result = make_export(
            tmp_path / device, device, Candidate(front, back, 2, 2), anchors, data
        )
        doc = json.loads(path.read_text())
        assert doc["label"].startswith(f"{front}[:2] -> {back}[2:]")
        recs = doc["anchors"]
        assert [(r["id"], r["name"]) for r in recs] == [(front, NAME), (back, NAME)]
        for r, anchor_id in zip(recs, (front, back), strict=True):
            assert r["checkpoint_sha256"] == file_sha256(tmp_path / f"{anchor_id}.safetensors")
        loaded = read_export(path)
        assert isinstance(loaded.model, StitchedNet)
        assert loaded.anchors["front"] is not loaded.anchors["back"]
        assert [(x.name, x.model_name) for x in loaded.anchors.values()] == [
            (front, NAME),
            (back, NAME),
        ]
        assert accuracy(loaded.model, data.test).top1 == result.test_acc
        x = next(iter(data.test))[0][:4]
        with torch.no_grad():
            assert torch.equal(loaded.model(x), result.net(x))
        # Swapping the two records' checkpoints is caught by their SHA-256.
        swapped = edit(
            copy_export(path, tmp_path / f"swapped-{device}"),
            lambda d: d["anchors"][0].update(checkpoint=d["anchors"][1]["checkpoint"]),
        )
        with pytest.raises(ExportError, match=r"anchors\[0\]\.checkpoint_sha256"):
            load_export(swapped)


def test_an_export_with_an_invalid_or_other_id_is_refused(tmp_path) -> None:
    ckpt = _save(tmp_path / "b.safetensors", seed=1)
    kw = {"anchor_id": "r10-b", "checkpoint": str(ckpt), "input_size": SIZE, **KWARGS}
    plain = {"checkpoint": str(_save(tmp_path / "a.safetensors", 0)), "input_size": SIZE, **KWARGS}
    anchors = {"r10-b": (load_anchor(NAME, **kw), kw), NAME: (load_anchor(NAME, **plain), plain)}
    data = synthetic_splits(
        num_classes=10, input_size=SIZE, calibration=32, validation=48, test=64, batch_size=32
    )
    path, _ = make_export(tmp_path, "dev", Candidate("r10-b", NAME, 1, 2), anchors, data)
    assert "id" not in json.loads(path.read_text())["anchors"][1]  # id = name: not written
    bad = edit(copy_export(path, tmp_path / "bad"), lambda d: d["anchors"][0].update(id="a/b"))
    with pytest.raises(ExportError, match=r"anchors\[0\]\.id.*'a/b' is not a valid anchor id"):
        load_export(bad)
    other = edit(copy_export(path, tmp_path / "other"), lambda d: d["anchors"][0].update(id="x"))
    with pytest.raises(ExportError, match=r"anchors\[0\]\.id.*'x' but the candidate's front"):
        load_export(other)


def test_an_export_written_before_ids_loads_with_id_equal_to_name() -> None:
    doc = json.loads((OLD / "old.json").read_text())
    assert all("id" not in r for r in doc["anchors"])  # the old format: no ids
    loaded = read_export(OLD / "old.json")
    for rec, role in zip(doc["anchors"], ("front", "back"), strict=True):
        anchor = loaded.anchors[role]
        assert anchor.name == anchor.model_name == rec["name"]
    records = loaded.typed_manifest.anchors
    assert all(isinstance(r, AnchorRecord) and r.id == r.name for r in records)
    assert all("id" not in r.to_dict() for r in records)


def test_a_family_of_two_checkpoints_of_one_architecture_saves_and_loads(tmp_path) -> None:
    anchors = {
        anchor_id: load_anchor(NAME, anchor_id=anchor_id, seed=seed, input_size=SIZE, **KWARGS)
        for anchor_id, seed in (("r10-a", 0), ("r10-b", 1))
    }
    stitches = [Candidate("r10-a", "r10-b", 2, 2), Candidate("r10-b", "r10-a", 1, 3)]
    x = torch.rand(8, *SIZE, generator=torch.Generator().manual_seed(0))
    layers = {
        c.label: build_stitched(anchors[c.front], anchors[c.back], c.config, calibration=x).stitch
        for c in stitches
    }
    members = member_names([Candidate.anchor("r10-a"), Candidate.anchor("r10-b"), *stitches])
    family = StitchedFamily(anchors, members, layers)
    with torch.no_grad():  # pretend training changed the anchors
        for a in anchors.values():
            next(a.model.parameters()).add_(0.01)
    path = save_family(family, tmp_path / "family.json")
    doc = json.loads(path.read_text())
    assert [(r["id"], r["name"]) for r in doc["anchors"]] == [("r10-a", NAME), ("r10-b", NAME)]
    loaded = load_family(path).eval()
    assert {k: (a.name, a.model_name) for k, a in loaded.anchors.items()} == {
        "r10-a": ("r10-a", NAME),
        "r10-b": ("r10-b", NAME),
    }
    for name in family.names:
        with torch.no_grad():
            assert torch.equal(loaded(x, name), family.eval()(x, name)), name
