"""The driver: CKA matrices, then rounds of Ray Tune trials until the study holds its total.

Each round is one Ray Tune run whose searcher (:class:`search.strategy.StitchSearcher`) asks
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

import optuna
import ray
import torch
from optuna.trial import TrialState
from ray import tune

from search.core import Attr, SearchSpace, evaluated_trials
from search.execution.console import Progress, SignalGuard
from search.execution.contexts import teacher_of, trial_context
from search.inputs import Plan
from search.store import fail_stale_trials
from search.strategy import (
    CkaMatrices,
    PruningSignals,
    RetryCounter,
    Rung1Searcher,
    SearcherSettings,
    StitchSearcher,
    StudySearcher,
    promotion_order,
    rung1_trials,
)
from search.workers import WorkerJob, trainable


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
        rung1_searchers: The rung-1 searcher of this run (fine-tuning), if rung 1 ran.
        rung1_promoted: Stitches the promotion rule selected (before the budget).
        rung1_complete: Rung 1 fine-tuned everything promoted within its budget.
        family_id: The family this run trained or found trained (None: none).
        family_complete: The family is trained and recorded.
    """

    searchers: list[StitchSearcher] = dataclasses.field(default_factory=list)
    complete: bool = False
    interrupted_trials: list[int] = dataclasses.field(default_factory=list)
    pruned_recorded: int = 0
    started_ray: bool = False
    logged_pruning: bool = False
    rung1_searchers: list[Rung1Searcher] = dataclasses.field(default_factory=list)
    rung1_promoted: int = 0
    rung1_complete: bool = False
    family_id: str | None = None
    family_complete: bool = False

    def stats(self) -> dict[str, int]:
        """Counts over all rounds."""
        keys = ("completed", "failed", "pruned", "repeats", "surplus")
        out = {k: sum(getattr(s, k) for s in self.searchers) for k in keys}
        out["pruned"] += self.pruned_recorded
        out["interrupted"] = len(self.interrupted_trials)
        out["finetuned"] = sum(s.completed for s in self.rung1_searchers)
        out["finetune_failed"] = sum(s.failed for s in self.rung1_searchers)
        return out


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
    signals: PruningSignals | None = None,
) -> RunState:
    """Runs Ray Tune trials until the study holds ``plan.trials`` evaluations.

    Other drivers may work on the same study: when this driver has nothing left to start, it
    waits for their running trials, and starts another round if some of them failed.
    ``sampler`` (from :func:`search.strategy.make_sampler`) is shared by every round, so its
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
                plan, study, space, matrices, sampler, progress, guard, state, log, signals
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
    signals: PruningSignals | None = None,
) -> StitchSearcher:
    """One Ray Tune run: trials until this driver has nothing left to start."""
    cpus, use_gpu = worker_share(plan, state, guard)
    job = WorkerJob.build(
        trial_context(plan, threads=cpus, use_gpu=use_gpu), plan.study.trial_timeout_s
    )
    settings = SearcherSettings(
        objectives=plan.study.objectives,
        budgets=plan.budgets,
        rule=plan.study.pruning_rule,
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
        signals=signals,
        on_event=progress,
        guard=guard.critical if guard is not None else None,
    )
    pruned = searcher.ledger.pruned
    if pruned and not state.logged_pruning:
        state.logged_pruning = True
        progress.pruned += len(pruned)  # the bar counts CKA-pruned points too
        log(
            f"pruning rule ({plan.study.pruning_rule.signal}) prunes {len(pruned)} of "
            f"{len(space) - len(space.anchors())} stitch points (recorded as PRUNED trials)"
        )
    state.searchers.append(searcher)
    _tune(plan, searcher, job, cpus, use_gpu, name="ray")
    return searcher


def worker_share(plan: Plan, state: RunState, guard: SignalGuard | None = None) -> tuple[int, bool]:
    """Starts or joins Ray; returns each trial's CPU threads and whether it gets a GPU.

    ``guard`` takes SIGINT and SIGTERM back from the handlers ``ray.init`` installs.
    """
    cpus = max(1, (os.cpu_count() or 1) // plan.workers)
    state.started_ray = start_ray(plan, cpus) or state.started_ray
    if guard is not None:
        guard.reinstall()
    if plan.ray_address:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.workers)
    return cpus, torch.cuda.is_available()


def _tune(
    plan: Plan,
    searcher: StudySearcher,
    job: WorkerJob,
    cpus: int,
    use_gpu: bool,
    *,
    name: str,
) -> None:
    """One Ray Tune run of ``searcher``'s trials, each pinned to its CPU (or GPU) share."""
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
            name=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{plan.driver_id[:8]}",
            storage_path=str((plan.out / "ray").resolve()),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=plan.study.max_retries),
            callbacks=[RetryCounter(searcher)],
            stop=_StopWhenStorageLost(searcher),
            log_to_file=True,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.fit()
    if searcher.storage_lost is not None:
        raise searcher.storage_lost


class _StopWhenStorageLost(tune.Stopper):
    """Ends the Tune run at once when the searcher lost the storage."""

    def __init__(self, searcher: StudySearcher) -> None:
        self.searcher = searcher

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.searcher.storage_lost is not None


def run_rung1(
    plan: Plan,
    study: optuna.Study,
    rung1: optuna.Study,
    space: SearchSpace,
    *,
    state: RunState,
    guard: SignalGuard | None = None,
    log: Callable[..., Any] = print,
) -> RunState:
    """Rung 1: fine-tunes the promoted rung-0 stitches, within the rung-1 budget.

    Candidates fine-tuned before (by this or an earlier run) are not redone, so a rerun after
    a crash finishes what is missing.
    """
    ft = plan.study.finetune
    done = {t.user_attrs.get(Attr.KEY) for t in rung1_trials(rung1)}
    order = promotion_order(
        evaluated_trials(study),
        plan.budgets,
        per_device=ft.promote.per_device,
        front=study.best_trials if ft.promote.front else (),
    )
    todo = [t for t in order if t.user_attrs[Attr.KEY] not in done]
    room = max(0, ft.max_trials - len(done))
    state.rung1_promoted = len(order)
    if not todo or not room:
        if not todo:
            log(f"rung 1: {len(done)} stitch(es) fine-tuned; every promoted stitch is done")
        else:
            log(f"rung 1: {len(done)} fine-tuned; its budget ({ft.max_trials} trials) is spent")
        state.rung1_complete = True
        return state
    todo = todo[:room]
    log(
        f"rung 1: fine-tuning {len(todo)} promoted stitch(es) ({len(done)} done before; "
        f"budget {ft.max_trials} trials"
        + (f", {ft.max_seconds:g} s" if ft.max_seconds else "")
        + f"; {ft.steps} steps of {ft.batch_size} training images each)"
    )
    cpus, use_gpu = worker_share(plan, state, guard)
    context = trial_context(
        plan, threads=cpus, use_gpu=use_gpu, rung=1, teacher=teacher_of(plan, study)
    )
    job = WorkerJob.build(context, plan.study.trial_timeout_s)
    progress = Progress(
        len(done) + len(todo),
        len(done),
        list(plan.study.objectives),
        desc="fine-tune",
        show_pruned=False,
    )
    progress.seed(rung1_trials(rung1))
    deadline = time.monotonic() + ft.max_seconds if ft.max_seconds else None
    searcher = Rung1Searcher(
        rung1,
        space,
        todo,
        budgets=plan.budgets,
        objectives=plan.study.objectives,
        driver_id=plan.driver_id,
        max_trials=ft.max_trials,
        max_retries=plan.study.max_retries,
        deadline=deadline,
        on_event=progress,
        guard=guard.critical if guard is not None else None,
    )
    state.rung1_searchers.append(searcher)
    try:
        _tune(plan, searcher, job, cpus, use_gpu, name="ray-rung1")
    finally:
        progress.close()
    if searcher.out_of_time:
        log(f"rung 1: stopped promoting after {ft.max_seconds:g} s (finetune.max_seconds)")
    state.rung1_complete = not searcher.queue or searcher.out_of_time
    return state


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
