"""The ledger's sweep for dead drivers' trials swallows storage errors only (issue 26, 5b)."""

from __future__ import annotations

import time

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from search.core import Attr
from search.store import HEARTBEAT_KEY
from search.strategy import ledger as ledger_module
from search.strategy.ledger import Ledger
from space import Candidate


def _ledger(tmp_path) -> tuple[optuna.Study, Ledger]:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    candidates = [Candidate.anchor("a"), Candidate.anchor("b")]
    ledger = Ledger(study, candidates, pruned=[], driver_id="me", seed=0, stale_check_s=0.0)
    return study, ledger


def test_the_sweep_fails_a_dead_drivers_trial(tmp_path) -> None:
    study, ledger = _ledger(tmp_path)
    trial = study.ask()
    trial.set_user_attr(Attr.DRIVER, "gone")
    trial.set_user_attr(Attr.KEY, Candidate.anchor("a").key)
    study.set_user_attr(HEARTBEAT_KEY + "gone", {"time": time.time() - 3600, "stopped": True})
    time.sleep(0.01)
    assert ledger.sync() == (0, 0)
    assert study.trials[0].state == TrialState.FAIL


def test_a_storage_error_in_the_sweep_is_skipped(tmp_path, monkeypatch) -> None:
    study, ledger = _ledger(tmp_path)
    study.ask().set_user_attr(Attr.KEY, Candidate.anchor("a").key)

    def hiccup(study: optuna.Study) -> list[int]:
        raise OperationalError("UPDATE trials", {}, Exception("database is locked"))

    monkeypatch.setattr(ledger_module, "fail_stale_trials", hiccup)
    time.sleep(0.01)
    assert ledger.sync() == (0, 1)  # the rest of the sync ran
    assert Candidate.anchor("a").key in ledger.elsewhere


def test_a_programming_error_in_the_sweep_propagates(tmp_path, monkeypatch) -> None:
    _, ledger = _ledger(tmp_path)

    def bug(study: optuna.Study) -> list[int]:
        raise TypeError("unsupported operand type(s) for -: 'float' and 'str'")

    monkeypatch.setattr(ledger_module, "fail_stale_trials", bug)
    time.sleep(0.01)
    with pytest.raises(TypeError, match="unsupported operand"):
        ledger.sync()
