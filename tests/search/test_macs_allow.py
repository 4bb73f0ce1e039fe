"""The study's ``macs.allow_unsupported`` (issue 26, item 5a): from the YAML to the trial."""

from __future__ import annotations

from pathlib import Path

import optuna

from evaluators import synthetic_splits
from search.core import RESULT_ATTRS, Attr, evaluated_trials
from search.inputs import parse_study
from search.run import main
from search.workers.evaluation import TrialContext, run_candidate
from space import Candidate

GRN = "aten::linalg_vector_norm"


def test_the_trial_records_allowed_operators_and_fails_with_the_refusal() -> None:
    data = synthetic_splits(num_classes=4, calibration=16, validation=16, test=16)
    kwargs = {"input_size": (3, 32, 32), "depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}
    specs = {"convnextv2_atto": {**kwargs, "num_classes": 4}}
    config = {"candidate": Candidate.anchor("convnextv2_atto").to_json()}
    refused = run_candidate(config, TrialContext(anchors=specs, data=data))
    assert refused["error"].startswith("UncountedOpsError: MACs of anchor 'convnextv2_atto'")
    assert Attr.MACS_UNCOUNTED not in refused
    ok = run_candidate(config, TrialContext(anchors=specs, data=data, macs_allow=(GRN,)))
    assert "error" not in ok, ok
    assert ok[Attr.MACS_UNCOUNTED] == f"{GRN} x4"
    assert Attr.MACS_UNCOUNTED in RESULT_ATTRS  # stored on the trial by the recorder


def test_the_study_field_is_parsed() -> None:
    study = parse_study(
        {"anchors": ["zoo:resnet-s", "zoo:vit-s"], "macs": {"allow_unsupported": [GRN]}},
        source="s.yaml",
    )
    assert study.macs.allow_unsupported == [GRN]
    assert parse_study({"anchors": ["zoo:resnet-s", "zoo:vit-s"]}).macs.allow_unsupported == []


STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"


def _uncountable_study(tmp_path: Path, allow: str = "") -> Path:
    """The tiny study with a ConvNeXt-V2 anchor, whose MACs the depth rule counts first."""
    text = STUDY.read_text()
    for old, new in [
        (
            "resnet10t\n    timm_kwargs: {num_classes: 4}",
            "convnextv2_atto\n    timm_kwargs: {num_classes: 4, depths: [1, 1, 1, 1], "
            "dims: [8, 16, 24, 32]}",
        ),
        ("  threshold: 0.0\n  top_k: 2\n", "pruning: {signal: cka, depth: 1}\n"),
    ]:
        assert old in text, old
        text = text.replace(old, new, 1)
    path = tmp_path / "s.yaml"
    text += allow
    path.write_text(text)
    return path


def test_an_uncountable_anchor_stops_the_run_with_one_line(tmp_path, capsys) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("device,max_macs\nsmall,10M\n")
    out = tmp_path / "out"
    study = _uncountable_study(tmp_path)
    rc = main(["--budget-table", str(devices), "--study", str(study), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: MACs of 'convnextv2_atto': fvcore has no handle for {GRN}")
    assert f"macs: {{allow_unsupported: [{GRN}]}}" in last
    assert not out.exists()  # the run created it; an input error removes it


def test_an_allowed_operator_is_recorded_on_the_trials(tmp_path, ray_cluster) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("device,max_macs\nsmall,10M\n")
    out = tmp_path / "out"
    study = _uncountable_study(tmp_path, allow=f"macs: {{allow_unsupported: [{GRN}]}}\n")
    argv = ["--budget-table", str(devices), "--study", str(study), "--out", str(out)]
    assert main([*argv, "--trials", "3"]) == 0
    trials = evaluated_trials(
        optuna.load_study(study_name="tiny", storage=f"sqlite:///{out}/study.db")
    )
    by_label = {t.user_attrs[Attr.LABEL]: t for t in trials}
    assert by_label["convnextv2_atto (anchor)"].user_attrs[Attr.MACS_UNCOUNTED] == f"{GRN} x4"
    vit = by_label["vit_tiny_patch16_224 (anchor)"]
    assert Attr.MACS_UNCOUNTED not in vit.user_attrs and vit.user_attrs[Attr.MACS] > 0
