"""The study's storage: URLs, opening and setting up the study, failing this run's trials.

The storage is an Optuna RDB storage (SQLite by default, PostgreSQL when several drivers
share a study). URLs are validated here and printed only through :func:`masked_url`.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, ProgrammingError

from search import optuna_access
from search.candidates import PruningRule, SearchSpace
from search.liveness import driver_status, heartbeats
from search.pruning import PruningSignals, record_pruned_trials
from search.study import Study
from search.trials import Attr, StudyAttr
from space import InputError


def storage_url(raw: str | None, out: Path) -> str:
    """Validates ``--storage`` (default: ``study.db`` under ``out``).

    Raises:
        InputError: Not a database URL, an SQLite file in a missing folder, a missing
            driver, or an unsupported database.
    """
    if raw is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    try:
        url = make_url(raw)
    except ArgumentError:
        raise InputError(
            f"--storage: {raw!r} is not a database URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database:
            raise InputError(f"--storage: {raw!r} names no SQLite file; use sqlite:///PATH")
        parent = Path(url.database).expanduser().resolve().parent
        if not parent.is_dir():
            raise InputError(f"--storage: folder {str(parent)!r} of {raw!r} does not exist")
    elif backend == "postgresql":
        driver = url.get_driver_name()
        module = {"psycopg": "psycopg", "psycopg2": "psycopg2"}.get(driver, driver)
        try:
            __import__(module)
        except ImportError:
            raise InputError(
                f"--storage: driver {driver!r} for {raw!r} is not installed; "
                "pip install 'stitchsearch[postgres]' and use postgresql+psycopg://..."
            ) from None
    elif backend not in ("mysql",):
        raise InputError(
            f"--storage: unsupported database {backend!r} in {raw!r}; use sqlite or postgresql"
        )
    return raw


def masked_url(url: str) -> str:
    """The storage URL with any password hidden."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Opens the RDB storage (SQLite in WAL mode, with a generous lock timeout).

    Two drivers opening a new PostgreSQL database at the same moment both create Optuna's
    schema, and one of them fails on a duplicate type or table; it tries again (the schema
    then exists).
    """
    if not url.startswith("sqlite"):
        for attempt in range(3):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
            except (IntegrityError, ProgrammingError):
                if attempt == 2:
                    raise
                time.sleep(0.5 * (attempt + 1))

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

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
        InputError: The stored study has other objectives.
    """
    objectives = list(definition.objectives)
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
        study.set_user_attr(StudyAttr.OBJECTIVES, objectives)
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
