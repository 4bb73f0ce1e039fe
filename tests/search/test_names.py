"""Hostile study and device names: stored as plain values, no path leaves the output folder."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import optuna
import pytest

from search.core import safe_filename
from search.run import main
from tests.search.test_scaleout import pg_url  # noqa: F401  (fixture)

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
NAME = '../evil "quoted" ünïcode/x'
DEVICES = ["../../x", "a/b", '"q"', "ü", "..", "/etc/passwd"]


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    text = STUDY.read_text().replace("name: tiny", f"name: {json.dumps(NAME)}", 1)
    assert NAME not in STUDY.read_text() and "name: tiny" in STUDY.read_text()
    study = tmp_path / "study.yaml"
    study.write_text(text)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["device", "max_macs"])
    for d in DEVICES:
        writer.writerow([d, ""])
    devices = tmp_path / "devices.csv"
    devices.write_text(buf.getvalue())
    return study, devices


def _snapshot(root: Path) -> set[Path]:
    return set(root.rglob("*"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hostile_names_stay_plain_values_inside_the_output(
    backend, tmp_path, ray_cluster, monkeypatch, request
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    study_file, devices = _inputs(tmp_path)
    monkeypatch.chdir(work)  # the default --out is runs/<study name>, relative to here
    argv = ["--budget-table", str(devices), "--study", str(study_file), "--trials", "2"]
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
        argv += ["--storage", url, "--no-report"]
    before = _snapshot(tmp_path)
    assert main(argv) == 0
    out = work / "runs" / safe_filename(NAME)
    created = _snapshot(tmp_path) - before
    assert created, "nothing was written"
    runs = (work / "runs").resolve()
    for p in created:
        assert p.resolve().is_relative_to(runs), f"{p} is outside runs/"
    assert [p.name for p in (work / "runs").iterdir()] == [out.name]
    assert ".." not in out.name and "/" not in out.name
    # The storage holds the name as given.
    storage = url if backend == "postgresql" else f"sqlite:///{out / 'study.db'}"
    assert optuna.get_all_study_names(storage) == [NAME]
    study = optuna.load_study(study_name=NAME, storage=storage)
    assert study.user_attrs["study_definition"]["name"] == NAME
    # One export per device, each inside exports/ and naming its device exactly.
    exports = sorted((out / "exports").glob("*.json"))
    assert len(exports) == len(DEVICES)
    docs = [json.loads(p.read_text()) for p in exports]
    assert sorted(d["device"] for d in docs) == sorted(DEVICES)
    for p, d in zip(exports, docs, strict=True):
        assert p.parent == out / "exports"
        assert d["study"]["name"] == NAME
        if d["stitch"] is not None:
            assert (p.parent / d["stitch"]["weights"]).resolve().parent == p.parent.resolve()
    assert not (work / "x").exists() and not (tmp_path / "x").exists()
    if backend == "sqlite":
        assert f"<code>{html.escape(NAME)}</code>" in (out / "report.html").read_text()
