"""A heartbeat that cannot be written warns once, on a real SQLite storage (issue 26, 5c)."""

from __future__ import annotations

import sqlite3

import optuna

from search.store import STALE_AFTER_S, Heartbeat, heartbeats


def test_a_failing_heartbeat_warns_once_per_outage(tmp_path) -> None:
    db = tmp_path / "s.db"
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{db}", engine_kwargs={"connect_args": {"timeout": 0.05}}
    )
    study = optuna.create_study(storage=storage, study_name="s")
    lines: list[str] = []
    beat = Heartbeat(study, "me", interval=3600, log=lines.append)  # beats by hand below
    beat.beat()
    first = heartbeats(study)["me"]["time"]
    locker = sqlite3.connect(db, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the database
        for _ in range(4):
            beat.beat()
        assert beat.failing and len(lines) == 1, lines
        line = lines[0]
        assert "\n" not in line
        assert line.startswith("warning: this driver's heartbeat could not be written to study 's'")
        assert "database is locked" in line and f"after {STALE_AFTER_S:g} s" in line
        locker.execute("ROLLBACK")
        beat.beat()  # the storage answers again: written, and the warning re-armed
        assert not beat.failing and heartbeats(study)["me"]["time"] > first
        locker.execute("BEGIN EXCLUSIVE")
        beat.beat()
        beat.beat()
        assert len(lines) == 2  # a second outage, one more line
    finally:
        locker.close()
