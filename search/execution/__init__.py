"""Execution: the driver process of a run, from the pair signals to the end of the search.

The pair signals (CKA, pruning signals), the run session (:class:`RunSession`: studies,
heartbeats, set-up, sampler), the rounds of Ray Tune trials at each rung
(:mod:`~search.execution.driver`), the trial contexts the workers evaluate with, and the
console (progress bar, Optuna's log level, Ctrl-C and SIGTERM as a clean stop).
"""

from search.execution.console import (
    FamilyProgress,
    Progress,
    SignalGuard,
    exit_code,
    optuna_logging,
)
from search.execution.contexts import (
    family_settings,
    family_teacher,
    finetune_settings,
    teacher_of,
    trial_context,
    trial_data,
)
from search.execution.driver import (
    RunState,
    driver_seed,
    run_rung1,
    run_search,
    shutdown_ray,
    start_ray,
    worker_share,
)
from search.execution.family import (
    FAMILY_DIR,
    family_job,
    family_path,
    fingerprint,
    run_family,
    train_family_here,
)
from search.execution.pair_signals import PairSignals, cka_matrices, pruning_signals, study_signals
from search.execution.session import RunSession, open_storage

__all__ = [
    "FAMILY_DIR",
    "FamilyProgress",
    "PairSignals",
    "Progress",
    "RunSession",
    "RunState",
    "SignalGuard",
    "cka_matrices",
    "driver_seed",
    "exit_code",
    "family_job",
    "family_path",
    "family_settings",
    "family_teacher",
    "finetune_settings",
    "fingerprint",
    "open_storage",
    "optuna_logging",
    "pruning_signals",
    "run_family",
    "run_rung1",
    "run_search",
    "shutdown_ray",
    "start_ray",
    "study_signals",
    "teacher_of",
    "train_family_here",
    "trial_context",
    "trial_data",
    "worker_share",
]
