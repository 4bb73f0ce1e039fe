"""Workers: what runs inside Ray's worker processes.

:func:`trainable` is the Ray Tune trainable; each Ray worker keeps one evaluation process
(:class:`EvaluationProcess`), which enforces the trial's time limit. This face imports
neither torch nor the evaluators, so a Ray worker does not load them: the evaluation
process itself (:mod:`search.workers.evaluation`, started as ``python -m
search.workers.evaluation``) does, and is imported directly by the driver side for its
:class:`~search.workers.evaluation.TrialContext`; so is the family's Ray Train loop
(:mod:`search.workers.family`).
"""

from search.workers.ray_worker import (
    FAULT_DIR_ENV,
    FAULT_ENV,
    STARTUP_TIMEOUT_S,
    EvaluationProcess,
    EvaluationProcessDied,
    WorkerJob,
    evaluate_with_limit,
    trainable,
)

__all__ = [
    "FAULT_DIR_ENV",
    "FAULT_ENV",
    "STARTUP_TIMEOUT_S",
    "EvaluationProcess",
    "EvaluationProcessDied",
    "WorkerJob",
    "evaluate_with_limit",
    "trainable",
]
