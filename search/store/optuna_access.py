"""The one place that reaches into Optuna's storage internals.

Optuna's public ``Study`` API cannot finish a trial that another process asked for (a driver
failing the trials of a driver that died), look a trial up by number without copying every
trial, or order trials by their storage id (which driver asked first). These few functions
do, through ``study._storage`` and the private trial and study ids; nothing else in the
project touches them, so an Optuna upgrade that moves them breaks one module.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.core import Attr


def study_attrs(study: optuna.Study) -> dict[str, Any]:
    """The study's user attributes as stored now (not copied; read-only)."""
    return study._storage.get_study_user_attrs(study._study_id)


def trials(study: optuna.Study, states: Sequence[TrialState] | None = None) -> list[FrozenTrial]:
    """The study's trials as stored now (not copied; read-only)."""
    return study._storage.get_all_trials(
        study._study_id, deepcopy=False, states=None if states is None else tuple(states)
    )


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    """The stored trial with this number."""
    storage = study._storage
    return storage.get_trial(
        storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    )


def storage_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The trial's id in the storage: of two trials, the one asked first has the lower id."""
    return trial._trial_id


def is_finished(study: optuna.Study, trial: FrozenTrial | optuna.Trial) -> bool:
    """Whether the stored trial is finished (another driver may have finished it)."""
    return study._storage.get_trial(trial._trial_id).state.is_finished()


def fail_trial(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """Marks a RUNNING trial FAIL with ``reason``, whichever driver asked for it.

    Returns:
        False when the trial was finished meanwhile (by its own, live, driver). A storage that
        cannot be reached raises (``StorageUnavailable``): it is not a finished trial.
    """
    storage = study._storage
    try:
        storage.set_trial_user_attr(trial._trial_id, Attr.FAIL_REASON, reason)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        return False
    return True


#: The RDB storage methods that reach the database: the public storage API, and the
#: private methods Optuna's cache layer (``_CachedStorage``, which wraps every
#: ``RDBStorage`` a study opens) calls on it directly.
RDB_CALLS: tuple[str, ...] = (
    *(
        name
        for name, _ in inspect.getmembers(optuna.storages.BaseStorage, inspect.isfunction)
        if not name.startswith("_") and name != "remove_session"
    ),
    "_create_new_trial",
    "_set_trial_param",
    "_get_best_trial_id",
    "_get_trials",
    "_get_stale_trial_ids",
)
