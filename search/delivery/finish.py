"""Step 5 of a run: pick per device, re-measure the picks, write exports, report and summary.

Exports are written only when a run finishes (an interrupted run writes none), into a
staging folder that then replaces ``exports/`` as a whole
(:mod:`search.delivery.staging`). An export says ``"final": true`` only when the study holds
the requested number of evaluations (or has evaluated every unpruned candidate). Every
candidate counts at the highest rung it reached: a stitch fine-tuned at rung 1 is chosen,
re-measured and exported as fine-tuned.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.core import candidate_of, device_latency, evaluated_trials, rung_of
from search.delivery.exports import write_export
from search.delivery.onnx import write_onnx
from search.delivery.report import trial_row_id, trial_rows, write_report
from search.delivery.selection import select_per_device
from search.delivery.staging import clean_staging, publish, staging_dir
from search.delivery.summary import counts_line, dashboard_command, summary_table
from search.execution import RunSession, SignalGuard, exit_code, teacher_of, trial_context
from search.inputs import Plan
from search.store import live_drivers
from search.strategy import best_rung, rung1_trials


def deliver(session: RunSession, *, guard: SignalGuard, log: Callable[..., Any]) -> int:
    """Delivers a finished (or interrupted) search session; returns the exit code.

    An interrupted search gets its summary and no exports; an interrupt while exporting
    publishes nothing and says how to export.
    """
    plan, stats = session.plan, session.state.stats()
    if session.interrupted:
        with guard.ignored():
            finish(plan, session.study, stats, interrupted=True, rung1=session.rung1, log=log)
        return exit_code(session.interrupted)
    try:
        return finish(
            plan,
            session.study,
            stats,
            interrupted=False,
            complete=session.complete,
            rung1=session.rung1,
            log=log,
        )
    except KeyboardInterrupt as e:
        log(
            f"interrupted ({guard.name(e)}) while exporting: no exports were published; "
            f"to export, run the same command again: {plan.command}"
        )
        return exit_code(guard.name(e))


def finish(
    plan: Plan,
    study: optuna.Study,
    stats: Mapping[str, int],
    *,
    interrupted: bool,
    complete: bool = False,
    rung1: optuna.Study | None = None,
    log: Callable[..., Any] = print,
) -> int:
    """Selects per device, measures test accuracy, writes exports, report and summary.

    Args:
        plan: The run's plan.
        study: The study.
        stats: This run's counts (completed, failed, pruned, ...).
        interrupted: The run was interrupted: print the summary, write no exports.
        complete: The study holds the requested evaluations (exports are final).
        rung1: The rung-1 (fine-tuning) study, when the study has one.
        log: Prints a progress line.

    Returns:
        The exit code: 0, or 130 when interrupted.
    """
    out = sys.stdout
    trials = evaluated_trials(study)
    finetuned = rung1_trials(rung1) if rung1 is not None else []
    counts = counts_line(
        plan,
        study,
        evaluated=len(trials),
        finetuned=len(finetuned) if rung1 is not None else None,
        stats=stats,
        interrupted=interrupted,
    )
    print(counts, file=out, flush=True)
    if interrupted:
        print(
            f"interrupted: no exports written; to resume, run the same command again: "
            f"{plan.command}",
            file=out,
            flush=True,
        )
    chosen = select_per_device(best_rung(trials, finetuned), plan.budgets)
    exports: list[Path] = []
    tests: dict[str, str] = {}
    if not interrupted:
        if not complete:
            log(
                f"the study holds {len(trials)} of the {plan.trials} requested evaluations: "
                'exports are written with "final": false'
            )
        exports, tests = export_picks(
            plan, study, chosen, rung1=rung1 is not None, n_evaluated=len(trials), final=complete
        )
    print(summary_table(plan, chosen, tests), file=out)
    for b in plan.budgets:
        if chosen[b.device] is None:
            print(
                f"device {b.device!r}: no evaluated candidate fits its budget {b.limits()}; "
                "no export written",
                file=out,
            )
    if plan.report and not interrupted:
        print(f"report: {_report(plan, study, chosen, trials, rung1)}", file=out)
    for p in exports:
        print(f"export: {p}", file=out)
        if plan.onnx:
            print(f"onnx: {write_onnx(p, p.with_suffix('.onnx'))}", file=out)
    print(f"dashboard: {dashboard_command(plan.storage_url)}", file=out)
    if rung1 is not None:
        print(f"  (rung 1, fine-tuned: study {rung1.study_name!r} in the same storage)", file=out)
    return 130 if interrupted else 0


def export_picks(
    plan: Plan,
    study: optuna.Study,
    chosen: Mapping[str, FrozenTrial | None],
    *,
    rung1: bool,
    n_evaluated: int,
    final: bool,
) -> tuple[list[Path], dict[str, str]]:
    """Re-measures each device's pick (with test accuracy) and publishes the exports.

    Returns:
        The published export files, and each exported device's test accuracy (formatted).
    """
    # The workers' thread count: fine-tuning then reproduces the trial's weights exactly.
    threads = max(1, (os.cpu_count() or 1) // plan.workers)
    context = trial_context(
        plan, threads=threads, rung=1 if rung1 else 0, teacher=teacher_of(plan, study)
    )
    clean_staging(plan.out, live=live_drivers(study) - {plan.driver_id})
    staging = staging_dir(plan.out, plan.driver_id)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    taken: set[str] = set()
    results: dict[tuple[int, int], Any] = {}
    written: list[Path] = []
    tests: dict[str, str] = {}
    for b in plan.budgets:
        t = chosen[b.device]
        if t is None:
            continue
        key = (rung_of(t), t.number)
        if key not in results:
            results[key] = context.evaluate(
                candidate_of(t), plan.anchors, test=True, measure_latency=False, rung=key[0]
            )
        tests[b.device] = f"{results[key].test_acc:.2f}%"
        written.append(
            write_export(
                staging,
                b,
                t,
                results[key],
                plan,
                taken=taken,
                n_evaluated=n_evaluated,
                final=final,
            )
        )
    final_dir = plan.out / "exports"
    publish(staging, final_dir)
    return [final_dir / p.name for p in written], tests


def _report(
    plan: Plan,
    study: optuna.Study,
    chosen: Mapping[str, FrozenTrial | None],
    trials: list[FrozenTrial],
    rung1: optuna.Study | None,
) -> Path:
    pareto = {t.number for t in study.best_trials} if trials else set()
    return write_report(
        plan.out / "report.html",
        trial_rows(study, pareto, rung1),
        plan.budgets,
        study_name=plan.study.name,
        chosen={d: trial_row_id(t) if t is not None else None for d, t in chosen.items()},
        device_latency={
            b.device: (device_latency(t.user_attrs, b), b.latency_source)
            for b in plan.budgets
            if (t := chosen[b.device]) is not None
        },
        measure=plan.measure,
    )
