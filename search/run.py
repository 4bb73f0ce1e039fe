"""``python -m search.run --budget-table devices.csv``: run a stitching study end to end.

The top-level sequence; each stage lives in its own module:

1. :mod:`search.plan`: validate every input (flags, budget table, study YAML, anchors,
   data) into a frozen :class:`~search.plan.Plan` before anything is written; a bad input
   prints one line naming the file or field and exits 2.
2. :mod:`search.storage`: open (or resume) the Optuna study in RDB storage (SQLite under
   ``--out`` by default), enqueue the anchors, record the CKA-pruned points.
3. :mod:`search.driver`: compute the CKA matrices, then evaluate candidates on Ray Tune
   workers (:mod:`search.searcher`, :mod:`search.worker`) until the study holds its total
   (rung 0, least squares); then fine-tune the promoted stitches (rung 1,
   :mod:`search.promotion`) in a second study, ``<name>:finetuned``;
   :mod:`search.console` shows progress and turns Ctrl-C into a clean stop;
   :mod:`search.liveness` keeps this driver's heartbeat and fails dead drivers' trials.
4. :mod:`search.delivery`: pick per device (:mod:`search.selection`), re-measure, write
   ``exports/``, the HTML report (:mod:`search.report`) and the summary table.
"""

from __future__ import annotations

import contextlib
import shutil
import sys

import optuna

from search import storage
from search.candidates import SearchSpace
from search.console import SignalGuard, one_line
from search.delivery import clean_staging, finish
from search.driver import (
    RunState,
    cka_matrices,
    driver_seed,
    pruning_signals,
    run_rung1,
    run_search,
    shutdown_ray,
)
from search.liveness import Heartbeat, fail_stale_trials, live_drivers
from search.plan import Plan, build_parser, prepare
from search.promotion import rung1_study_name
from search.sampler import make_sampler
from search.storage import StorageUnavailable
from search.study import Study, study_space
from search.trials import evaluated_trials
from space import InputError


def _at_resolutions(space: SearchSpace) -> str:
    """``", at 40/48 px"`` for a study that searches resolutions, else nothing."""
    if space.resolutions is None:
        return ""
    return ", at " + "/".join(str(r) for r in space.resolutions) + " px"


def _cuts(study: Study) -> str:
    """``", stage boundaries only"`` for a study with ``cuts: stages``, else nothing."""
    return ", stage boundaries only" if study.cuts == "stages" else ""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        plan = prepare(args, argv)
    except InputError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return execute(plan)


def _heartbeat(study: optuna.Study | None, driver_id: str) -> contextlib.AbstractContextManager:
    """This driver's heartbeat in ``study`` (nothing when there is no such study)."""
    return contextlib.nullcontext() if study is None else Heartbeat(study, driver_id)


def _exit_code(signal_name: str) -> int:
    return 143 if signal_name == "SIGTERM" else 130


#: Exit code when the storage stopped answering mid-study (``EX_TEMPFAIL``: try again).
EXIT_STORAGE_LOST = 75


def execute(plan: Plan) -> int:
    """Runs a validated plan: study, CKA, Ray trials, selection, exports and report.

    A storage that stops answering mid-study is retried for ``plan.storage_retry_s``; when
    it does not come back the run stops with one line and the resume command (exit 75).
    Trials it had in flight stay RUNNING in the storage until the rerun fails them (their
    driver is gone) and evaluates them again.
    """
    try:
        return _execute(plan)
    except StorageUnavailable as e:
        with contextlib.suppress(Exception):
            shutdown_ray(plan, RunState(started_ray=True))
        print(
            f"error: {e}; the run stopped (finished trials are safe in the storage). When it "
            f"answers again, resume with: {plan.command}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_STORAGE_LOST


def _execute(plan: Plan) -> int:
    def log(*a, **k):
        print(*a, **k, file=sys.stderr, flush=True)

    created_out = not plan.out.exists()
    plan.out.mkdir(parents=True, exist_ok=True)
    try:
        rdb = storage.make_storage(
            plan.storage_url, retry_s=plan.storage_retry_s, on_retry=lambda m: log(f"\n{m}")
        )
    except InputError as e:  # it passed the plan's check, then failed to open
        if created_out:
            shutil.rmtree(plan.out, ignore_errors=True)
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    space = study_space(plan.study, plan.anchors, plan.study_path)
    rule = plan.study.pruning_rule
    state = RunState()
    interrupted: str | None = None
    with SignalGuard() as guard:
        try:
            matrices = cka_matrices(plan, space, log)
            signals = pruning_signals(plan, space, matrices, log)
            try:
                study, created = storage.open_study(rdb, plan.study, plan.driver_id)
            except InputError as e:
                print(f"error: {one_line(str(e))}", file=sys.stderr)
                return 2
            rung1 = None
            if plan.study.finetune.enabled:
                rung1, _ = storage.open_study(
                    rdb, plan.study, plan.driver_id, name=rung1_study_name(plan.study.name)
                )
            with Heartbeat(study, plan.driver_id), _heartbeat(rung1, plan.driver_id):
                newly = storage.setup_study(
                    study,
                    space,
                    matrices,
                    rule,
                    created=created,
                    log=log,
                    critical=guard.critical,
                    signals=signals,
                )
                state.pruned_recorded = newly
                others = live_drivers(study) - {plan.driver_id}
                sampler = make_sampler(
                    plan.study.sampler, driver_seed(plan, others), len(plan.study.objectives)
                )
                if others and plan.storage_url.startswith("sqlite"):
                    log(
                        f"note: {len(others)} other driver(s) share this SQLite study: SQLite "
                        "writes one at a time (a busy file is waited for), so for drivers on "
                        "several machines or many at once use --storage postgresql+psycopg://..."
                    )
                clean_staging(plan.out, live=others)
                stale = fail_stale_trials(study)
                if rung1 is not None:
                    stale += fail_stale_trials(rung1)
                if stale:
                    log(f"failed {len(stale)} trial(s) left RUNNING by a stopped driver: {stale}")
                log(
                    f"study {plan.study.name!r}: {len(space)} candidates "
                    f"({len(space.pairs())} ordered pairs, {len(plan.anchors)} anchors"
                    f"{_at_resolutions(space)}{_cuts(plan.study)}), "
                    f"{len(evaluated_trials(study))}/{plan.trials} evaluated, "
                    f"{newly} pruned points recorded, {len(others)} other driver(s) running, "
                    f"storage {storage.masked_url(plan.storage_url)}"
                )
                if plan.study.label_free:
                    log(
                        f"label-free: {plan.data.name} has no labels; the search maximises "
                        f"{plan.measure} (top-1 agreement on {plan.data.validation.num_images} "
                        "validation images) and rung 1 distils from it"
                    )
                try:
                    run_search(
                        plan,
                        study,
                        space,
                        matrices,
                        state=state,
                        sampler=sampler,
                        guard=guard,
                        log=log,
                        signals=signals,
                    )
                    if rung1 is not None:
                        run_rung1(plan, study, rung1, space, state=state, guard=guard, log=log)
                except KeyboardInterrupt as e:
                    interrupted = guard.name(e)
                finally:
                    with guard.ignored():
                        shutdown_ray(plan, state)
                        if interrupted:
                            state.interrupted_trials = [
                                n
                                for s in (study, rung1)
                                if s is not None
                                for n in storage.fail_own_trials(s, plan.driver_id, interrupted)
                            ]
        except KeyboardInterrupt as e:  # before the search started
            interrupted = guard.name(e)
            with guard.ignored():
                shutdown_ray(plan, state)
            log(f"interrupted ({interrupted}) before the search started; nothing was evaluated")
            return _exit_code(interrupted)
        stats = state.stats()
        if interrupted:
            with guard.ignored():
                finish(plan, study, stats, interrupted=True, complete=False, rung1=rung1, log=log)
            return _exit_code(interrupted)
        try:
            complete = state.complete and (rung1 is None or state.rung1_complete)
            return finish(
                plan, study, stats, interrupted=False, complete=complete, rung1=rung1, log=log
            )
        except KeyboardInterrupt as e:
            log(
                f"interrupted ({guard.name(e)}) while exporting: no exports were published; "
                f"to export, run the same command again: {plan.command}"
            )
            return _exit_code(guard.name(e))


if __name__ == "__main__":
    sys.exit(main())
