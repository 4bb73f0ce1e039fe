"""The storage layer: passwords never shown, retries on a busy or absent database."""

from __future__ import annotations

import sqlite3
import threading
import time

import optuna
import pytest

from search.core import PASSWORD_ENV, has_password, masked_url, url_without_password
from search.delivery import dashboard_command
from search.inputs import prepare
from search.run import build_parser
from search.store import ResilientRDBStorage, StorageUnavailable, make_storage

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql+psycopg://alice:{SECRET}@db.example:5432/study",
        f"postgresql+psycopg://alice:{SECRET}@db.example:5432/study?sslmode=require",
        f"postgresql+psycopg://alice:{SECRET}@db.example:port/study",  # unparsable port
        f"mysql://alice:{SECRET}@h/db",
    ],
)
def test_passwords_are_masked_or_left_out(url: str) -> None:
    assert has_password(url)
    assert SECRET not in masked_url(url) and "alice:***@db" in masked_url(url).replace("@h/", "@db")
    assert SECRET not in url_without_password(url)
    assert "alice@" in url_without_password(url)
    line = dashboard_command(url)
    assert SECRET not in line and f"${PASSWORD_ENV}" in line


def test_urls_without_password_are_shown_as_given() -> None:
    url = "sqlite:////tmp/runs/study.db"
    assert not has_password(url)
    assert masked_url(url) == url_without_password(url) == url
    assert dashboard_command(url) == f"optuna-dashboard {url}"


def test_the_resume_hint_leaves_the_password_out(tmp_path) -> None:
    devices = tmp_path / "d.csv"
    devices.write_text("device,max_macs\nedge,1M\n")
    db = tmp_path / "s.db"
    argv = ["--budget-table", str(devices), "--storage", f"sqlite:///{db}", "--trials", "2"]
    plan = prepare(build_parser().parse_args(argv), argv)
    assert plan.command.startswith("python -m search.run --budget-table")
    assert PASSWORD_ENV not in plan.command
    assert not db.exists(), "validating the plan created the database"


def _locked(db, seconds: float) -> threading.Thread:
    """Holds an exclusive lock on the SQLite file for ``seconds`` (another writer)."""
    ready = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        ready.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait()
    return thread


def _fast_fail_storage(url: str, retry_s: float, messages: list[str]) -> ResilientRDBStorage:
    """The run's storage class, with a short busy timeout so each attempt fails at once."""
    storage = ResilientRDBStorage(url, engine_kwargs={"connect_args": {"timeout": 0.05}})
    storage.retry_s, storage.on_retry = retry_s, messages.append
    return storage


def test_a_busy_database_is_retried_until_it_answers(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    messages: list[str] = []
    storage = _fast_fail_storage(url, retry_s=30, messages=messages)
    study = optuna.create_study(storage=storage, study_name="s")
    holder = _locked(tmp_path / "s.db", 1.5)
    study.set_user_attr("written", True)  # waits for the lock, then writes
    holder.join()
    assert optuna.load_study(study_name="s", storage=url).user_attrs == {"written": True}
    assert len(messages) == 2
    assert "does not answer (database is locked)" in messages[0]
    assert messages[1].startswith("storage answers again")


def test_a_database_that_does_not_come_back_raises_storage_unavailable(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = _fast_fail_storage(url, retry_s=0.5, messages=[])
    study = optuna.create_study(storage=storage, study_name="s")
    holder = _locked(tmp_path / "s.db", 3)
    t0 = time.monotonic()
    with pytest.raises(StorageUnavailable, match="did not come back within 0.5 s"):
        study.set_user_attr("written", True)
    assert time.monotonic() - t0 < 2.5  # bounded by retry_s, not the lock
    holder.join()
    assert "written" not in optuna.load_study(study_name="s", storage=url).user_attrs


def test_errors_that_are_not_about_reaching_the_database_are_not_retried(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    messages: list[str] = []
    storage = make_storage(url, retry_s=30, on_retry=messages.append)
    t0 = time.monotonic()
    with pytest.raises(KeyError):
        storage.get_study_id_from_name("no such study")
    assert time.monotonic() - t0 < 1 and not messages
