"""Device latency tables in a run: checked at plan time, used for constraints, picks, exports."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import optuna
import pytest

from evaluators import LatencyTable
from search.core import candidate_of, evaluated_trials
from search.run import main

DATA = Path(__file__).resolve().parent / "data"
STUDY = DATA / "tiny_study.yaml"


def _table_doc(path: Path, device: str) -> dict:
    doc = json.loads(path.read_text())
    doc["device"] = device
    return doc


def _write(path: Path, doc: dict) -> Path:
    path.write_text(json.dumps(doc))
    return path


def _other_study(doc: dict) -> dict:
    doc["study"]["name"] = "other"
    return doc


def _other_checkpoint(doc: dict) -> dict:
    anchor = doc["study"]["anchors"][0]
    anchor["identity"] = anchor["name"] + "@" + "ab" * 32
    anchor["checkpoint_sha256"] = "ab" * 32
    return doc


def _missing_part(doc: dict) -> dict:
    parts = doc["runtimes"]["torch"]["1"]["parts"]
    del parts[next(k for k in parts if k.startswith("stitch|"))]
    return doc


def _other_device(doc: dict) -> dict:
    doc["device"] = "jetson"
    return doc


def _old_format(doc: dict) -> dict:
    """A version-1 table: the stem, each block and the head timed alone."""
    doc["format"] = "stitchsearch-latency-table/1"
    for batches in doc["runtimes"].values():
        for entry in batches.values():
            entry["parts"] = {
                k.replace("prefix|", "block|"): v
                for k, v in entry["parts"].items()
                if not k.startswith(("suffix|", "anchor|"))
            }
    return doc


CASES = {
    "other-study": (_other_study, "made for study 'other', not this run's study 'tiny'"),
    "other-checkpoint": (_other_checkpoint, "with other weights (resnet10t@abababababab"),
    "missing-part": (_missing_part, "has no timing for part 'stitch|"),
    "other-device": (_other_device, "was profiled for device 'jetson', not 'dev'"),
    "old-format": (_old_format, "'stitchsearch-latency-table/1' (an older table format"),
    "malformed": ("{not json", "not valid JSON"),
    "missing-file": (None, "no such file"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_table_that_does_not_fit_exits_2(name, tiny_table, tmp_path, capsys) -> None:
    change, needle = CASES[name]
    table = tmp_path / "tables" / "dev.json"
    table.parent.mkdir()
    if isinstance(change, str):
        table.write_text(change)
    elif change is not None:
        _write(table, change(_table_doc(tiny_table, "dev")))
    devices = tmp_path / "devices.csv"
    devices.write_text("device,max_latency_ms,latency_table\ndev,5,tables/dev.json\n")
    out = tmp_path / "out"
    before = set(tmp_path.rglob("*"))
    rc = main(["--budget-table", str(devices), "--study", str(STUDY), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    line = err[0]
    assert f"{devices}:2: column 'latency_table': device 'dev': latency table" in line, line
    assert needle in line, line
    assert "(got 'tables/dev.json')" in line
    fix = "re-profile the device" if name != "missing-file" else "profile the device"
    assert f"{fix}: python -m search.profile --study {STUDY} --device dev --out" in line
    assert set(tmp_path.rglob("*")) == before and not out.exists()


DEVICES = """device,max_latency_ms,latency_table
fast,100000,tables/fast.json
host,100000,
"""


def _storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


@pytest.fixture(scope="module")
def table_run(tmp_path_factory, tiny_table, ray_cluster):
    """A 4-trial run with one device on a table and one host-measured; then a device whose
    table makes the first pick's back anchor very slow (every suffix of it, each ending in its
    head, and the anchor itself) is added and the run resumed (re-picks)."""
    root = tmp_path_factory.mktemp("table_run")
    (root / "tables").mkdir()
    fast = _write(root / "tables" / "fast.json", _table_doc(tiny_table, "fast"))
    devices = root / "devices.csv"
    devices.write_text(DEVICES)
    out = root / "out"
    args = ["--budget-table", str(devices), "--study", str(STUDY), "--out", str(out)]
    args += ["--trials", "4", "--no-finetune", "--workers", "1"]
    rc1 = main(args)
    first = {p.stem: json.loads(p.read_text()) for p in (out / "exports").glob("*.json")}
    study = optuna.load_study(study_name="tiny", storage=_storage(out))
    number = first["fast"]["study"]["trial_number"]
    pick = next(t for t in evaluated_trials(study) if t.number == number)
    slow_doc = _table_doc(tiny_table, "slow")
    back = candidate_of(pick).back
    head = f"suffix|{back}"
    for key, timing in slow_doc["runtimes"]["torch"]["1"]["parts"].items():
        if key.startswith(f"suffix|{back}|") or key == f"anchor|{back}":
            timing["median_ms"] = 10_000.0
    _write(root / "tables" / "slow.json", slow_doc)
    devices.write_text(DEVICES + "slow,1000,tables/slow.json\n")
    rc2 = main(args)
    second = {p.stem: json.loads(p.read_text()) for p in (out / "exports").glob("*.json")}
    return {
        "rc": (rc1, rc2),
        "out": out,
        "fast": LatencyTable.read(fast),
        "fast_path": fast,
        "first": first,
        "second": second,
        "pick": pick,
        "head": head,
    }


def test_trials_record_the_predicted_latency_and_fit_by_it(table_run) -> None:
    assert table_run["rc"] == (0, 0)
    study = optuna.load_study(study_name="tiny", storage=_storage(table_run["out"]))
    trials = evaluated_trials(study)
    assert len(trials) == 4
    for t in trials:
        predicted = t.user_attrs["device_latency_ms"]
        assert set(predicted) == {"fast"}  # the host-measured device has none
        value, std = table_run["fast"].estimate(candidate_of(t))
        assert predicted["fast"] == pytest.approx(value)
        assert t.user_attrs["device_latency_std_ms"]["fast"] == pytest.approx(std)
        assert std > 0
        # What people read in the dashboard: the prediction, its interval and its source.
        assert t.user_attrs["device_latency"] == {"fast": f"{value:.2f} ms ± {std:.2f} (table)"}
        assert t.user_attrs["fits_devices"] == ["fast", "host"]


def test_the_export_says_where_the_latency_comes_from(table_run) -> None:
    fast, host = table_run["first"]["fast"], table_run["first"]["host"]
    table = table_run["fast"]
    digest = hashlib.sha256(table_run["fast_path"].read_bytes()).hexdigest()
    assert fast["metrics"]["latency"]["source"] == "latency table"
    assert fast["metrics"]["latency"]["table"]["sha256"] == digest
    assert fast["metrics"]["latency"]["table"]["fingerprint"] == table.study["fingerprint"]
    assert fast["metrics"]["latency"]["table"]["device"] == "fast"
    pick = table_run["pick"]
    assert fast["metrics"]["latency_ms"] == pytest.approx(table.predict(candidate_of(pick)))
    assert fast["metrics"]["latency"]["host_ms"] == pick.user_attrs["latency_ms"]
    value, std = table.estimate(candidate_of(pick))
    assert fast["metrics"]["latency"]["std_ms"] == pytest.approx(std)
    assert fast["metrics"]["latency"]["quantile"] == 0.5
    assert fast["metrics"]["latency"]["checked_ms"] == pytest.approx(value)
    assert fast["metrics"]["latency"]["text"] == f"{value:.2f} ms ± {std:.2f} (table)"
    assert host["metrics"]["latency"] == {
        "source": "host-measured",
        "host_ms": host["metrics"]["latency_ms"],
    }


def test_a_slow_part_in_a_table_changes_that_device_pick(table_run) -> None:
    second = table_run["second"]
    pick = table_run["pick"]
    # The device whose table is unchanged keeps its pick.
    assert second["fast"]["study"]["trial_number"] == pick.number
    # The slow device's table puts 10 s on the pick's head: it gets the best candidate
    # without that part.
    slow = second["slow"]
    assert slow["study"]["trial_number"] != pick.number
    head_anchor = table_run["head"].split("|", 1)[1]
    assert slow["candidate"].get("back", slow["candidate"].get("anchor")) != head_anchor
    assert slow["metrics"]["latency_ms"] <= 1000
    study = optuna.load_study(study_name="tiny", storage=_storage(table_run["out"]))
    allowed = [t for t in evaluated_trials(study) if candidate_of(t).back != head_anchor]
    best = max(
        allowed,
        key=lambda t: (t.user_attrs["val_acc"], -t.user_attrs["macs"], -t.user_attrs["params"]),
    )
    assert slow["study"]["trial_number"] == best.number


def test_summary_and_report_label_the_latency(table_run) -> None:
    report = (table_run["out"] / "report.html").read_text()
    fast = table_run["first"]["fast"]["metrics"]["latency"]["text"]
    assert fast.endswith(" (table)") and " ± " in fast
    assert fast in report and "(host-measured)" in report
    assert "latency ≤ 100000 ms (latency table)" in report
