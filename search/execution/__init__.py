"""Execution: the driver process of a run, from the pair signals to the end of the search.

The pair signals (CKA, pruning signals), the run session (:class:`RunSession`: studies,
heartbeats, set-up, sampler), the rounds of Ray Tune trials at each rung
(:mod:`~search.execution.driver`), the trial contexts the workers evaluate with, and the
console (progress bar, Ctrl-C and SIGTERM as a clean stop).
"""

from search.execution.console import Progress, SignalGuard, exit_code
from search.execution.contexts import finetune_settings, teacher_of, trial_context, trial_data
from search.execution.driver import (
    RunState,
    driver_seed,
    run_rung1,
    run_search,
    shutdown_ray,
    start_ray,
)
from search.execution.pair_signals import PairSignals, cka_matrices, pruning_signals, study_signals
from search.execution.session import RunSession, open_storage

__all__ = [
    "PairSignals",
    "Progress",
    "RunSession",
    "RunState",
    "SignalGuard",
    "cka_matrices",
    "driver_seed",
    "exit_code",
    "finetune_settings",
    "open_storage",
    "pruning_signals",
    "run_rung1",
    "run_search",
    "shutdown_ray",
    "start_ray",
    "study_signals",
    "teacher_of",
    "trial_context",
    "trial_data",
]
