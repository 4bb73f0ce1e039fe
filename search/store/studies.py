"""Studies in the storage: opened or created, and this driver's trials failed when stopped.

A stored study is checked against the definition (objectives, resolutions, cuts); an
interrupted run fails the trials it left RUNNING.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from search.core import Attr, StudyAttr, metric_names
from search.inputs import Study
from search.store import optuna_access
from space import InputError


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
            study is ``search.strategy.rung1_study_name(definition.name)``.

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
        _check_anchor_ids(name, stored, definition)
        theirs_cuts = stored.get("cuts", "all")  # studies from before `cuts` hold every point
        if theirs_cuts != definition.cuts:
            raise InputError(
                f"study {name!r} in the storage searches cuts: {theirs_cuts}, not cuts: "
                f"{definition.cuts}; use another study name or --out"
            )
    return study, False


def _check_anchor_ids(name: str, stored: dict[str, Any], definition: Study) -> None:
    """Refuses a resumed study whose anchors, the same models in the same order, were renamed.

    The ids are the search space's choices: trials stored under the old ids would no longer
    decode.
    """
    theirs = [a for a in stored.get("anchors") or [] if isinstance(a, dict)]
    if [a.get("name") for a in theirs] != [a.name for a in definition.anchors]:
        return
    old = [a.get("id") or a.get("name") for a in theirs]
    new = [a.anchor_id for a in definition.anchors]
    if old != new:
        raise InputError(
            f"study {name!r} in the storage calls its anchors {old}, not {new}; an anchor's id "
            "is fixed when the study is created: keep the old ids, or use another study name "
            "or --out"
        )


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
