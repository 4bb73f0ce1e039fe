"""Fault tolerance: failing trials, dead workers, a killed driver, Ctrl-C.

Faults are injected with the test-only ``STITCHSEARCH_TEST_FAULT`` hook of search/worker.py:
the k-th trial to start gets the k-th listed fault.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.core import evaluated_trials
from search.run import main
from search.workers import FAULT_DIR_ENV, FAULT_ENV

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
REPO = Path(__file__).resolve().parents[2]
DEVICES = "device,max_macs\nany,\n"


def _study_file(tmp_path: Path, **fields: object) -> Path:
    text = STUDY.read_text()
    for key, value in fields.items():
        lines = [ln for ln in text.splitlines() if not ln.startswith(f"{key}:")]
        text = "\n".join([*lines, f"{key}: {value}"]) + "\n"
    path = tmp_path / "study.yaml"
    path.write_text(text)
    return path


def _load(out: Path) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")


def _faults_by_trial(folder: Path) -> dict[int, str]:
    """Trial number -> the fault it got (trials after the last fault get none)."""
    faults = {int(p.name.removeprefix("trial-")): p.read_text() for p in folder.glob("trial-*")}
    return {n: f for n, f in faults.items() if f}


def _attempts(folder: Path, number: int) -> int:
    path = folder / f"attempts-{number}"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.mark.slow
def test_failing_trials_are_recorded_and_the_search_goes_on(
    tmp_path, ray_cluster, monkeypatch, capsys
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULT_ENV, "raise,nan,sleep:900,die,crash")
    monkeypatch.setenv(FAULT_DIR_ENV, str(faults))
    study_file = _study_file(tmp_path, trial_timeout_s=4, max_retries=1, trials=3)
    devices = tmp_path / "d.csv"
    devices.write_text(DEVICES)
    out = tmp_path / "out"
    t0 = time.monotonic()
    argv = ["--budget-table", str(devices), "--study", str(study_file), "--out", str(out)]
    rc = main([*argv, "--no-report"])
    elapsed = time.monotonic() - t0
    printed = capsys.readouterr()
    assert rc == 0, printed.err[-3000:]
    study = _load(out)
    # The search went on past five failures and evaluated the requested three candidates.
    assert len(evaluated_trials(study)) == 3
    assert not study.get_trials(states=(TrialState.RUNNING,))
    by_trial = _faults_by_trial(faults)
    assert sorted(by_trial.values()) == sorted(["raise", "nan", "sleep:900", "die", "crash"])
    expected = {
        "raise": "injected test fault",
        "nan": "objective accuracy is nan",
        "sleep:900": "timed out after 4 s",
        "die": "Ray worker process died",
        "crash": "died mid-trial with signal SIGKILL",
    }
    for number, fault in by_trial.items():
        t = study.trials[number]
        assert t.state == TrialState.FAIL, (fault, t.state)
        assert expected[fault] in t.user_attrs["fail_reason"], (fault, t.user_attrs)
        # A worker that dies is retried max_retries (1) times; nothing else is retried.
        retried = fault in ("die", "crash")
        assert _attempts(faults, number) == (2 if retried else 1), fault
        if retried:
            assert "2 attempt(s)" in t.user_attrs["fail_reason"]
    # The timed-out evaluation was stopped, not left running beside later trials.
    timed_out = next(study.trials[n] for n, f in by_trial.items() if f == "sleep:900")
    assert timed_out.user_attrs["trial_seconds"] < 30
    assert not _pid_alive(timed_out.user_attrs["eval_pid"])
    later_pids = {t.user_attrs.get("eval_pid") for t in evaluated_trials(study)}
    assert timed_out.user_attrs["eval_pid"] not in later_pids
    assert elapsed < 450, "the 900 s sleep was waited for"
    assert f"trial {timed_out.number} failed: timed out after 4 s" in printed.err
    doc = json.loads((out / "exports" / "any.json").read_text())
    assert doc["final"] is True and doc["study"]["evaluated_trials"] == 3


# ------------------------------------------------------------------ killed driver, Ctrl-C
def _driver(tmp_path: Path, out: Path, faults: Path, trials: int = 6) -> subprocess.Popen:
    """``python -m search.run`` on the tiny study in its own session; trials 3 and 4 sleep."""
    devices = tmp_path / "d.csv"
    devices.write_text(DEVICES)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        FAULT_ENV: "none,none,sleep:40,sleep:40",
        FAULT_DIR_ENV: str(faults),
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "search.run", "--budget-table", str(devices)]
    argv += ["--study", str(STUDY), "--out", str(out), "--trials", str(trials), "--no-report"]
    return subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(proc: subprocess.Popen, out: Path, faults: Path, timeout: float = 240) -> None:
    """Waits until two trials are COMPLETE and both slow trials are running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        slow = [n for n, f in _faults_by_trial(faults).items() if f.startswith("sleep")]
        if (out / "study.db").exists() and len(slow) == 2:
            with _quiet_optuna():
                study = _load(out)
                complete = study.get_trials(states=(TrialState.COMPLETE,))
                running = study.get_trials(states=(TrialState.RUNNING,))
            if len(complete) >= 2 and len(running) == 2:
                return
        time.sleep(0.5)
    raise AssertionError("the driver did not get two trials done in time")


class _quiet_optuna:
    def __enter__(self):
        self.level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)

    def __exit__(self, *exc):
        optuna.logging.set_verbosity(self.level)


def _session_processes(sid: int) -> list[str]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(stat.parent.name)
    return found


def _kill_session(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
def test_sigkill_then_resume_completes_the_study(tmp_path) -> None:
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    proc = _driver(tmp_path, out, faults, trials=4)
    try:
        _wait_for(proc, out, faults)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        # The driver's local Ray cluster and evaluation processes went with it.
        deadline = time.monotonic() + 20
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _session_processes(proc.pid)
    finally:
        _kill_session(proc)
    orphans = [n for n, f in _faults_by_trial(faults).items() if f.startswith("sleep")]
    study = _load(out)
    assert {t.number for t in study.get_trials(states=(TrialState.RUNNING,))} == set(orphans)
    assert not (out / "exports").exists(), "a killed run left exports"
    # The same command again: stale trials failed at once, study completed, exports final.
    t0 = time.monotonic()
    again = _driver(tmp_path, out, faults, trials=4)
    try:
        _, stderr = again.communicate(timeout=300)
    finally:
        _kill_session(again)
    assert again.returncode == 0, stderr[-3000:]
    assert time.monotonic() - t0 < 200
    assert "Traceback" not in stderr
    assert f"left RUNNING by a stopped driver: {sorted(orphans)}" in stderr
    study = _load(out)
    assert len(evaluated_trials(study)) == 4
    assert not study.get_trials(states=(TrialState.RUNNING,))
    for n in orphans:
        t = study.trials[n]
        assert t.state == TrialState.FAIL
        assert "its process" in t.user_attrs["fail_reason"], t.user_attrs["fail_reason"]
    keys = [t.user_attrs["key"] for t in evaluated_trials(study)]
    assert len(keys) == len(set(keys))
    exports = list((out / "exports").glob("*.json"))
    assert exports and all(json.loads(p.read_text())["final"] is True for p in exports)
    assert not list(out.glob(".exports-*")), "staging folders left behind"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code"),
    # Ctrl-C in a terminal signals the whole process group; `kill PID` or a service manager
    # sends SIGTERM to the driver, whose SIGTERM handler ray.init had once replaced by
    # Ray's own (a stack dump, exit 1, no summary, trials left RUNNING).
    [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_stops_cleanly_with_a_summary(tmp_path, sig, code) -> None:
    out, faults = tmp_path / "out", tmp_path / "faults"
    faults.mkdir()
    proc = _driver(tmp_path, out, faults)
    try:
        _wait_for(proc, out, faults)
        t0 = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
        stdout, stderr = proc.communicate(timeout=60)
        stopped_in = time.monotonic() - t0
    finally:
        _kill_session(proc)
    assert proc.returncode == code, stderr[-3000:]
    assert stopped_in < 30, "the stop waited for the running trials"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "SIGTERM received" not in stderr, stderr[-3000:]
    assert "INTERRUPTED: study 'tiny': 2/6 candidates evaluated" in stdout
    assert "2 stopped in flight" in stdout
    assert "to resume, run the same command again: python -m search.run" in stdout
    study = _load(out)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    in_flight = [n for n, f in _faults_by_trial(faults).items() if f.startswith("sleep")]
    for n in in_flight:
        assert study.trials[n].state == TrialState.FAIL
        assert study.trials[n].user_attrs["fail_reason"] == f"interrupted ({sig.name})"
    assert not (out / "exports").exists()


# ------------------------------------------------------------------ building blocks
def test_a_dead_driver_on_this_machine_is_recognised_at_once() -> None:
    from search.store import driver_identity, driver_status
    from search.store.liveness import _process_start

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        beat = {**driver_identity(), "pid": child.pid, "start": _process_start(child.pid)}
        beat["time"] = time.time()
        assert driver_status(beat) == (True, "")
        # Same pid, another process (the pid was reused): dead.
        assert not driver_status({**beat, "start": "1"})[0]
        child.kill()
        time.sleep(0.5)  # a zombie now (not reaped yet): dead all the same
        alive, why = driver_status(beat)
        assert not alive and f"process {child.pid}" in why
    finally:
        child.kill()
        child.wait()
    assert not driver_status({**beat, "pid": os.getpid(), "stopped": True})[0]
    # Elsewhere (another host): the heartbeat's age decides.
    remote = {**beat, "host": "elsewhere", "time": time.time()}
    assert driver_status(remote)[0]
    assert not driver_status({**remote, "time": time.time() - 120})[0]
    assert driver_status(time.time())[0] and not driver_status(time.time() - 3600)[0]


def test_running_trials_without_a_driver_fail_only_when_old() -> None:
    from search.store import fail_stale_trials

    study = optuna.create_study(directions=["maximize", "minimize"])
    young = study.ask()
    assert fail_stale_trials(study) == []
    assert fail_stale_trials(study, now=time.time() + 120) == [young.number]
    assert "names no driver" in study.trials[young.number].user_attrs["fail_reason"]


def test_exports_are_published_whole_and_stale_staging_is_removed(tmp_path) -> None:
    from search.delivery import clean_staging, publish, staging_dir

    target = tmp_path / "exports"
    target.mkdir()
    (target / "old.json").write_text("{}")
    staging = staging_dir(tmp_path, "a" * 32)
    staging.mkdir()
    (staging / "new.json").write_text("{}")
    publish(staging, target)
    assert [p.name for p in target.iterdir()] == ["new.json"]
    assert not staging.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["exports"]
    dead, live = staging_dir(tmp_path, "b" * 32), staging_dir(tmp_path, "c" * 32)
    dead.mkdir()
    live.mkdir()
    assert clean_staging(tmp_path, live={"c" * 32}) == [dead]
    assert live.exists() and not dead.exists()
