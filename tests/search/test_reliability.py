"""Reliability with real services: a storage lost mid-study, secrets, umask, two SQLite drivers.

The drivers run as real ``search.run`` processes on the tiny study. PostgreSQL is the server
on 127.0.0.1:5432 (a fresh database per test, see ``test_scaleout.pg_url``); the outage is a
real TCP proxy in front of it that the test cuts (:mod:`tests.search.proxy`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.core import evaluated_trials
from search.run import EXIT_STORAGE_LOST
from tests.search.proxy import CuttableProxy
from tests.search.test_scaleout import pg_url  # noqa: F401  (fixture)

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
REPO = Path(__file__).resolve().parents[2]
SECRET = "Tr0ub4dor-and-3"


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("STITCHSEARCH_TEST_FAULT", None)
    env.pop("PGPASSWORD", None)
    return env


def _argv(devices: Path, out: Path, storage: str | None, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "search.run", "--budget-table", str(devices)]
    argv += ["--study", str(STUDY), "--out", str(out), *extra]
    return argv + (["--storage", storage] if storage else [])


def _start(argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    )


def _with_password(url: str, port: int | None = None) -> str:
    parsed = make_url(url).set(password=SECRET)
    if port is not None:
        parsed = parsed.set(port=port)
    return parsed.render_as_string(hide_password=False)


@pytest.fixture
def devices(tmp_path) -> Path:
    path = tmp_path / "devices.csv"
    path.write_text("device,max_macs\nsmall,14M\nany,\n")
    return path


@contextlib.contextmanager
def _proxy(url: str) -> Iterator[CuttableProxy]:
    parsed = make_url(url)
    proxy = CuttableProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    try:
        yield proxy
    finally:
        proxy.close()


def _complete(url: str) -> list[optuna.trial.FrozenTrial]:
    try:
        study = optuna.load_study(study_name="tiny", storage=url)
    except KeyError:
        return []
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def _wait_for(url: str, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(_complete(url)) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"fewer than {n} trials completed in {timeout} s"
        time.sleep(0.2)


# ------------------------------------------------------------------ storage outages
@pytest.mark.slow
def test_storage_lost_mid_study_is_retried_then_stops_and_resumes(
    tmp_path,
    devices,
    pg_url,  # noqa: F811
) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with _proxy(pg_url) as proxy:
        url = _with_password(pg_url, proxy.port)
        argv = _argv(devices, tmp_path / "out", url, "--trials", "14", "--no-report")
        argv += ["--storage-retry", "8"]
        proc = _start(argv)
        try:
            # A short outage (as a server restart): retried, the run goes on.
            _wait_for(pg_url, 3, proc)
            proxy.cut()
            time.sleep(2)
            proxy.restore()
            _wait_for(pg_url, 5, proc)
            # A long one: the run stops with the resume command.
            proxy.cut()
            before = {t.number: t.user_attrs["key"] for t in _complete(pg_url)}
            out, err = proc.communicate(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
        assert proc.returncode == EXIT_STORAGE_LOST, err[-3000:]
        assert "does not answer" in err and "storage answers again" in err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "resume with: python -m search.run" in errors[0], err[-2000:]
        assert "Traceback" not in err
        assert SECRET not in out + err
        assert "--storage-retry 8" in errors[0] and "$PGPASSWORD" in errors[0]

        # The rerun (same command, the storage back) completes the study.
        proxy.restore()
        rerun = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
    study = optuna.load_study(study_name="tiny", storage=pg_url)
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state for t in trials)
    assert not states[TrialState.RUNNING] and not states[TrialState.WAITING], states
    done = evaluated_trials(study)
    assert len(done) == 14
    keys = [t.user_attrs["key"] for t in done]
    assert len(set(keys)) == 14, "a candidate was evaluated twice"
    # Nothing recorded before the outage was lost; what it cut off was failed with a reason.
    now = {t.number: t for t in trials}
    assert all(now[n].state == TrialState.COMPLETE for n in before)
    assert all(now[n].user_attrs["key"] == k for n, k in before.items())
    for t in trials:
        if t.state == TrialState.FAIL:
            assert "left RUNNING by a driver that stopped" in t.user_attrs["fail_reason"]


# ------------------------------------------------------------------ secrets and umask
def _every_file(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_no_secret_in_any_output_and_artifacts_honour_the_umask(
    tmp_path,
    devices,
    pg_url,  # noqa: F811
) -> None:
    url = _with_password(pg_url)
    out = tmp_path / "out"
    argv = _argv(devices, out, url, "--trials", "5", "--onnx", "--no-finetune")
    proc = _start(argv, preexec_fn=lambda: os.umask(0o027))
    stdout, stderr = proc.communicate(timeout=420)
    assert proc.returncode == 0, stderr[-3000:]

    # No secret in anything printed, any file written, or the study's records.
    leaks = [p for p in _every_file(out) if SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert SECRET not in stdout + stderr
    study = optuna.load_study(study_name="tiny", storage=pg_url)
    records = json.dumps([study.user_attrs, [t.user_attrs for t in study.trials]], default=str)
    assert SECRET not in records
    dashboard = next(line for line in stdout.splitlines() if line.startswith("dashboard:"))
    assert make_url(pg_url).render_as_string() in dashboard and "$PGPASSWORD" in dashboard
    export = json.loads((out / "exports" / "any.json").read_text())
    assert "***" in export["study"]["storage"]

    # Artifacts are created like any other file: 0o666 less the umask (0o027).
    artifacts = [*_every_file(out / "exports"), out / "report.html"]
    assert any(p.suffix == ".onnx" for p in artifacts)
    assert any(p.suffix == ".safetensors" for p in artifacts)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in artifacts}
    assert set(modes.values()) == {0o640}, modes
    assert stat.S_IMODE((out / "exports").stat().st_mode) == 0o750


# ------------------------------------------------------------------ two SQLite drivers
@pytest.mark.slow
def test_two_drivers_on_one_sqlite_file_lose_nothing(tmp_path, devices) -> None:
    out = tmp_path / "out"
    argv = _argv(devices, out, None, "--trials", "12", "--no-report", "--workers", "1")
    procs = [_start(argv) for _ in range(2)]
    results = [p.communicate(timeout=420) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    db = out / "study.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{db}")
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))
    states = Counter(t.state for t in trials)
    assert not states[TrialState.RUNNING] and not states[TrialState.FAIL], states
    done = evaluated_trials(study)
    assert len(done) == 12 and len({t.user_attrs["key"] for t in done}) == 12
    by_run = [int(re.search(r"this run: (\d+) evaluated", o).group(1)) for o, _ in results]
    assert sum(by_run) == 12, by_run
