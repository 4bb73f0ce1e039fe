"""The shipped ``studies/efficientnet_lite.yaml`` and its budget table: valid, and its space.

No search runs here (the study takes minutes on real weights; the README records a run).
The space is built from randomly initialised weights of the same two architectures, saved
where the study's relative checkpoint paths point, so neither the weight packages nor the
photos are needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import timm
from safetensors.torch import save_file

from search.inputs import load_anchors, load_budget_table, load_study, study_space

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "studies" / "efficientnet_lite.yaml"
DEVICES = REPO / "studies" / "efficientnet_lite_devices.csv"
LITE0, LITE1 = "tf_efficientnet_lite0", "tf_efficientnet_lite1"


def test_the_study_is_label_free_on_stage_boundaries() -> None:
    study = load_study(STUDY)
    assert study.label_free and study.teacher == LITE1
    assert study.objectives == ["agreement", "macs"]
    assert study.cuts == "stages"
    assert study.finetune.distill == 1.0
    assert [(a.name, a.checkpoint) for a in study.anchors] == [
        (LITE1, "../weights/lite1.safetensors"),
        (LITE0, "../weights/lite0.safetensors"),
    ]
    assert study.data.root == "../runs/photos"
    # Validation, test and calibration fit the 600 crops the header's command writes.
    assert study.data.validation + study.data.test + study.data.calibration <= 600
    assert study.trials == 2 + 2 * 6  # the whole space
    assert [b.device for b in load_budget_table(DEVICES)][-1] == "unbounded"


def test_the_study_builds_its_space(tmp_path) -> None:
    (tmp_path / "studies").mkdir()
    (tmp_path / "weights").mkdir()
    study_path = tmp_path / "studies" / STUDY.name
    shutil.copy(STUDY, study_path)
    for name, file in ((LITE0, "lite0"), (LITE1, "lite1")):
        state = timm.create_model(name).state_dict()
        save_file(
            {k: v.contiguous() for k, v in state.items()}, tmp_path / f"weights/{file}.safetensors"
        )
    study = load_study(study_path)
    anchors, kwargs = load_anchors(study, study_path)
    assert kwargs[LITE0]["checkpoint"] == str(tmp_path / "weights" / "lite0.safetensors")
    assert [a.input_size for a in anchors.values()] == [(3, 240, 240), (3, 224, 224)]
    space = study_space(study, anchors, study_path)
    assert space.points == {
        (LITE1, LITE0): [(1, 1), (4, 3), (7, 5), (11, 8), (15, 11), (20, 15)],
        (LITE0, LITE1): [(1, 1), (3, 4), (5, 7), (8, 11), (11, 15), (15, 20)],
    }
    assert len(space) == study.trials == 14  # of 2 + 2 * 16 * 21 with cuts: all
