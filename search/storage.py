"""The study's storage: URLs, opening and setting up the study, failing this run's trials.

The storage is an Optuna RDB storage (SQLite by default, PostgreSQL when several drivers
share a study). URLs are validated here and printed only through :func:`masked_url`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    IntegrityError,
    InterfaceError,
    OperationalError,
    ProgrammingError,
)

from search import optuna_access
from search.candidates import PruningRule, SearchSpace
from search.liveness import driver_status, heartbeats
from search.pruning import PruningSignals, record_pruned_trials
from search.study import Study
from search.trials import Attr, StudyAttr, metric_names
from space import InputError

#: Optuna's own tables: a database holding other tables but none of these belongs to
#: another program.
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})

#: How long a storage that stops answering mid-study is retried (``--storage-retry``).
DEFAULT_RETRY_S = 60.0

#: The environment variable PostgreSQL's client library reads the password from.
PASSWORD_ENV = "PGPASSWORD"

_PASSWORD_IN_URL = re.compile(r"(?P<head>://[^:/@\s]*:)(?P<password>[^@\s]*)(?P<tail>@)")


class StorageError(InputError):
    """The storage cannot be used: one line with the masked URL, the cause and the fix."""


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


def storage_url(raw: str | None, out: Path) -> str:
    """Validates ``--storage`` (default: ``study.db`` under ``out``).

    Raises:
        InputError: Not a database URL, an SQLite file in a missing folder, a missing
            driver, or an unsupported database.
    """
    if raw is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    shown = masked_url(raw)
    try:
        url = make_url(raw)
    except (ArgumentError, ValueError):
        raise InputError(
            f"--storage: {shown!r} is not a database URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database:
            raise InputError(f"--storage: {shown!r} names no SQLite file; use sqlite:///PATH")
        parent = Path(url.database).expanduser().resolve().parent
        if not parent.is_dir():
            raise InputError(f"--storage: folder {str(parent)!r} of {shown!r} does not exist")
    elif backend == "postgresql":
        driver = url.get_driver_name()
        module = {"psycopg": "psycopg", "psycopg2": "psycopg2"}.get(driver, driver)
        try:
            __import__(module)
        except ImportError:
            raise InputError(
                f"--storage: driver {driver!r} for {shown!r} is not installed; "
                "pip install 'stitchsearch[postgres]' and use postgresql+psycopg://..."
            ) from None
    elif backend not in ("mysql",):
        raise InputError(
            f"--storage: unsupported database {backend!r} in {shown!r}; use sqlite or postgresql"
        )
    return raw


def masked_url(url: str) -> str:
    """The storage URL with any password replaced by ``***`` (also for unparsable URLs)."""
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:
        shown = url
    return _PASSWORD_IN_URL.sub(r"\g<head>***\g<tail>", shown)


def has_password(url: str) -> bool:
    """Whether the URL carries a password."""
    try:
        return bool(make_url(url).password)
    except Exception:
        return bool(_PASSWORD_IN_URL.search(url))


def url_without_password(url: str) -> str:
    """The URL with its password left out (the client then reads ``$PGPASSWORD``)."""
    try:
        parsed = make_url(url)
    except Exception:
        return _PASSWORD_IN_URL.sub(r"\g<head>\g<tail>", url).replace(":@", "@")
    # URL.set() keeps a password given as None; build the URL without one instead.
    return URL.create(
        parsed.drivername,
        username=parsed.username,
        host=parsed.host,
        port=parsed.port,
        database=parsed.database,
        query=parsed.query,
    ).render_as_string(hide_password=False)


# ------------------------------------------------------------------ start-up checks
def check_storage(url: str) -> None:
    """Checks that the storage can hold the study, reading only; writes nothing.

    Called while the plan is validated, so a bad storage stops the run before anything is
    written. A database that does not exist yet (an SQLite file in a writable folder) is
    fine; a reachable server, the credentials, the database, its tables (Optuna's or none)
    and their schema version are checked.

    Raises:
        StorageError: One line: the storage (password masked), the cause and the fix.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not _check_sqlite_file(url, parsed):
        return  # a new file: Optuna creates it
    engine = _probe_engine(url, parsed)
    try:
        try:
            with engine.connect() as conn:
                tables = set(sqlalchemy.inspect(conn).get_table_names())
                version = None
                if "version_info" in tables:
                    row = conn.execute(
                        sqlalchemy.text("SELECT library_version FROM version_info")
                    ).first()
                    version = row[0] if row else None
        except DBAPIError as e:
            raise StorageError(_connect_failure(url, parsed, e)) from None
        shown = masked_url(url)
        if tables and not tables >= OPTUNA_TABLES:
            other = ", ".join(sorted(tables)[:4]) + (", ..." if len(tables) > 4 else "")
            raise StorageError(
                f"--storage: {shown} holds another program's tables ({other}), not an Optuna "
                "study; use a new database or file (e.g. --storage sqlite:///study.db)"
            )
        if tables:
            _check_schema_version(url, shown, version)
    finally:
        engine.dispose()


def _check_sqlite_file(url: str, parsed: URL) -> bool:
    """Checks an SQLite storage's file and folder; returns whether the file exists."""
    shown = masked_url(url)
    path = Path(parsed.database or "").expanduser()
    if path.is_dir():
        raise StorageError(f"--storage: {shown} is a folder; name a file, e.g. {path}/study.db")
    folder = path.resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the run creates the missing folders (the default --out)
    try:  # os.access says yes to root even where nothing can be created (/proc)
        with tempfile.TemporaryFile(dir=folder, prefix=".stitchsearch-probe-"):
            pass
    except OSError as e:
        raise StorageError(
            f"--storage: cannot create files in {str(folder)!r} for {shown} "
            f"({e.strerror or type(e).__name__}); use a writable folder (--out or --storage)"
        ) from None
    if not path.exists():
        return False
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise StorageError(
            f"--storage: {str(path)!r} is not a readable SQLite database ({e}); it is "
            "damaged or another kind of file: move it away, or pass another --storage/--out"
        ) from None
    if rows != [("ok",)]:
        raise StorageError(
            f"--storage: SQLite database {str(path)!r} is damaged ({rows[0][0]}); restore it "
            "from a copy, or move it away and pass another --storage/--out"
        )
    return True


def _probe_engine(url: str, parsed: URL) -> sqlalchemy.engine.Engine:
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "").expanduser().resolve()
        return sqlalchemy.create_engine(
            "sqlite://",
            creator=lambda: sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True),
        )
    args = {"connect_timeout": 10} if parsed.get_backend_name() == "postgresql" else {}
    return sqlalchemy.create_engine(url, connect_args=args, poolclass=sqlalchemy.pool.NullPool)


def _connect_failure(url: str, parsed: URL, error: DBAPIError) -> str:
    """One line for a failed connection: what the server said, and what to do."""
    shown = masked_url(url)
    said = _server_said(str(error.orig))
    if parsed.password:
        said = said.replace(parsed.password, "***")
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    lower = said.lower()
    if "password authentication failed" in lower or ("role" in lower and "not exist" in lower):
        fix = (
            f"check the user name, and give the password in ${PASSWORD_ENV} (or ~/.pgpass) "
            "rather than in the URL"
        )
    elif "database" in lower and "does not exist" in lower:
        host = parsed.host or "localhost"
        fix = f"create it (createdb -h {host} {parsed.database}) or fix the name"
    elif "refused" in lower or "timeout" in lower or "could not" in lower or "no route" in lower:
        fix = f"start the server at {where} or fix the host and port"
    else:
        fix = "check the URL and that the server accepts this client"
    return f"--storage: cannot connect to {shown}: {said[:300]}; {fix}"


def _check_schema_version(url: str, shown: str, version: str | None) -> None:
    """Raises when the study's tables were made by an incompatible Optuna version."""
    try:
        rdb = optuna.storages.RDBStorage(url, skip_table_creation=True)
    except (RuntimeError, DBAPIError, KeyError, ValueError):
        made_by = f"Optuna {version}" if version else "another Optuna version"
        if version and _version_tuple(version) > _version_tuple(optuna.__version__):
            fix = f"install Optuna {version} or newer here (pip install 'optuna>={version}')"
        else:
            fix = (
                f"upgrade a copy with `optuna storage upgrade --storage {shown}`, or use a "
                "new storage"
            )
        raise StorageError(
            f"--storage: {shown} holds studies in the schema of {made_by}, which Optuna "
            f"{optuna.__version__} cannot use; {fix}"
        ) from None
    rdb.engine.dispose()


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


# ------------------------------------------------------------------ the open storage
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
                            f"({_cause_line(e)}); retrying for up to {self.retry_s:g} s"
                        )
                if now - first + delay > self.retry_s:
                    raise StorageUnavailable(self.url, _cause_line(e), self.retry_s) from None
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


def stops_on_storage_loss(on_loss: Any = None) -> Callable[[Callable], Callable]:
    """Decorates a Ray Tune searcher method so a lost storage ends the Tune run.

    Ray Tune swallows exceptions raised by a searcher. The first
    :class:`StorageUnavailable` is kept in the searcher's ``storage_lost`` (the driver
    stops Tune and raises it after ``fit``); from then on the method returns ``on_loss``
    without touching the storage (a result not stored then leaves its trial RUNNING, and
    the rerun fails it and evaluates the candidate again).
    """

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            if getattr(self, "storage_lost", None) is not None:
                return on_loss
            try:
                return method(self, *args, **kwargs)
            except StorageUnavailable as e:
                self.storage_lost = e
                return on_loss

        return call

    return decorate


def _cause_line(error: BaseException) -> str:
    """The database's own words for an error, on one line."""
    while isinstance(error.__cause__, BaseException) and not isinstance(error, DBAPIError):
        error = error.__cause__
    orig = getattr(error, "orig", None) or error
    return _server_said(str(orig))


def _server_said(text: str) -> str:
    """The useful part of a driver's error text, on one line."""
    said = " ".join(text.split())
    said = re.sub(r"^connection failed: connection to server at [^:]*? failed: ", "", said)
    said = re.sub(r"^.*?FATAL:\s*", "", said)
    for tail in (" This probably means", " Is the server running"):
        said = said.split(tail, 1)[0]
    return said[:200]


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
            f"--storage: cannot open {masked_url(url)}: {_cause_line(e)}; check it and run again"
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


def open_study(
    storage: optuna.storages.BaseStorage,
    definition: Study,
    driver_id: str,
    *,
    name: str | None = None,
) -> tuple[optuna.Study, bool]:
    """Loads the study, or creates it; returns ``(study, created)``.

    Args:
        storage: The storage.
        definition: The study definition (name, objectives).
        driver_id: Recorded as the creator when this driver creates the study.
        name: The study's name in the storage (default: the definition's); the rung-1
            study is ``search.promotion.rung1_study_name(definition.name)``.

    Raises:
        InputError: The stored study has other objectives, other ``resolutions`` or other
            ``cuts``.
    """
    # optuna-dashboard shows these names: a label-free study's "agreement with <teacher>".
    objectives = metric_names(list(definition.objectives), definition.teacher)
    name = definition.name if name is None else name
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        try:
            study = optuna.create_study(
                study_name=name, storage=storage, directions=definition.directions
            )
        except optuna.exceptions.DuplicatedStudyError:  # another driver created it just now
            return open_study(storage, definition, driver_id, name=name)
        study.set_user_attr(StudyAttr.CREATOR, driver_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(objectives)
        study.set_user_attr(StudyAttr.OBJECTIVES, list(definition.objectives))
        study.set_user_attr(StudyAttr.DEFINITION, json.loads(definition.model_dump_json()))
        return study, True
    existing = [d.name.lower()[:3] for d in study.directions]
    wanted = [d[:3] for d in definition.directions]
    names = study.metric_names
    if existing != wanted or (names and list(names) != objectives):
        raise InputError(
            f"study {name!r} in the storage has objectives {names}, not "
            f"{objectives}; use another study name or --out"
        )
    stored = study.user_attrs.get(StudyAttr.DEFINITION)
    if isinstance(stored, dict):
        theirs = stored.get("resolutions")
        if theirs != definition.resolutions:
            raise InputError(
                f"study {name!r} in the storage searches resolutions {theirs} (null: the "
                f"anchors' native sizes), not {definition.resolutions}; use another study "
                "name or --out"
            )
        theirs_cuts = stored.get("cuts", "all")  # studies from before `cuts` hold every point
        if theirs_cuts != definition.cuts:
            raise InputError(
                f"study {name!r} in the storage searches cuts: {theirs_cuts}, not cuts: "
                f"{definition.cuts}; use another study name or --out"
            )
    return study, False


def setup_study(
    study: optuna.Study,
    space: SearchSpace,
    matrices: Mapping[tuple[str, str], np.ndarray],
    rule: PruningRule,
    *,
    created: bool,
    signals: PruningSignals | None = None,
    log: Callable[[str], Any],
    critical: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> int:
    """Enqueues the anchors and records the CKA-pruned points, once per study.

    The driver that created the study does it; another driver joining waits for it (so that
    two drivers starting together record nothing twice), and takes over when the creator
    died first or the study predates this protocol.

    Args:
        study: The study.
        space: The search space.
        matrices: The CKA matrices.
        rule: The pruning rule.
        created: Whether this driver created the study.
        signals: The rule's signal and MACs (``None``: the rule reads ``matrices``).
        log: Prints a progress line.
        critical: Context manager factory around the writes (defers Ctrl-C).

    Returns:
        How many PRUNED trials were newly recorded.
    """
    if not created:
        t0 = time.monotonic()
        while True:
            attrs = optuna_access.study_attrs(study)
            if attrs.get(StudyAttr.SETUP_COMPLETE):
                return 0
            creator = attrs.get(StudyAttr.CREATOR)
            waited = time.monotonic() - t0
            if creator is None:  # an older study, or its creator has not got that far
                if study.get_trials(deepcopy=False) or waited > 3:
                    break
            else:
                beat = heartbeats(study).get(creator)
                if (beat is not None and not driver_status(beat)[0]) or waited > 60:
                    break
            time.sleep(0.2)
        log("setting up the study (its creator did not finish that)")
    with critical():
        trials = study.get_trials(deepcopy=False)
        if not any(t.user_attrs.get(Attr.SEEDED) == "anchor" for t in trials):
            for c in space.anchors():
                study.enqueue_trial(space.encode(c), user_attrs={Attr.SEEDED: "anchor"})
        new = record_pruned_trials(study, space, matrices, rule, signals)
        study.set_user_attr(StudyAttr.SETUP_COMPLETE, True)
    return new


def fail_own_trials(study: optuna.Study, driver_id: str, why: str) -> list[int]:
    """Marks this driver's RUNNING trials as FAIL (the run was interrupted).

    Returns:
        Their numbers.
    """
    return [
        t.number
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get(Attr.DRIVER) == driver_id
        and optuna_access.fail_trial(study, t, f"interrupted ({why})")
    ]
