"""Optuna's INFO lines stay out of a run's output unless ``--verbose`` (issue 25).

Optuna's own handler holds the ``sys.stderr`` of the moment it was made, which pytest's
capture has replaced since; the tests read Optuna's records through propagation instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest

from search.execution import optuna_logging
from search.run import main

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
CREATED = "A new study created"


@pytest.fixture
def optuna_records() -> Iterator[None]:
    """Optuna's records reach ``caplog``; its level is put back afterwards."""
    before = optuna.logging.get_verbosity()
    optuna.logging.enable_propagation()
    try:
        yield
    finally:
        optuna.logging.disable_propagation()
        optuna.logging.set_verbosity(before)


def test_optuna_logging_sets_and_restores_the_level(optuna_records, caplog) -> None:
    optuna.logging.set_verbosity(optuna.logging.INFO)
    with optuna_logging():
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING
        optuna.create_study()
    assert CREATED not in caplog.text
    assert optuna.logging.get_verbosity() == optuna.logging.INFO  # restored
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with optuna_logging(verbose=True):
        optuna.create_study()
    assert CREATED in caplog.text
    assert optuna.logging.get_verbosity() == optuna.logging.WARNING


@pytest.mark.parametrize("verbose", [False, True])
def test_a_run_shows_optunas_info_lines_only_when_verbose(
    verbose, tmp_path, ray_cluster, optuna_records, caplog, capsys
) -> None:
    devices = tmp_path / "d.csv"
    devices.write_text("device,max_macs\nany,\n")
    argv = ["--budget-table", str(devices), "--study", str(STUDY), "--out", str(tmp_path / "o")]
    argv += ["--trials", "2", "--no-report"] + (["--verbose"] if verbose else [])
    before = optuna.logging.get_verbosity()
    assert main(argv) == 0
    assert (CREATED in caplog.text) == verbose, caplog.text[-2000:]
    assert "study 'tiny'" in capsys.readouterr().err  # the run's own lines are still there
    assert optuna.logging.get_verbosity() == before
