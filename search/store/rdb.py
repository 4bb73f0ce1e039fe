"""The open storage: an Optuna RDB storage that survives a database that stops answering.

:func:`make_storage` opens it (SQLite in WAL mode, or a server); every call that fails
because the database did not answer is retried for a while (:class:`ResilientRDBStorage`),
then :class:`StorageUnavailable` stops the run with the resume command.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import (
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)

from search.core import masked_url, server_said, url_without_password
from search.inputs import DEFAULT_RETRY_S, StorageError
from search.store import optuna_access

#: Errors of the storage itself (the database or Optuna's layer over it): what a periodic,
#: skippable storage chore may swallow. A storage gone for good (:class:`StorageUnavailable`)
#: and programming errors are not among them.
STORAGE_ERRORS: tuple[type[Exception], ...] = (
    SQLAlchemyError,
    optuna.exceptions.StorageInternalError,
)


class StorageUnavailable(RuntimeError):
    """The storage stopped answering mid-study and did not come back in time."""

    def __init__(self, url: str, cause: str, seconds: float) -> None:
        self.url = masked_url(url)
        self.cause = cause
        self.seconds = seconds
        super().__init__(
            f"storage {self.url} stopped answering ({cause}) and did not come back "
            f"within {seconds:g} s"
        )


def _transient(error: BaseException | None) -> bool:
    """Whether an error means the database did not answer (worth trying again)."""
    while error is not None and not isinstance(error, StorageUnavailable):
        if isinstance(error, OperationalError | InterfaceError):
            return True
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """An Optuna RDB storage whose calls survive a storage that stops answering for a while.

    Every storage call that fails because the database did not answer (server restarted,
    connection dropped, SQLite busy) is tried again with exponential backoff for up to
    ``retry_s`` seconds; then :class:`StorageUnavailable` is raised, which stops the run
    with the resume command. The first failure and the recovery are reported through
    ``on_retry``.
    """

    retry_s: float = DEFAULT_RETRY_S
    on_retry: Callable[[str], Any] | None = None
    _outage_lock = threading.Lock()
    _outage_since: float | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Ray Tune pickles its searcher (and with it the study's storage) into the run's
        # experiment state under --out: keep the password out of those files. Unpickled, the
        # storage connects without it (PostgreSQL then reads $PGPASSWORD).
        state = super().__getstate__()
        state["url"] = url_without_password(state["url"])
        state["on_retry"] = None
        return state

    def _report(self, message: str) -> None:
        if self.on_retry is not None:
            with contextlib.suppress(Exception):
                self.on_retry(message)

    def _retrying(self, call: Callable[[], Any]) -> Any:
        delay = 0.25
        first: float | None = None
        while True:
            try:
                result = call()
            except Exception as e:
                if not _transient(e):
                    raise
                now = time.monotonic()
                first = now if first is None else first
                with self._outage_lock:
                    if self._outage_since is None:
                        self._outage_since = now
                        self._report(
                            f"storage {masked_url(self.url)} does not answer "
                            f"({cause_line(e)}); retrying for up to {self.retry_s:g} s"
                        )
                if now - first + delay > self.retry_s:
                    raise StorageUnavailable(self.url, cause_line(e), self.retry_s) from None
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if first is not None or self._outage_since is not None:
                with self._outage_lock:
                    if self._outage_since is not None:
                        down = time.monotonic() - self._outage_since
                        self._outage_since = None
                        self._report(f"storage answers again (after {down:.0f} s)")
            return result


def cause_line(error: BaseException) -> str:
    """The database's own words for an error, on one line."""
    while isinstance(error.__cause__, BaseException) and not isinstance(error, DBAPIError):
        error = error.__cause__
    orig = getattr(error, "orig", None) or error
    return server_said(str(orig))


def _wrap(name: str) -> None:
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def call(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        return self._retrying(lambda: method(self, *args, **kwargs))

    setattr(ResilientRDBStorage, name, call)


for _name in optuna_access.RDB_CALLS:
    _wrap(_name)


def make_storage(
    url: str,
    *,
    retry_s: float = DEFAULT_RETRY_S,
    on_retry: Callable[[str], Any] | None = None,
) -> optuna.storages.RDBStorage:
    """Opens the RDB storage (SQLite in WAL mode, with a generous lock timeout).

    Calls are retried while the storage does not answer (:class:`ResilientRDBStorage`).
    Two drivers opening a new PostgreSQL database at the same moment both create Optuna's
    schema, and one of them fails on a duplicate type or table; it tries again (the schema
    then exists).

    Raises:
        StorageError: The storage cannot be opened (one line, password masked).
    """
    try:
        storage = _open(url)
    except (DBAPIError, optuna.exceptions.StorageInternalError) as e:
        raise StorageError(
            f"--storage: cannot open {masked_url(url)}: {cause_line(e)}; check it and run again"
        ) from None
    storage.retry_s = retry_s
    storage.on_retry = on_retry
    return storage


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on a folder, between processes on this machine."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open(url: str) -> ResilientRDBStorage:
    if not url.startswith("sqlite"):
        for attempt in range(3):
            try:
                return ResilientRDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            except (IntegrityError, ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))

    # Drivers opening a new SQLite file at once would each create Optuna's tables and
    # stamp its schema version, and all but one fail (or see a half-made schema): they take
    # turns, holding a lock on the file's folder (no lock file is left behind).
    with _folder_lock(Path(make_url(url).database or ".").expanduser().resolve().parent):
        storage = ResilientRDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    # WAL lets optuna-dashboard read while the driver writes, and with synchronous=NORMAL a
    # trial's dozen attribute writes cost ~2.5x less than with the default rollback journal.
    @event.listens_for(storage.engine, "connect")
    def _pragmas(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    storage.engine.dispose()
    return storage
