"""Rung 1 end to end: promoted stitches fine-tuned on Ray workers, recorded, chosen, exported."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from search.core import Attr, evaluated_trials
from search.delivery import check_export
from search.run import main
from search.store import HEARTBEAT_KEY
from search.strategy import rung1_study_name, rung1_trials
from space import Candidate, load_export

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
DEVICES = "device,max_macs\nsmall,14M\nany,\n"
FINETUNE = {
    "enabled": True,
    "steps": 12,
    "batch_size": 32,
    "lr": 0.01,
    "max_trials": 3,
    "promote": {"per_device": 2, "front": True},
}


def _load(out: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{(out / 'study.db').resolve()}")


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory, ray_cluster):
    """A tiny study with rung 1 (3 fine-tuning trials at most): run, crash mid-rung-1, rerun."""
    root = tmp_path_factory.mktemp("rung1")
    definition = yaml.safe_load(STUDY.read_text())
    definition.update(name="tuned", finetune={**FINETUNE, "max_trials": 2})
    study_file = root / "study.yaml"
    study_file.write_text(yaml.safe_dump(definition))
    (root / "devices.csv").write_text(DEVICES)
    out = root / "out"
    args = ["--budget-table", str(root / "devices.csv"), "--study", str(study_file)]
    args += ["--out", str(out), "--trials", "6"]
    rc1 = main(args)
    first = {t.user_attrs[Attr.KEY]: t.number for t in rung1_trials(_load(out, "tuned:finetuned"))}
    # A driver killed during rung 1 leaves a RUNNING rung-1 trial behind.
    rung1 = _load(out, "tuned:finetuned")
    orphan = rung1.ask()
    orphan.set_user_attr(Attr.DRIVER, "killed-driver")
    rung1.set_user_attr(HEARTBEAT_KEY + "killed-driver", 0.0)
    # The rerun raises the rung-1 budget to 3: one more stitch gets fine-tuned.
    definition["finetune"] = FINETUNE
    study_file.write_text(yaml.safe_dump(definition))
    rc2 = main(args)
    return {"out": out, "rc": (rc1, rc2), "first": first, "orphan": orphan.number}


def test_rung1_trials_are_recorded_and_linked(tuned_run) -> None:
    assert tuned_run["rc"] == (0, 0)
    out = tuned_run["out"]
    rung0 = {t.number: t for t in evaluated_trials(_load(out, "tuned"))}
    rung1 = _load(out, rung1_study_name("tuned"))
    assert rung1.metric_names == ["accuracy", "macs"]
    done = rung1_trials(rung1)
    assert len(done) == 3  # the budget, across both runs
    assert len({t.user_attrs[Attr.KEY] for t in done}) == 3
    for t in done:
        a = t.user_attrs
        source = rung0[a[Attr.RUNG0_TRIAL]]
        assert a[Attr.RUNG] == 1 and a[Attr.KIND] == "stitch"
        assert a[Attr.KEY] == source.user_attrs[Attr.KEY]
        assert a[Attr.RUNG0_VAL_ACC] == source.user_attrs[Attr.VAL_ACC]
        assert t.values == [a[Attr.VAL_ACC], source.user_attrs[Attr.MACS]]
        assert a[Attr.FINETUNE]["steps"] == FINETUNE["steps"]
        assert a[Attr.FINETUNE]["lr"] == FINETUNE["lr"]
        assert a[Attr.FINETUNE_STEPS] == FINETUNE["steps"] and a[Attr.FINETUNE_SECONDS] > 0
        assert len(a[Attr.LOSS_CURVE]) > 1 and a[Attr.LOSS_MIN] <= a[Attr.LOSS_FIRST]
        assert isinstance(a["fit_residual"], dict) and a["fit_residual"]


def test_rerun_fails_the_orphan_and_redoes_nothing(tuned_run) -> None:
    rung1 = _load(tuned_run["out"], "tuned:finetuned")
    orphan = rung1.trials[tuned_run["orphan"]]
    assert orphan.state == TrialState.FAIL
    assert "stopped" in orphan.user_attrs[Attr.FAIL_REASON]
    for key, number in tuned_run["first"].items():  # the first run's results are kept
        assert rung1.trials[number].user_attrs[Attr.KEY] == key
    assert len(tuned_run["first"]) == 2
    assert not rung1.get_trials(states=(TrialState.RUNNING,))


def test_picks_and_exports_use_the_highest_rung(tuned_run) -> None:
    out = tuned_run["out"]
    tuned = {t.user_attrs[Attr.KEY]: t for t in rung1_trials(_load(out, "tuned:finetuned"))}
    exports = sorted((out / "exports").glob("*.json"))
    assert [p.stem for p in exports] == ["any", "small"]
    for path in exports:
        doc = json.loads(path.read_text())
        key = _key(doc["candidate"])
        if key in tuned:
            t = tuned[key]
            assert doc["fit"]["rung"] == 1
            assert doc["fit"]["finetune"]["steps"] == FINETUNE["steps"]
            assert doc["fit"]["finetune"]["rung1_trial"] == t.number
            assert doc["metrics"]["validation"]["top1"] == t.user_attrs[Attr.VAL_ACC]
        else:
            assert doc["fit"]["rung"] == 0
        # The exported weights reproduce the recorded validation and test accuracy.
        assert doc["metrics"]["validation_remeasured"]["top1"] == pytest.approx(
            doc["metrics"]["validation"]["top1"]
        )
        result = check_export(path)
        assert result.ok, result
        assert load_export(path) is not None
    assert any(json.loads(p.read_text())["fit"]["rung"] == 1 for p in exports) or not tuned


def test_report_draws_both_rungs(tuned_run) -> None:
    page = (tuned_run["out"] / "report.html").read_text()
    assert "fine-tuned, rung 1 (3)" in page
    assert "Pareto front after fine-tuning" in page


def _key(candidate: dict) -> str:
    return Candidate.from_dict(candidate).key


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def test_dashboard_shows_the_fine_tuned_study(tuned_run) -> None:
    from optuna_dashboard import wsgi

    storage = optuna.storages.RDBStorage(f"sqlite:///{(tuned_run['out'] / 'study.db').resolve()}")
    server = make_server("127.0.0.1", 0, wsgi(storage), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        studies = json.loads(urllib.request.urlopen(f"{base}/api/studies", timeout=30).read())
        names = {s["study_name"]: s["study_id"] for s in studies["study_summaries"]}
        assert {"tuned", "tuned:finetuned"} <= names.keys()
        detail = json.loads(
            urllib.request.urlopen(
                f"{base}/api/studies/{names['tuned:finetuned']}", timeout=30
            ).read()
        )
        assert detail["objective_names"] == ["accuracy", "macs"]
        tuned = _load(tuned_run["out"], "tuned:finetuned")
        complete = [t for t in tuned.trials if t.state == TrialState.COMPLETE]
        values = {t["number"]: t["values"] for t in detail["trials"] if t["state"] == "Complete"}
        assert values == {t.number: t.values for t in complete}
        assert {t["number"] for t in detail["best_trials"]} >= {t.number for t in tuned.best_trials}
    finally:
        server.shutdown()
        server.server_close()
