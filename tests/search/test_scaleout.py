"""Scale-out: two ``search.run`` drivers on one PostgreSQL study and an existing Ray cluster.

The cluster is started here with ``ray start --head`` in its own session (temp dir under the
test's folder, free ports, 127.0.0.1) and torn down by killing that session; ``ray stop``
would also stop every other Ray cluster on the machine. The drivers run as subprocesses, so
the test session's own local cluster (conftest ``ray_cluster``) is not involved.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.core import evaluated_trials
from search.store import HEARTBEAT_KEY

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("STITCHSEARCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test (dropped afterwards), as a storage URL.

    Fails when the server is unreachable in CI; skips (with the reason) outside CI.
    """
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        message = f"PostgreSQL at {PG_ADMIN} is unreachable ({str(e).strip()[:200]})"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message + "; start it or set STITCHSEARCH_TEST_PG")
    name = f"stitch_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
    return pids


def _kill_session(sid: int, grace: float = 5.0) -> list[int]:
    """SIGTERMs, then SIGKILLs, every process of session ``sid``; returns those left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 15.0)):
        for pid in _session_pids(sid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
    return _session_pids(sid)


@pytest.fixture
def ray_head() -> Iterator[str]:
    """``ray start --head`` on 127.0.0.1 with 2 CPUs; yields its address ``host:port``."""
    port = _free_port()
    # Ray's socket paths must stay short: a temp dir directly under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    argv = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--dashboard-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "w") as f:
        head = subprocess.Popen(
            argv, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert head.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                if "--block" in log.read_text():  # ray start has finished starting
                    break
            assert time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        left = _kill_session(head.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=10)
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of the test cluster survived: {left}"


# ---------------------------------------------------------------------------- the test
@pytest.mark.slow
def test_two_drivers_share_one_postgresql_study(tmp_path, pg_url, ray_head) -> None:
    devices = tmp_path / "devices.csv"
    devices.write_text("device,max_macs\nsmall,14M\nany,\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("STITCHSEARCH_TEST_FAULT", None)
    drivers = []
    for name in ("a", "b"):
        argv = [sys.executable, "-m", "search.run", "--budget-table", str(devices)]
        argv += ["--study", str(STUDY), "--trials", "6", "--workers", "2", "--no-report"]
        argv += ["--ray-address", ray_head, "--storage", pg_url, "--out", str(tmp_path / name)]
        drivers.append(
            subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        )
    outputs = []
    try:
        for proc in drivers:
            outputs.append(proc.communicate(timeout=420))
    finally:
        for proc in drivers:
            _kill_session(proc.pid, grace=1.0)
    for proc, (_, err) in zip(drivers, outputs, strict=True):
        assert proc.returncode == 0, err[-4000:]
        assert "Traceback" not in err, err[-4000:]

    study = optuna.load_study(study_name="tiny", storage=pg_url)
    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    # No trial lost: every trial finished, none failed, none left running or waiting.
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    assert not by_state[TrialState.FAIL], [t.user_attrs for t in by_state[TrialState.FAIL]]
    # The total as requested, no configuration evaluated twice.
    done = evaluated_trials(study)
    assert len(done) == 6
    keys = [t.user_attrs["key"] for t in done]
    assert len(set(keys)) == 6
    assert sum(t.user_attrs["kind"] == "anchor" for t in done) == 2
    # Consistent rows: values match the attributes; repeats point at an evaluation.
    for t in by_state[TrialState.COMPLETE]:
        assert t.values == [t.user_attrs["val_acc"], t.user_attrs["macs"]]
        if "duplicate_of" in t.user_attrs:
            assert study.trials[t.user_attrs["duplicate_of"]].values == t.values
    cka_pruned = [t for t in by_state[TrialState.PRUNED] if "cka" in t.user_attrs]
    pruned_keys = [t.user_attrs["key"] for t in cka_pruned]
    assert pruned_keys and len(pruned_keys) == len(set(pruned_keys)), "pruned points twice"
    assert not set(pruned_keys) & set(keys)
    for t in by_state[TrialState.PRUNED]:
        assert t.user_attrs["pruned_reason"]
    # Both drivers took part, wrote heartbeats and stopped cleanly.
    beats = {k: v for k, v in study.user_attrs.items() if k.startswith(HEARTBEAT_KEY)}
    assert len(beats) == 2 and all(b["stopped"] for b in beats.values())
    ids = {k.removeprefix(HEARTBEAT_KEY) for k in beats}
    assert {t.user_attrs["driver"] for t in done} <= ids
    evaluated_by = [
        int(re.search(r"this run: (\d+) evaluated", out).group(1)) for out, _ in outputs
    ]
    assert sum(evaluated_by) == 6, evaluated_by
    for name in ("a", "b"):
        doc = json.loads((tmp_path / name / "exports" / "any.json").read_text())
        assert doc["final"] is True
        assert doc["study"]["evaluated_trials"] == 6
        assert doc["study"]["storage"] == pg_url


# ------------------------------------------------------ the claim protocol, without Ray
def _fake_result(config: dict) -> dict:
    cand = json.loads(config["candidate"])
    macs = 1e6 if cand["kind"] == "anchor" else 2e6 + 1e5 * cand["front_block"]
    return {"val_acc": 50.0 + macs / 1e6, "macs": macs, "params": 1e3, "latency_ms": 1.0}


def test_interleaved_searchers_neither_overshoot_nor_repeat() -> None:
    """Two drivers with the same seed ask in lockstep: the earlier trial wins each clash."""
    import numpy as np
    from ray.tune.search import Searcher

    from search.core import DeviceBudget, PruningRule, SearchSpace
    from search.strategy import SearcherSettings, StitchSearcher

    space = SearchSpace({"a": 3, "b": 4})
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(), directions=["maximize", "minimize"]
    )
    for c in space.anchors():
        study.enqueue_trial(space.encode(c))
    cka = {pair: np.full((4, 5) if pair[0] == "a" else (5, 4), 0.9) for pair in space.pairs()}

    def searcher(driver: str, total: int = 7) -> StitchSearcher:
        view = optuna.load_study(
            study_name=study.study_name,
            storage=study._storage,
            sampler=optuna.samplers.RandomSampler(seed=0),
        )
        settings = SearcherSettings(
            objectives=["accuracy", "macs"],
            budgets=[DeviceBudget("any", max_macs=1e9)],
            rule=PruningRule(),
            total=total,
            driver_id=driver,
        )
        return StitchSearcher(view, space, settings, sampler=view.sampler, cka=cka)

    a, b = searcher("a"), searcher("b")
    live: list[tuple[StitchSearcher, str, dict]] = []
    finished = set()
    for step in range(40):
        for s in (a, b):
            if s in finished:
                continue
            trial_id = f"{s.settings.driver_id}{step}"
            cfg = s.suggest(trial_id)
            if cfg == Searcher.FINISHED:
                finished.add(s)
            elif isinstance(cfg, dict):
                live.append((s, trial_id, cfg))
        if step % 2:  # results arrive late: clashes with running trials happen
            for s, trial_id, cfg in live:
                s.on_trial_complete(trial_id, _fake_result(cfg))
            live.clear()
    for s, trial_id, cfg in live:
        s.on_trial_complete(trial_id, _fake_result(cfg))
    done = evaluated_trials(study)
    assert len(done) == 7
    keys = [t.user_attrs["key"] for t in done]
    assert len(set(keys)) == 7, "a configuration was evaluated twice"
    assert {t.user_attrs["driver"] for t in done} == {"a", "b"}
    assert a.completed + b.completed == 7
    assert not study.get_trials(states=(TrialState.RUNNING,))

    # The race the storage order settles: B asked for the configuration A is evaluating
    # (or for one slot too many) before it could see A's trial.
    c = space.decode(done[-1].params)
    a2, b2 = searcher("a2", total=9), searcher("b2", total=9)
    first = a2.suggest("x")  # A: dispatched, the 8th of 9
    assert isinstance(first, dict)
    first_key = json.loads(first["candidate"])
    running = next(x for x in space.all_candidates() if x.to_dict() == first_key)
    fresh = [x for x in space.all_candidates() if x.key not in {*keys, running.key}]

    def clash(s: StitchSearcher, cand) -> tuple[str, int | None]:
        s.study.enqueue_trial(space.encode(cand))
        trial = s.study.ask(space.distributions())
        s.recorder.annotate(trial, cand)
        verdict = s.claims.decide(trial, cand)
        if verdict[0] != "ok":  # as suggest() does: recorded, not dispatched
            s.recorder.prune(trial, verdict[0])
        return verdict

    assert clash(b2, running) == ("running", None)
    assert clash(b2, c) == ("done", done[-1].number)
    assert clash(b2, fresh[0]) == ("ok", None)  # the 9th of 9
    assert clash(b2, fresh[1]) == ("surplus", None)
