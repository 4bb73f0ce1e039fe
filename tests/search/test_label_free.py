"""Label-free studies: a folder of unlabelled images, agreement with a teacher anchor.

One real ``search.run`` on tiny anchors and a temp folder of generated PNGs (rung 0 and
rung 1 by pure distillation), then its study, summary, report, exports and ``--check``.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import optuna
import pytest
import yaml

from evaluators import count_macs
from search.core import Attr, candidate_of, evaluated_trials
from search.export import main as export_main
from search.inputs import StudyError, load_study, parse_study, prepare
from search.run import build_parser, main
from search.strategy import rung1_study_name, rung1_trials
from tests.evaluators.test_images import write_pngs

REPO = Path(__file__).resolve().parents[2]
TINY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
TEACHER = "vit_tiny_patch16_224"
DEVICES = "device,max_macs\nsmall,14M\nany,\n"


def _tiny(**changes) -> dict:
    """The tiny study as a label-free one (its anchors; images data)."""
    doc = yaml.safe_load(TINY.read_text())
    doc.pop("objectives")
    doc.update(
        name="lf",
        data={
            "dataset": "images",
            "root": "imgs",
            "teacher": TEACHER,
            "calibration": 16,
            "validation": 16,
            "test": 12,
            "batch_size": 16,
        },
        cka={"images": 16, "top_k": 2},
        finetune={
            "enabled": True,
            "steps": 6,
            "batch_size": 16,
            "max_trials": 2,
            "promote": {"per_device": 1, "front": True},
        },
        trials=6,
    )
    doc.update(changes)
    return doc


# ---------------------------------------------------------------------- the study YAML
def test_images_default_to_agreement_and_pure_distillation() -> None:
    study = parse_study(_tiny())
    assert study.label_free and study.objectives == ["agreement", "macs"]
    assert study.directions == ["maximize", "minimize"]
    assert study.finetune.distill == 1.0
    assert study.teacher == TEACHER
    no_teacher = _tiny()
    del no_teacher["data"]["teacher"]
    assert parse_study(no_teacher).teacher is None  # chosen by MACs once anchors load
    labelled = parse_study(yaml.safe_load(TINY.read_text()))
    assert not labelled.label_free and labelled.teacher is None


def test_example_study_is_valid() -> None:
    study = load_study(REPO / "studies" / "label_free.yaml")
    assert study.label_free and study.objectives == ["agreement", "macs"]
    assert study.teacher == "zoo:resnet-l"


@pytest.mark.parametrize(
    ("change", "field", "needle"),
    [
        ({"objectives": ["accuracy", "macs"]}, "objectives", "'accuracy' needs labels"),
        ({"objectives": ["agreement", "accuracy", "macs"]}, "objectives", "one of accuracy"),
        (
            {"data": {"dataset": "images", "root": "x", "teacher": "resnet99"}},
            "data.teacher",
            "'resnet99' is not one of the study's anchors",
        ),
        ({"finetune": {"distill": 0.5}}, "finetune.distill", "pure distillation (1.0)"),
        ({"fit": {"steps": 3}}, "fit.steps", "train on labels"),
        (
            {
                "data": {"dataset": "images", "root": "x", "teacher": TEACHER},
                "finetune": {"teacher": "resnet10t"},
            },
            "data.teacher",
            "differ",
        ),
    ],
)
def test_bad_label_free_studies_name_the_field(change, field, needle) -> None:
    with pytest.raises(StudyError) as e:
        parse_study(_tiny(**change), source="s.yaml")
    msg = str(e.value)
    assert msg.startswith(f"s.yaml: field '{field}': ") and "\n" not in msg, msg
    assert needle in msg, msg


def test_agreement_needs_images_data() -> None:
    doc = yaml.safe_load(TINY.read_text())
    doc["objectives"] = ["agreement", "macs"]
    with pytest.raises(StudyError, match="'agreement' is for a label-free study"):
        parse_study(doc)
    doc["objectives"] = ["accuracy", "macs"]
    doc["data"]["teacher"] = "resnet10t"
    with pytest.raises(StudyError, match="data.teacher is for a label-free study"):
        parse_study(doc)


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def label_free_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("label_free")
    write_pngs(root / "imgs", 56)
    study_file = root / "study.yaml"
    study_file.write_text(yaml.safe_dump(_tiny()))
    (root / "devices.csv").write_text(DEVICES)
    out = root / "out"
    argv = ["--budget-table", str(root / "devices.csv"), "--study", str(study_file)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*argv, "--out", str(out)])
    return {"out": out, "rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def _load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(out / 'study.db').resolve()}")


def test_run_optimises_agreement_with_the_teacher(label_free_run, capsys) -> None:
    assert label_free_run["rc"] == 0
    out = label_free_run["out"]
    study = _load(out, "lf")
    assert study.metric_names == [f"agreement with {TEACHER}", "macs"]
    assert study.user_attrs["objectives"] == ["agreement", "macs"]
    trials = evaluated_trials(study)
    assert len(trials) == 6
    for t in trials:
        assert 0.0 <= t.values[0] <= 100.0
        assert t.values[0] == t.user_attrs[Attr.VAL_ACC]
    anchors = [t for t in trials if t.user_attrs[Attr.KIND] == "anchor"]
    teacher = [t for t in anchors if candidate_of(t).front == TEACHER]
    assert len(teacher) == 1 and teacher[0].values[0] == 100.0
    rung1 = _load(out, rung1_study_name("lf"))
    assert rung1.metric_names == [f"agreement with {TEACHER}", "macs"]
    tuned = rung1_trials(rung1)
    assert tuned, "rung 1 fine-tuned nothing"
    for t in tuned:
        assert t.user_attrs[Attr.FINETUNE]["distill"] == 1.0
        assert 0.0 <= t.values[0] <= 100.0


def test_summary_report_and_exports_say_agreement(label_free_run) -> None:
    out = label_free_run["out"]
    text = label_free_run["stdout"]
    header = next(line for line in text.splitlines() if line.startswith("device "))
    assert f"val agreement with {TEACHER}" in header
    assert f"test agreement with {TEACHER}" in header
    assert "acc" not in header.replace("agreement", "")
    line = f"label-free: images:imgs has no labels; the search maximises agreement with {TEACHER}"
    assert line in label_free_run["stderr"]
    report = (out / "report.html").read_text()
    assert f"validation agreement with {TEACHER} (%)" in report
    assert "validation accuracy" not in report
    exports = sorted((out / "exports").glob("*.json"))
    assert "any" in [p.stem for p in exports]
    for path in exports:
        doc = json.loads(path.read_text())
        assert doc["metrics"]["measure"] == f"agreement with {TEACHER}"
        assert doc["study"]["objectives"] == ["agreement", "macs"]
        recipe = doc["data"]["recipe"]
        assert recipe["dataset"] == "images" and recipe["teacher"] == TEACHER
        assert len(recipe["teacher_labels"]["test"]) == doc["data"]["test_images"] == 12
        assert 0.0 <= doc["metrics"]["test"]["top1"] <= 100.0


def test_check_measures_agreement_without_the_teacher(label_free_run, capsys) -> None:
    out = label_free_run["out"]
    capsys.readouterr()
    assert export_main(["--check", str(out / "exports" / "any.json")]) == 0
    text = capsys.readouterr().out
    assert f"test top-1 agreement with {TEACHER} (%)" in text
    assert f"label-free: top-1/top-5 are agreement with {TEACHER}" in text
    assert f"OK: the artifact reproduces its manifest (agreement with {TEACHER})" in text
    assert "accuracy" not in text.replace("not accuracy", "")


def test_default_teacher_is_the_anchor_with_the_most_macs(tmp_path) -> None:
    write_pngs(tmp_path / "imgs", 56)
    doc = _tiny()
    del doc["data"]["teacher"]
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "devices.csv").write_text(DEVICES)
    argv = [
        "--budget-table",
        str(tmp_path / "devices.csv"),
        "--study",
        str(tmp_path / "study.yaml"),
    ]
    plan = prepare(build_parser().parse_args([*argv, "--out", str(tmp_path / "out")]))
    macs = {n: count_macs(a.model, a.input_size) for n, a in plan.anchors.items()}
    largest = max(macs, key=macs.get)
    assert plan.study.teacher == largest and plan.study.finetune.teacher == largest
    assert plan.measure == f"agreement with {largest}"
    assert plan.data.recipe.teacher == largest
    assert not (tmp_path / "out").exists()  # preparing writes nothing
