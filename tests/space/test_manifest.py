"""The export manifest as a typed value: built from parts, written, read back, validated."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest

from space import (
    AnchorRecord,
    Candidate,
    ExportError,
    ExportManifest,
    InputError,
    StitchRecord,
    anchor_record,
    load_export,
    read_export,
)
from space.manifest import DATA_OPTIONAL, MANIFEST_FIELDS
from tests.space.test_export import _add, build_exports, copy_export, edit

OLD = Path(__file__).resolve().parent / "data" / "old_export" / "old.json"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory)


def test_reading_and_writing_reproduces_the_file_byte_for_byte(exports) -> None:
    for path in [OLD, *(p for p, _, _ in exports.values())]:
        manifest = ExportManifest.read(path)
        assert manifest.to_json() == path.read_text(), path
        assert manifest.path == path
        assert ExportManifest.from_json(path.read_text()) == manifest
        assert set(manifest.to_dict()) == MANIFEST_FIELDS


def test_a_manifest_built_from_parts_is_what_the_search_writes(exports) -> None:
    path = exports["cnn_vit"][0]
    loaded = read_export(path)
    m = loaded.typed_manifest
    built = ExportManifest(
        device=m.device,
        final=True,
        budget=m.budget,
        headroom=m.headroom,
        candidate=Candidate(m.candidate.front, m.candidate.back, 2, 1),
        anchors=[
            AnchorRecord.of(loaded.anchors["front"], "front"),
            AnchorRecord.of(loaded.anchors["back"], "back"),
        ],
        stitch=StitchRecord.of(loaded.model.stitch, path.parent / m.stitch.weights),
        metrics=m.metrics,
        data=m.data,
        fit=m.fit,
        study=m.study,
        created=m.created,
    )
    assert built == m and built.label == m.label
    assert built.to_json() == path.read_text()
    assert anchor_record(loaded.anchors["back"], "back") == m.anchors[1].to_dict()


def test_bare_anchor_records_and_zoo_records() -> None:
    m = ExportManifest.read(OLD)
    assert m.anchors[0].timm_kwargs == {"num_classes": 10} and not m.anchors[0].is_zoo
    bare = ExportManifest(
        device="d",
        candidate=Candidate.anchor(m.anchors[0].name),
        anchors=m.anchors[:1],
        stitch=None,
        budget={},
        headroom={},
        metrics={},
        data={},
        fit={},
        study={},
    )
    assert bare.label == "resnet10t (anchor)" and bare.to_dict()["stitch"] is None
    assert ExportManifest.from_json(bare.to_json()) == bare
    with pytest.raises(ValueError, match="2 anchor record"):
        dataclasses.replace(bare, candidate=m.candidate)


def test_data_recipe_is_optional_and_opaque(exports, tmp_path) -> None:
    assert "recipe" in DATA_OPTIONAL
    path = exports["cnn_vit"][0]
    written = ExportManifest.read(path).recipe  # the search records its data recipe
    assert written is not None and written["dataset"] == "synthetic"
    p = edit(copy_export(path, tmp_path), lambda d: d["data"].pop("recipe"))
    assert ExportManifest.read(p).recipe is None and load_export(p) is not None
    recipe = {"factory": "synthetic", "args": {"seed": 0, "classes": [1, 2]}}
    edit(p, lambda d: d["data"].update(recipe=recipe))
    m = ExportManifest.read(p)
    assert m.recipe == recipe and m.check_data()["recipe"] == recipe
    assert load_export(p) is not None
    edit(p, lambda d: d["data"].update(recipe="synthetic"))
    with pytest.raises(ExportError, match=r"field 'data\.recipe': must be a JSON object"):
        ExportManifest.read(p).check_data()


@pytest.mark.parametrize(
    ("change", "check", "field"),
    [
        (lambda d: d["data"].pop("identity"), "check_data", "data.identity"),
        (lambda d: d["data"].update(test_images=0), "check_data", "data.test_images"),
        (lambda d: d["data"].update(input_size=[3, 32]), "check_data", "data.input_size"),
        (lambda d: d["data"].update(extra=1), "check_data", "data.extra"),
        (lambda d: d["metrics"]["test"].update(top1="high"), "check_metrics", "metrics.test.top1"),
        (lambda d: d["metrics"].update(macs=float("inf")), "check_metrics", "metrics.macs"),
        (lambda d: d["metrics"].pop("cka"), "check_metrics", "metrics.cka"),
    ],
)
def test_the_search_sections_are_checked_on_demand(exports, tmp_path, change, check, field):
    p = edit(copy_export(exports["cnn_vit"][0], tmp_path), change)
    m = ExportManifest.read(p)  # loading does not look at them
    with pytest.raises(ExportError) as info:
        getattr(m, check)()
    assert info.value.field == field and str(p) in str(info.value)


def test_errors_are_input_errors_that_survive_pickling(tmp_path) -> None:
    with pytest.raises(ExportError) as info:
        ExportManifest.from_json('{"format": "stitchsearch-export/0"}')
    err = info.value
    assert isinstance(err, InputError) and isinstance(err, ValueError)
    assert err.field == "format" and "'<manifest>'" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ExportError and str(again) == str(err)
    with pytest.raises(ExportError, match="not valid JSON"):
        ExportManifest.from_json("{", path=tmp_path / "x.json")


def test_candidate_errors_name_the_candidate_field(exports, tmp_path) -> None:
    p = edit(copy_export(exports["cnn_vit"][0], tmp_path), _add(["candidate"], "front_block", -1))
    with pytest.raises(ExportError) as info:
        ExportManifest.read(p)
    assert info.value.field == "candidate" and "front_block" in str(info.value)
    doc = json.loads(p.read_text())
    doc["candidate"] = {"kind": "anchor", "anchor": ""}
    with pytest.raises(ExportError, match=r"field 'candidate': field 'anchor' must be"):
        ExportManifest.from_dict(doc, p)
