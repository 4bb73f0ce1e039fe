"""``--storage``: the URL validated, and the storage checked before anything is written.

The check reads only: can the storage hold the study?
"""

from __future__ import annotations

import re
import sqlite3
import tempfile
from pathlib import Path
from urllib.parse import quote

import optuna
import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from search.core import PASSWORD_ENV, masked_url, server_said
from space import InputError

#: How long a storage that stops answering mid-study is retried (``--storage-retry``).
DEFAULT_RETRY_S = 60.0

#: Optuna's own tables: a database holding other tables but none of these belongs to
#: another program.
OPTUNA_TABLES = frozenset({"studies", "trials", "version_info"})


class StorageError(InputError):
    """The storage cannot be used: one line with the masked URL, the cause and the fix."""


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
    said = server_said(str(error.orig))
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
