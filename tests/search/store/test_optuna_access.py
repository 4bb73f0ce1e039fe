"""Failing another driver's trial: a finished trial is left alone, an outage is not hidden."""

from __future__ import annotations

import optuna
import pytest

from search.core import Attr
from search.store import StorageUnavailable, optuna_access


def test_fail_trial_fails_a_running_trial_and_leaves_a_finished_one() -> None:
    study = optuna.create_study(directions=["maximize"])
    running, done = study.ask(), study.ask()
    study.tell(done, 1.0)
    assert optuna_access.fail_trial(study, study.trials[running.number], "stale") is True
    assert study.trials[running.number].state == optuna.trial.TrialState.FAIL
    assert study.trials[running.number].user_attrs[Attr.FAIL_REASON] == "stale"
    assert optuna_access.fail_trial(study, study.trials[done.number], "stale") is False
    assert study.trials[done.number].state == optuna.trial.TrialState.COMPLETE


def test_fail_trial_lets_an_unreachable_storage_raise(monkeypatch) -> None:
    study = optuna.create_study(directions=["maximize"])
    trial = study.ask()

    def gone(*args, **kwargs):
        raise StorageUnavailable("sqlite:///gone.db", "database is locked", 60)

    monkeypatch.setattr(study._storage, "set_trial_user_attr", gone)
    with pytest.raises(StorageUnavailable):
        optuna_access.fail_trial(study, study.trials[trial.number], "stale")
