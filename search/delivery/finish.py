"""Step 5 of a run: pick per device, re-measure the picks, write exports, report and summary.

Exports are written only when a run finishes (an interrupted run writes none), into a
staging folder that then replaces ``exports/`` as a whole
(:mod:`search.delivery.staging`). An export says ``"final": true`` only when the study holds
the requested number of evaluations (or has evaluated every unpruned candidate). Every
candidate counts at the highest rung it reached: a stitch fine-tuned at rung 1 is chosen,
re-measured and exported as fine-tuned.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.core import (
    Attr,
    candidate_of,
    device_latency_text,
    evaluated_trials,
    rung_of,
    select_per_device,
)
from search.delivery.exports import data_record, write_export
from search.delivery.onnx import write_onnx
from search.delivery.report import trial_row_id, trial_rows, write_report
from search.delivery.staging import clean_staging, publish, staging_dir
from search.delivery.summary import counts_line, dashboard_command, summary_table
from search.execution import (
    RunSession,
    SignalGuard,
    exit_code,
    family_path,
    teacher_of,
    trial_context,
)
from search.inputs import Plan
from search.store import live_drivers
from search.strategy import best_of_rungs, family_trials, rung1_trials
from search.workers.evaluation import TrialContext, trained_family
from space import member_name, save_family


@dataclass(frozen=True)
class Rungs:
    """The studies of a search: rung 0, and rung 1 and the family when the study has them.

    Attributes:
        study: The rung-0 study.
        rung1: The rung-1 study, or None.
        family: The family study, or None.
        family_id: The trained family this run delivers (its members' trials), or None.
    """

    study: optuna.Study
    rung1: optuna.Study | None = None
    family: optuna.Study | None = None
    family_id: str | None = None

    def finetuned(self) -> list[FrozenTrial]:
        """The COMPLETE rung-1 trials."""
        return rung1_trials(self.rung1) if self.rung1 is not None else []

    def trained(self) -> list[FrozenTrial]:
        """The trials of the delivered family."""
        if self.family is None or self.family_id is None:
            return []
        return family_trials(self.family, self.family_id)

    def candidates(self) -> list[FrozenTrial]:
        """Every evaluated candidate at the highest rung it reached."""
        return best_of_rungs(evaluated_trials(self.study), self.finetuned(), self.trained())


def deliver(session: RunSession, *, guard: SignalGuard, log: Callable[..., Any]) -> int:
    """Delivers a finished (or interrupted) search session; returns the exit code.

    An interrupted search gets its summary and no exports; an interrupt while exporting
    publishes nothing and says how to export.
    """
    plan, stats = session.plan, session.state.stats()
    rungs = Rungs(session.study, session.rung1, session.family, session.state.family_id)
    if session.interrupted:
        with guard.ignored():
            finish(plan, rungs, stats, interrupted=True, log=log)
        return exit_code(session.interrupted)
    try:
        return finish(plan, rungs, stats, interrupted=False, complete=session.complete, log=log)
    except KeyboardInterrupt as e:
        log(
            f"interrupted ({guard.name(e)}) while exporting: no exports were published; "
            f"to export, run the same command again: {plan.command}"
        )
        return exit_code(guard.name(e))


def finish(
    plan: Plan,
    rungs: Rungs,
    stats: Mapping[str, int],
    *,
    interrupted: bool,
    complete: bool = False,
    log: Callable[..., Any] = print,
) -> int:
    """Selects per device, measures test accuracy, writes exports, report and summary.

    Args:
        plan: The run's plan.
        rungs: The search's studies.
        stats: This run's counts (completed, failed, pruned, ...).
        interrupted: The run was interrupted: print the summary, write no exports.
        complete: The study holds the requested evaluations (exports are final).
        log: Prints a progress line.

    Returns:
        The exit code: 0, or 130 when interrupted.
    """
    out = sys.stdout
    trials = evaluated_trials(rungs.study)
    counts = counts_line(
        plan,
        rungs.study,
        evaluated=len(trials),
        finetuned=len(rungs.finetuned()) if rungs.rung1 is not None else None,
        trained=len(rungs.trained()) if rungs.family is not None else None,
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
    chosen = select_per_device(rungs.candidates(), plan.budgets)
    exports: list[Path] = []
    tests: dict[str, str] = {}
    if not interrupted:
        if not complete:
            log(
                f"the study holds {len(trials)} of the {plan.trials} requested evaluations: "
                'exports are written with "final": false'
            )
        exports, tests = export_picks(
            plan, rungs, chosen, n_evaluated=len(trials), final=complete, log=log
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
        print(f"report: {_report(plan, rungs, chosen, trials)}", file=out)
    for p in exports:
        print(f"export: {p}", file=out)
        if plan.onnx and p.name != FAMILY_EXPORT:
            print(f"onnx: {write_onnx(p, p.with_suffix('.onnx'))}", file=out)
    print(f"dashboard: {dashboard_command(plan.storage_url)}", file=out)
    for what, s in (("rung 1, fine-tuned", rungs.rung1), ("the family", rungs.family)):
        if s is not None:
            print(f"  ({what}: study {s.study_name!r} in the same storage)", file=out)
    return 130 if interrupted else 0


#: The family's export, beside the devices' (every member in one switchable network).
FAMILY_EXPORT = "family.json"


def export_picks(
    plan: Plan,
    rungs: Rungs,
    chosen: Mapping[str, FrozenTrial | None],
    *,
    n_evaluated: int,
    final: bool,
    log: Callable[..., Any] = print,
) -> tuple[list[Path], dict[str, str]]:
    """Re-measures each device's pick (with test accuracy) and publishes the exports.

    With a trained family, ``exports/family.json`` holds every member too (measured again,
    test accuracy included), and every export of a family member references the family's
    trained anchor weights under ``exports/anchors/``.

    Returns:
        The published export files, and each exported device's test accuracy (formatted).
    """
    context = _context(plan, rungs)
    clean_staging(plan.out, live=live_drivers(rungs.study) - {plan.driver_id})
    staging = staging_dir(plan.out, plan.driver_id)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    taken: set[str] = {FAMILY_EXPORT.removesuffix(".json")}
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
        anchors = trained_family(context.family).anchors if key[0] == 2 and context.family else None
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
                anchors=anchors,
            )
        )
    if context.family is not None:
        written.append(_family_export(plan, rungs, context, staging, log))
    final_dir = plan.out / "exports"
    publish(staging, final_dir)
    return [final_dir / p.name for p in written], tests


def _context(plan: Plan, rungs: Rungs) -> TrialContext:
    """The context the picks are re-measured with.

    The workers' thread count, so that fine-tuning reproduces the trial's weights exactly;
    rung 2 reads the trained family.
    """
    threads = max(1, (os.cpu_count() or 1) // plan.workers)
    path = family_path(plan.out, rungs.family_id) if rungs.family_id else None
    return trial_context(
        plan,
        threads=threads,
        rung=1 if rungs.rung1 is not None else 0,
        teacher=teacher_of(plan, rungs.study),
        family=str(path) if path is not None and path.is_file() else None,
    )


def _family_export(
    plan: Plan, rungs: Rungs, context: TrialContext, staging: Path, log: Callable[..., Any]
) -> Path:
    """``family.json``: every member measured again (test accuracy too), with its costs."""
    assert context.family is not None
    family = trained_family(context.family)
    by_name = {member_name(candidate_of(t)): t for t in rungs.trained()}
    for name in family.names:
        result = context.evaluate(
            family.members[name], plan.anchors, test=True, measure_latency=False, rung=2
        )
        attrs = by_name[name].user_attrs if name in by_name else {}
        family.metrics[name] = {
            "accuracy": result.val_acc,
            "val_top5": result.val_top5,
            "test_accuracy": result.test_acc,
            "test_top5": result.test_top5,
            "macs": attrs.get(Attr.MACS, result.macs),
            "params": attrs.get(Attr.PARAMS, result.params),
            "latency_ms": attrs.get(Attr.LATENCY_MS),
            "fits_devices": attrs.get(Attr.FITS_DEVICES, []),
        }
    best = max(family.names, key=lambda n: family.metrics[n]["accuracy"])
    family.switch(best)
    trained = any(a.trained_sha256 is not None for a in family.anchors.values())
    training = json.loads(Path(context.family).read_text()).get("training", {})
    training["family_id"] = rungs.family_id
    path = save_family(
        family,
        staging / FAMILY_EXPORT,
        trained=trained,
        measure=plan.measure,
        training=training,
        data=data_record(plan),
    )
    log(f"family: {len(family.names)} members measured again for {FAMILY_EXPORT}")
    return path


def _report(
    plan: Plan,
    rungs: Rungs,
    chosen: Mapping[str, FrozenTrial | None],
    trials: list[FrozenTrial],
) -> Path:
    pareto = {t.number for t in rungs.study.best_trials} if trials else set()
    return write_report(
        plan.out / "report.html",
        trial_rows(rungs.study, pareto, rungs.rung1, rungs.trained()),
        plan.budgets,
        study_name=plan.study.name,
        chosen={d: trial_row_id(t) if t is not None else None for d, t in chosen.items()},
        device_latency={
            b.device: device_latency_text(t.user_attrs, b)
            for b in plan.budgets
            if (t := chosen[b.device]) is not None
        },
        measure=plan.measure,
    )
