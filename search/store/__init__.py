"""The store: the Optuna RDB storage a study lives in, while the run holds it.

The resilient storage (:mod:`~search.store.rdb`: calls retried while the database does not
answer), opening or creating the studies (:mod:`~search.store.studies`), driver liveness
(:mod:`~search.store.liveness`: heartbeats, failing dead drivers' trials) and
:mod:`~search.store.optuna_access`, the only module that touches Optuna's storage
internals.
"""

from search.store import optuna_access
from search.store.liveness import (
    HEARTBEAT_INTERVAL_S,
    HEARTBEAT_KEY,
    STALE_AFTER_S,
    Heartbeat,
    driver_identity,
    driver_status,
    fail_stale_trials,
    heartbeats,
    live_drivers,
)
from search.store.rdb import (
    STORAGE_ERRORS,
    ResilientRDBStorage,
    StorageUnavailable,
    make_storage,
)
from search.store.studies import fail_own_trials, open_study

__all__ = [
    "HEARTBEAT_INTERVAL_S",
    "HEARTBEAT_KEY",
    "STALE_AFTER_S",
    "STORAGE_ERRORS",
    "Heartbeat",
    "ResilientRDBStorage",
    "StorageUnavailable",
    "driver_identity",
    "driver_status",
    "fail_own_trials",
    "fail_stale_trials",
    "heartbeats",
    "live_drivers",
    "make_storage",
    "open_study",
    "optuna_access",
]
