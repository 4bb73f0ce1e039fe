"""The family end to end: trained on Ray Train after rung 1, recorded, exported, checked,
resumed after a SIGKILL, not trained twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from search.core import Attr, rung_of
from search.export import main as export_main
from search.run import main
from search.strategy import FAMILY_RUNG, family_study_name
from space import load_export, load_family

ROOT = Path(__file__).resolve().parents[2]
STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
DEVICES = "device,max_macs\nsmall,5M\nany,\n"
FAMILY = {"enabled": True, "epochs": 2, "train_images": 96, "batch_size": 16, "max_members": 4}


def _study(root: Path, name: str, **family: object) -> Path:
    definition = yaml.safe_load(STUDY.read_text())
    definition.pop("cka")  # the tiny study's old-form rule; this one gives ``pruning``
    definition.update(
        name=name,
        trials=6,
        pruning={"depth": 2},
        finetune={"enabled": True, "steps": 4, "batch_size": 32, "max_trials": 2},
        family={**FAMILY, **family},
    )
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(definition))
    (root / "devices.csv").write_text(DEVICES)
    return path


def _args(root: Path, study: Path, out: Path) -> list[str]:
    return ["--budget-table", str(root / "devices.csv"), "--study", str(study), "--out", str(out)]


def _family(out: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(
        study_name=family_study_name(name), storage=f"sqlite:///{(out / 'study.db').resolve()}"
    )
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


@pytest.fixture(scope="module")
def family_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("family")
    study = _study(root, "fam")
    out = root / "out"
    rc1 = main(_args(root, study, out))
    first = [t.number for t in _family(out, "fam")]
    rc2 = main(_args(root, study, out))
    return {"root": root, "out": out, "rc": (rc1, rc2), "first": first}


def test_members_are_trained_and_recorded_once(family_run, capfd) -> None:
    assert family_run["rc"] == (0, 0)
    trials = _family(family_run["out"], "fam")
    assert [t.number for t in trials] == family_run["first"], "the rerun trained again"
    assert 3 <= len(trials) <= FAMILY["max_members"]
    ids = {t.user_attrs[Attr.FAMILY_ID] for t in trials}
    assert len(ids) == 1
    for t in trials:
        a = t.user_attrs
        assert rung_of(t) == FAMILY_RUNG
        assert a[Attr.FAMILY_EPOCHS] == 2 and a[Attr.FAMILY_RESUMED] == 0
        assert len(a[Attr.LOSS_CURVE]) == 2 and a[Attr.FAMILY]["epochs"] == 2
        assert a[Attr.LOWER_RUNG] in (0, 1)
        assert t.values[0] == a[Attr.VAL_ACC] and t.values[1] == a[Attr.MACS]
        assert isinstance(a[Attr.RUNG0_TRIAL], int)
    assert any(t.user_attrs[Attr.KIND] == "stitch" for t in trials)


def test_the_family_is_exported_whole_and_checks(family_run, capsys) -> None:
    exports = family_run["out"] / "exports"
    family = load_family(exports / "family.json")
    assert len(family.names) == len(family_run["first"])
    for m in family.metrics.values():
        assert {"accuracy", "test_accuracy", "macs", "params"} <= m.keys()
    assert export_main(["--check", str(exports / "family.json")]) == 0
    assert "OK: every member reproduces its record" in capsys.readouterr().out
    # A device's export of a family member carries the family's trained anchor weights.
    for name in ("small", "any"):
        doc = json.loads((exports / f"{name}.json").read_text())
        if doc["fit"]["rung"] == FAMILY_RUNG:
            for rec in doc["anchors"]:
                assert (exports / rec["trained"]["weights"]).is_file()
            assert export_main(["--check", str(exports / f"{name}.json")]) == 0
            model = load_export(exports / f"{name}.json")
            assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert (
        export_main(["--onnx", str(family_run["root"] / "f.onnx"), str(exports / "family.json")])
        == 2
    )


def _run(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "search.run", *args], stdout=f, stderr=subprocess.STDOUT, env=env
        )


@pytest.mark.slow
def test_a_killed_run_resumes_the_family_from_its_last_epoch(tmp_path) -> None:
    """SIGKILL during the second epoch; the rerun resumes after the first and trains the same
    family as a run that was never interrupted."""
    study = _study(tmp_path, "killed", epochs=3, train_images=256, batch_size=8)
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = _run(_args(tmp_path, study, out), log)
    deadline = time.monotonic() + 600
    while "epoch 2/3" not in log.read_text():
        assert proc.poll() is None, log.read_text()[-2000:]
        assert time.monotonic() < deadline, "the family never reached its second epoch"
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(_args(tmp_path, study, out)) == 0
    resumed = {t.user_attrs[Attr.LABEL]: t for t in _family(out, "killed")}
    assert {t.user_attrs[Attr.FAMILY_RESUMED] for t in resumed.values()} == {1}
    clean = tmp_path / "clean"
    assert main(_args(tmp_path, study, clean)) == 0
    straight = {t.user_attrs[Attr.LABEL]: t for t in _family(clean, "killed")}
    assert resumed.keys() == straight.keys()
    for label, t in resumed.items():
        assert abs(t.values[0] - straight[label].values[0]) <= 1.0, label


def test_a_failed_family_leaves_the_lower_rungs_delivered(
    tmp_path, ray_cluster, capfd, monkeypatch
):
    study = _study(tmp_path, "broken")
    text = yaml.safe_load(study.read_text())
    text["max_retries"] = 0
    study.write_text(yaml.safe_dump(text))
    monkeypatch.setenv("STITCHSEARCH_TEST_FAMILY_FAULT", "raise")
    out = tmp_path / "out"
    assert main(_args(tmp_path, study, out)) == 0
    err = capfd.readouterr().err
    line = next(x for x in err.splitlines() if "training failed" in x)
    assert "RuntimeError: injected test fault" in line and "run the same command again" in line
    assert _family(out, "broken") == []
    assert not (out / "exports" / "family.json").exists()
    for name in ("small", "any"):
        doc = json.loads((out / "exports" / f"{name}.json").read_text())
        assert doc["fit"]["rung"] in (0, 1) and doc["final"] is False


@pytest.mark.slow
def test_two_data_parallel_workers_train_the_same_family(tmp_path, ray_cluster) -> None:
    """family.workers: 2 trains with DistributedDataParallel (gloo on CPUs), one member per
    step on every worker and half the batch each."""
    study = _study(tmp_path, "parallel", workers=2)
    out = tmp_path / "out"
    assert main(_args(tmp_path, study, out)) == 0
    trials = _family(out, "parallel")
    assert len(trials) >= 3
    assert {t.user_attrs[Attr.FAMILY]["batch_size"] for t in trials} == {16}
    family = load_family(out / "exports" / "family.json")
    assert all(m["accuracy"] >= 0 for m in family.metrics.values())
