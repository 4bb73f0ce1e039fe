"""The driver: CKA matrices, then rounds of Ray Tune trials until the study holds its total.

Each round is one Ray Tune run whose searcher (:class:`search.searcher.StitchSearcher`) asks
the Optuna study for candidates; between rounds the driver waits for other drivers' trials
that may still decide the total.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import ray
import torch
from optuna.trial import TrialState
from ray import tune

from evaluators import cka_matrix
from search.candidates import PruningRule, SearchSpace
from search.console import Progress, SignalGuard
from search.liveness import fail_stale_trials
from search.plan import Plan
from search.searcher import RetryCounter, SearcherSettings, StitchSearcher
from search.trials import Attr, evaluated_trials
from search.worker import WorkerJob, trainable

#: CKA matrix per ordered anchor pair, indexed ``[front cut, back cut]``.
CkaMatrices = dict[tuple[str, str], np.ndarray]


@dataclass
class RunState:
    """What this driver has done so far (kept when the run is interrupted).

    Attributes:
        searchers: The searcher of every round (a round is one Ray Tune run).
        complete: The study holds the requested number of evaluations, or every unpruned
            candidate has been evaluated.
        interrupted_trials: Trials in flight when the run was interrupted (marked FAIL).
        pruned_recorded: CKA-pruned points this driver recorded while setting up the study.
        started_ray: This run started the local Ray cluster (and stops it at the end).
        logged_pruning: The CKA rule's effect was reported already.
    """

    searchers: list[StitchSearcher] = dataclasses.field(default_factory=list)
    complete: bool = False
    interrupted_trials: list[int] = dataclasses.field(default_factory=list)
    pruned_recorded: int = 0
    started_ray: bool = False
    logged_pruning: bool = False

    def stats(self) -> dict[str, int]:
        """Counts over all rounds."""
        keys = ("completed", "failed", "pruned", "repeats", "surplus")
        out = {k: sum(getattr(s, k) for s in self.searchers) for k in keys}
        out["pruned"] += self.pruned_recorded
        out["interrupted"] = len(self.interrupted_trials)
        return out


def cka_matrices(plan: Plan, space: SearchSpace, log: Callable[..., Any]) -> CkaMatrices:
    """The CKA matrix of every ordered anchor pair (cached on disk under ``plan.out``)."""
    cache = plan.out / "cache" / "cka"
    loader = plan.data.calibration.subset(plan.study.cka.images)
    matrices = {}
    t0 = time.perf_counter()
    for i, (a, b) in enumerate(space.pairs(), start=1):
        matrices[(a, b)] = cka_matrix(plan.anchors[a], plan.anchors[b], loader, cache_dir=cache)
        log(
            f"\rCKA matrices: {i}/{len(space.pairs())} pairs ({time.perf_counter() - t0:.1f}s)",
            end="",
        )
    log("")
    return matrices


def start_ray(plan: Plan, threads: int) -> bool:
    """Starts (or joins) Ray; returns whether this call started a local cluster."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Failed trials are reported (one line each) and recorded by the searcher; Ray Tune's
    # own tracebacks for them would only bury that.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if ray.is_initialized():
        return False
    common = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    if plan.ray_address:
        ray.init(address=plan.ray_address, **common)
        return False
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local",
            num_cpus=max(plan.workers * threads, os.cpu_count() or 1),
            _node_ip_address="127.0.0.1",
            **common,
        )
        return True


def run_search(
    plan: Plan,
    study: optuna.Study,
    space: SearchSpace,
    matrices: CkaMatrices,
    *,
    state: RunState,
    sampler: optuna.samplers.BaseSampler,
    guard: SignalGuard | None = None,
    log: Callable[..., Any] = print,
) -> RunState:
    """Runs Ray Tune trials until the study holds ``plan.trials`` evaluations.

    Other drivers may work on the same study: when this driver has nothing left to start, it
    waits for their running trials, and starts another round if some of them failed.
    ``sampler`` (from :func:`search.sampler.make_sampler`) is shared by every round, so its
    state carries over.
    """
    done = len(evaluated_trials(study))
    if done >= plan.trials:
        log(f"study already holds {done} evaluated trials (>= --trials {plan.trials})")
        state.complete = True
        return state
    progress = Progress(plan.trials, done, list(plan.study.objectives))
    progress.seed(evaluated_trials(study))
    try:
        while True:
            searcher = _search_round(
                plan, study, space, matrices, sampler, progress, guard, state, log
            )
            evaluated, others = _wait_for_other_drivers(plan, study, log)
            if evaluated >= plan.trials or searcher.exhausted():
                state.complete = True
                break
            if searcher.failed >= searcher.max_failures:
                log(f"stopping: {searcher.failed} trials failed in this run")
                break
            if not (searcher.completed or searcher.failed or others):
                break  # nothing happened and nothing will: do not spin
            log(f"study holds {evaluated}/{plan.trials} evaluations: starting another round")
    finally:
        progress.close()
    return state


def _search_round(
    plan: Plan,
    study: optuna.Study,
    space: SearchSpace,
    matrices: CkaMatrices,
    sampler: optuna.samplers.BaseSampler,
    progress: Progress,
    guard: SignalGuard | None,
    state: RunState,
    log: Callable[..., Any],
) -> StitchSearcher:
    """One Ray Tune run: trials until this driver has nothing left to start."""
    cpus = max(1, (os.cpu_count() or 1) // plan.workers)
    use_gpu = torch.cuda.is_available()
    state.started_ray = start_ray(plan, cpus) or state.started_ray
    if plan.ray_address:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.workers)
    ctx = plan.trial_context(threads=cpus, use_gpu=use_gpu)
    job = WorkerJob.build(ctx, plan.study.trial_timeout_s)
    settings = SearcherSettings(
        objectives=plan.study.objectives,
        budgets=plan.budgets,
        rule=PruningRule(plan.study.cka.threshold, plan.study.cka.top_k),
        total=plan.trials,
        driver_id=plan.driver_id,
        seed=plan.seed,
        max_retries=plan.study.max_retries,
    )
    searcher = StitchSearcher(
        study,
        space,
        settings,
        sampler=sampler,
        cka=matrices,
        on_event=progress,
        guard=guard.critical if guard is not None else None,
    )
    pruned = searcher.ledger.pruned
    if pruned and not state.logged_pruning:
        state.logged_pruning = True
        progress.pruned += len(pruned)  # the bar counts CKA-pruned points too
        log(
            f"CKA rule prunes {len(pruned)} of {len(space) - len(space.anchors())} "
            "stitch points (recorded as PRUNED trials)"
        )
    state.searchers.append(searcher)
    resources = {"cpu": cpus, "gpu": 1.0 / plan.workers if use_gpu else 0}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, job=job), resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=plan.workers,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{plan.driver_id[:8]}",
            storage_path=str((plan.out / "ray").resolve()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=plan.study.max_retries),
            callbacks=[RetryCounter(searcher)],
            log_to_file=True,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.fit()
    return searcher


def _wait_for_other_drivers(
    plan: Plan, study: optuna.Study, log: Callable[..., Any], poll_s: float = 1.0
) -> tuple[int, int]:
    """Waits while other drivers have trials running that may decide the total.

    Trials of drivers that died meanwhile are failed (:func:`fail_stale_trials`).

    Returns:
        ``(evaluated, others)``: evaluations in the study, and how many trials of other
        drivers were waited for.
    """
    waited_for: set[int] = set()
    said = False
    while True:
        fail_stale_trials(study)
        running = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get(Attr.DRIVER) != plan.driver_id
        ]
        evaluated = len(evaluated_trials(study))
        # Done when nothing runs, or when the study holds what this driver was asked for
        # (another driver may have been asked for more).
        if not running or evaluated >= plan.trials:
            return evaluated, len(waited_for)
        waited_for |= {t.number for t in running}
        if not said:
            log(f"waiting for {len(running)} trial(s) of other drivers to finish")
            said = True
        time.sleep(poll_s)


def driver_seed(plan: Plan, others: set[str]) -> int:
    """The sampler seed: the study's, mixed with the driver id when other drivers run.

    Drivers sharing a study with the same seed would propose the same candidates in the same
    order and keep colliding.
    """
    if not others:
        return plan.seed
    return (plan.seed * 1_000_003 + int(plan.driver_id[:8], 16)) % 2**32


def shutdown_ray(plan: Plan, state: RunState) -> None:
    """Stops the local cluster this run started, or leaves the one it joined."""
    if ray.is_initialized() and (state.started_ray or plan.ray_address):
        ray.shutdown()
