"""``python -m search.run`` end to end on tiny anchors, synthetic data, 2 Ray workers, SQLite."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import optuna
import pytest
from optuna.trial import TrialState

from search.core import evaluated_trials
from search.run import main
from search.store import HEARTBEAT_KEY

DATA = Path(__file__).resolve().parent / "data"
STUDY = DATA / "tiny_study.yaml"

DEVICES = """device,max_macs,max_params
tiny-mcu,1K,
mid,60M,
big,,
"""


def _storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def _load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=_storage(out))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_cluster):
    """One tiny study run to completion (6 evaluations), then resumed to 8."""
    root = tmp_path_factory.mktemp("run")
    devices = root / "devices.csv"
    devices.write_text(DEVICES)
    out = root / "out"
    args = ["--budget-table", str(devices), "--study", str(STUDY), "--out", str(out)]
    rc1 = main([*args, "--trials", "6"])
    first = {t.number: t.user_attrs.get("key") for t in evaluated_trials(_load(out))}
    # A run killed mid-search leaves a RUNNING trial whose driver stopped beating.
    study = _load(out)
    orphan = study.ask()
    orphan.set_user_attr("driver", "killed-driver")
    study.set_user_attr(HEARTBEAT_KEY + "killed-driver", 0.0)
    rc2 = main([*args, "--trials", "8"])
    return {"out": out, "rc": (rc1, rc2), "first": first, "orphan": orphan.number}


def test_run_completes_and_resumes(finished_run, capsys) -> None:
    assert finished_run["rc"] == (0, 0)
    study = _load(finished_run["out"])
    done = evaluated_trials(study)
    assert len(done) == 8
    # Trials of the first run are kept, not redone.
    for number, key in finished_run["first"].items():
        assert study.trials[number].user_attrs["key"] == key
    keys = [t.user_attrs["key"] for t in done]
    assert len(set(keys)) == len(keys)
    # The anchors were evaluated first.
    assert {t.user_attrs["kind"] for t in done[:2]} == {"anchor"}
    orphan = study.trials[finished_run["orphan"]]
    assert orphan.state == TrialState.FAIL
    assert "stopped" in orphan.user_attrs["fail_reason"]


def test_trials_carry_metrics_and_budgets(finished_run) -> None:
    study = _load(finished_run["out"])
    assert study.metric_names == ["accuracy", "macs"]
    for t in evaluated_trials(study):
        a = t.user_attrs
        for key in (
            "config",
            "val_acc",
            "macs",
            "params",
            "latency_ms",
            "memory_mb",
            "fit_seconds",
            "eval_seconds",
            "fits_devices",
            "feasible",
        ):
            assert key in a, key
        assert t.values == [a["val_acc"], a["macs"]]
        assert ("mid" in a["fits_devices"]) == (a["macs"] <= 60e6)
        assert "tiny-mcu" not in a["fits_devices"]
        if a["kind"] == "stitch":
            assert 0.0 <= a["cka"] <= 1.0 + 1e-6


def test_pruned_trials_are_recorded_with_cka(finished_run) -> None:
    study = _load(finished_run["out"])
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, "the tiny study's CKA rule prunes some stitch points"
    for t in pruned:
        assert (
            "top_k" in t.user_attrs["pruned_reason"] or "threshold" in t.user_attrs["pruned_reason"]
        )
        assert "cka" in t.user_attrs
    pruned_keys = {t.user_attrs["key"] for t in pruned}
    assert not pruned_keys & {t.user_attrs["key"] for t in evaluated_trials(study)}


def test_exports_and_report(finished_run) -> None:
    out = finished_run["out"]
    study = _load(out)
    exports = sorted((out / "exports").glob("*.json"))
    assert [p.stem for p in exports] == ["big", "mid"]  # nothing fits tiny-mcu
    best = max(
        evaluated_trials(study),
        key=lambda t: (t.user_attrs["val_acc"], -t.user_attrs["macs"], -t.user_attrs["params"]),
    )
    doc = json.loads((out / "exports" / "big.json").read_text())
    assert doc["final"] is True
    assert doc["device"] == "big"
    assert doc["study"]["trial_number"] == best.number
    assert doc["study"]["storage"] == _storage(out)
    assert doc["metrics"]["validation"]["top1"] == best.user_attrs["val_acc"]
    assert 0.0 <= doc["metrics"]["test"]["top1"] <= 100.0
    assert doc["budget"]["device"] == "big"
    for anchor in doc["anchors"]:
        assert anchor["name"]
    if doc["candidate"]["kind"] == "stitch":
        weights = out / "exports" / doc["stitch"]["weights"]
        from safetensors.torch import load_file

        assert load_file(str(weights))
    report = (out / "report.html").read_text()
    assert "tiny-mcu" in report and "Plotly" in report


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


def test_dashboard_api_sees_study_and_pareto_front(finished_run) -> None:
    from optuna_dashboard import wsgi

    storage = optuna.storages.RDBStorage(_storage(finished_run["out"]))
    server = make_server("127.0.0.1", 0, wsgi(storage), handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        studies = json.loads(urllib.request.urlopen(f"{base}/api/studies", timeout=30).read())
        summary = next(s for s in studies["study_summaries"] if s["study_name"] == "tiny")
        detail = json.loads(
            urllib.request.urlopen(f"{base}/api/studies/{summary['study_id']}", timeout=30).read()
        )
        assert detail["objective_names"] == ["accuracy", "macs"]
        study = _load(finished_run["out"])
        front = {t.number for t in study.best_trials}
        assert front
        assert {t["number"] for t in detail["best_trials"]} >= front
        assert len(detail["trials"]) == len(study.trials)
    finally:
        server.shutdown()
        server.server_close()


def test_output_names_devices_and_dashboard(tmp_path, ray_cluster, capsys) -> None:
    devices = tmp_path / "d.csv"
    devices.write_text("device,max_macs\n../../escape,\n")
    out = tmp_path / "o"
    rc = main(
        [
            "--budget-table",
            str(devices),
            "--study",
            str(STUDY),
            "--out",
            str(out),
            "--trials",
            "2",
            "--no-report",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert f"optuna-dashboard {_storage(out)}" in printed
    files = [p for p in out.rglob("*") if p.is_file()]
    assert all(p.resolve().is_relative_to(out.resolve()) for p in files)
    exports = list((out / "exports").glob("*.json"))
    assert len(exports) == 1 and ".." not in exports[0].name
    assert json.loads(exports[0].read_text())["device"] == "../../escape"
    shutil.rmtree(out)
