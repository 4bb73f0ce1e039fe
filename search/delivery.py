"""After the trials: re-measure each device's pick, write exports, the report and the summary.

Exports are written only when a run finishes (an interrupted run writes none), into a
staging folder that then replaces ``exports/`` as a whole: a run killed while exporting
leaves the previous exports (or none), never a mix. An export says ``"final": true`` only
when the study holds the requested number of evaluations (or has evaluated every unpruned
candidate).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from safetensors.torch import save_file

from search.budgets import HOST_MEASURED, DeviceBudget, format_quantity, safe_filename
from search.onnx import write_onnx
from search.plan import Plan
from search.promotion import best_rung, rung1_trials, teacher_of
from search.report import write_report
from search.selection import select_per_device
from search.storage import PASSWORD_ENV, has_password, masked_url, url_without_password
from search.trials import (
    Attr,
    budget_metrics,
    candidate_of,
    device_latency,
    evaluated_trials,
    measure_name,
    rung_of,
)
from space import EXPORT_FORMAT, AnchorRecord, ExportManifest, StitchRecord
from space.files import atomic_path, atomic_write


def write_export(
    export_dir: Path,
    device: DeviceBudget,
    trial: FrozenTrial,
    result,
    plan,
    *,
    taken: set[str],
    n_evaluated: int,
    final: bool = True,
) -> Path:
    """Writes ``<device>.json`` and the fitted stitching layer ``<device>.safetensors``.

    Args:
        export_dir: The folder to write into.
        device: The device.
        trial: The chosen trial.
        result: Its re-evaluation (fitted network, test accuracy).
        plan: The run's plan.
        taken: File stems already used in ``export_dir``.
        n_evaluated: Evaluations in the study.
        final: Whether the study is complete (``"final"`` in the manifest).
    """
    export_dir.mkdir(parents=True, exist_ok=True)
    stem = safe_filename(device.device, taken)
    taken.add(stem.lower())
    c = candidate_of(trial)
    weights = None
    if not c.is_anchor:
        weights = export_dir / f"{stem}.safetensors"
        state = {
            k: v.detach().cpu().contiguous() for k, v in result.net.stitch.state_dict().items()
        }
        with atomic_path(weights) as tmp:
            save_file(
                state,
                str(tmp),
                metadata={"format": EXPORT_FORMAT, "layer": type(result.net.stitch).__name__},
            )
    anchors = [AnchorRecord.of(plan.anchors[c.front], "front")]
    if not c.is_anchor:
        anchors.append(AnchorRecord.of(plan.anchors[c.back], "back"))
    metrics = budget_metrics(trial.user_attrs, device)
    attrs = trial.user_attrs
    teacher = plan.data.recipe.teacher if plan.data.recipe is not None else None
    manifest = ExportManifest(
        device=device.device,
        final=bool(final),
        budget=device.to_dict(),
        headroom=device.headroom(metrics),
        candidate=c,
        anchors=tuple(anchors),
        stitch=None if weights is None else StitchRecord.of(result.net.stitch, weights),
        metrics={
            "validation": {"top1": attrs.get(Attr.VAL_ACC), "top5": attrs.get(Attr.VAL_TOP5)},
            "validation_remeasured": {"top1": result.val_acc, "top5": result.val_top5},
            "test": {"top1": result.test_acc, "top5": getattr(result, "test_top5", None)},
            "macs": attrs.get(Attr.MACS),
            "params": attrs.get(Attr.PARAMS),
            "latency_ms": metrics[Attr.LATENCY_MS],
            "latency": latency_record(device, attrs),
            "memory_mb": attrs.get(Attr.MEMORY_MB),
            "cka": attrs.get(Attr.CKA),
            # Label-free: top1/top5 are agreement with the teacher the data records.
            **({"measure": measure_name(teacher)} if teacher is not None else {}),
        },
        data={
            "name": plan.data.name,
            "identity": plan.data.identity,
            "validation_images": plan.data.validation.num_images,
            "test_images": plan.data.test.num_images,
            "input_size": list(plan.data.input_size),
            "calibration_images": plan.data.calibration.num_images,
            "batch_size": plan.study.data.batch_size,
            "recipe": plan.data.recipe.to_dict(),
        },
        fit=_fit_record(plan, trial),
        study={
            "name": plan.study.name,
            "storage": masked_url(plan.storage_url),
            "trial_number": attrs.get(Attr.RUNG0_TRIAL, trial.number),
            "objectives": list(plan.study.objectives),
            "evaluated_trials": n_evaluated,
        },
    )
    path = export_dir / f"{stem}.json"
    atomic_write(path, manifest.to_json())
    return path


def latency_record(device: DeviceBudget, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Where a device's latency comes from, for its export: its table, or the host."""
    record: dict[str, Any] = {
        "source": device.latency_source,
        "host_ms": attrs.get(Attr.LATENCY_MS),
    }
    if device.table is not None:
        record["table"] = {**device.table.identity(), "path": str(device.latency_table)}
    return record


def latency_cell(device: DeviceBudget, attrs: Mapping[str, Any]) -> str:
    """A device's latency for the summary: ``"0.93 ms table"`` or ``"1.16 ms host-measured"``."""
    value = device_latency(attrs, device)
    label = "table" if device.table is not None else HOST_MEASURED
    return f"{value:.2f} ms {label}" if value is not None else f"- {label}"


def _fit_record(plan: Plan, trial: FrozenTrial) -> dict[str, Any]:
    """How the exported stitching layer was fitted: least squares, then rung 1 if reached."""
    record: dict[str, Any] = {
        "calibration_images": plan.data.calibration.num_images,
        "steps": plan.study.fit.steps,
        "lr": plan.study.fit.lr,
        "rung": rung_of(trial),
    }
    if rung_of(trial):
        attrs = trial.user_attrs
        record["finetune"] = {
            **attrs.get(Attr.FINETUNE, {}),
            "train_images": train.num_images if (train := plan.trial_data().train) else None,
            "rung1_trial": trial.number,
            "rung0_val_acc": attrs.get(Attr.RUNG0_VAL_ACC),
            "loss_first": attrs.get(Attr.LOSS_FIRST),
            "loss_last": attrs.get(Attr.LOSS_LAST),
            "seconds": attrs.get(Attr.FINETUNE_SECONDS),
        }
    return record


STAGING_PREFIX = ".exports-"


def dashboard_command(url: str) -> str:
    """The optuna-dashboard command for the storage, never with its password."""
    if not has_password(url):
        return f"optuna-dashboard {shlex.quote(url)}"
    return (
        f"optuna-dashboard {shlex.quote(url_without_password(url))}  "
        f"# the password is not shown: set ${PASSWORD_ENV} to it first"
    )


def staging_dir(out: Path, driver_id: str) -> Path:
    """The folder a driver writes its exports into before publishing them."""
    return out / f"{STAGING_PREFIX}{driver_id[:12]}.tmp"


def clean_staging(out: Path, *, live: set[str]) -> list[Path]:
    """Removes staging folders left by killed drivers (not those of ``live`` drivers).

    Returns:
        The removed folders.
    """
    removed = []
    for d in out.glob(f"{STAGING_PREFIX}*"):
        owner = d.name.removeprefix(STAGING_PREFIX).split(".", 1)[0]
        if d.is_dir() and not any(x.startswith(owner) for x in live):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def publish(staging: Path, target: Path) -> None:
    """Replaces ``target`` by ``staging`` (two renames; the old folder is then deleted)."""
    old = staging.with_name(staging.name.replace(".tmp", ".old"))
    for _ in range(10):  # another driver publishing into the same folder: try again
        try:
            if target.exists():
                os.replace(target, old)
            os.replace(staging, target)
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise OSError(f"could not publish {staging} as {target}")
    shutil.rmtree(old, ignore_errors=True)


def _row_id(trial: FrozenTrial) -> str:
    """A trial's id in the report: ``#12`` at rung 0, ``#12 fine-tuned`` for its rung-1 trial."""
    if rung_of(trial):
        return f"#{trial.user_attrs.get(Attr.RUNG0_TRIAL)} fine-tuned"
    return f"#{trial.number}"


def trial_rows(
    study: optuna.Study, pareto: set[int], rung1: optuna.Study | None = None
) -> list[dict[str, Any]]:
    """Trials of both rungs as plain rows for the report.

    A rung-1 row carries ``rung`` 1, the rung-0 trial it fine-tuned (``rung0``) and that
    trial's least-squares accuracy (``rung0_val_acc``).
    """
    rows = []
    finetuned = rung1.get_trials(deepcopy=False) if rung1 is not None else []
    for t in [*study.get_trials(deepcopy=False), *finetuned]:
        a = t.user_attrs
        rows.append(
            {
                "id": _row_id(t),
                "number": a.get(Attr.RUNG0_TRIAL, t.number),
                "rung": rung_of(t),
                "state": t.state.name,
                "val_acc": a.get(Attr.VAL_ACC),
                "rung0_val_acc": a.get(Attr.RUNG0_VAL_ACC),
                "macs": a.get(Attr.MACS),
                "params": a.get(Attr.PARAMS),
                "latency_ms": a.get(Attr.LATENCY_MS),
                "label": a.get(Attr.LABEL, ""),
                "kind": a.get(Attr.KIND, "stitch"),
                "feasible": a.get(Attr.FEASIBLE),
                "pareto": not rung_of(t) and t.number in pareto,
                "cka": a.get(Attr.CKA),
                "reason": a.get(Attr.PRUNED_REASON) or a.get(Attr.FAIL_REASON),
            }
        )
    return rows


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def finish(
    plan: Plan,
    study: optuna.Study,
    stats: Mapping[str, int],
    *,
    interrupted: bool,
    complete: bool = True,
    rung1: optuna.Study | None = None,
    log: Callable = print,
) -> int:
    """Selects per device, measures test accuracy, writes exports, report and summary.

    Every candidate counts at the highest rung it reached: a stitch fine-tuned at rung 1 is
    chosen, re-measured and exported as fine-tuned.

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
    trials = evaluated_trials(study)
    finetuned = rung1_trials(rung1) if rung1 is not None else []
    candidates = best_rung(trials, finetuned)
    all_trials = study.get_trials(deepcopy=False)
    counts = {s.name: sum(1 for t in all_trials if t.state == s) for s in TrialState}
    pareto = {t.number for t in study.best_trials} if trials else set()
    out = sys.stdout
    print(
        f"\n{'INTERRUPTED: ' if interrupted else ''}study {plan.study.name!r}: "
        f"{len(trials)}/{plan.trials} candidates evaluated; this run: "
        f"{stats.get('completed', 0)} evaluated, {stats.get('pruned', 0)} pruned, "
        f"{stats.get('failed', 0)} failed"
        + (f", {stats['interrupted']} stopped in flight" if stats.get("interrupted") else "")
        + f"; all trials: {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed, {counts['RUNNING']} running"
        + (
            f"; rung 1: {len(finetuned)} fine-tuned ({stats.get('finetuned', 0)} this run)"
            if rung1 is not None
            else ""
        ),
        file=out,
        flush=True,
    )
    if interrupted:
        print(
            f"interrupted: no exports written; to resume, run the same command again: "
            f"{plan.command}",
            file=out,
            flush=True,
        )
    chosen = select_per_device(candidates, plan.budgets)
    # The workers' thread count: fine-tuning then reproduces the trial's weights exactly.
    threads = max(1, (os.cpu_count() or 1) // plan.workers)
    context = plan.trial_context(
        threads=threads, rung=1 if rung1 is not None else 0, teacher=teacher_of(plan, study)
    )
    export_dir = staging_dir(plan.out, plan.driver_id)
    final_dir = plan.out / "exports"
    if not interrupted:
        shutil.rmtree(export_dir, ignore_errors=True)
        export_dir.mkdir(parents=True)
    quality = "acc" if not plan.study.label_free else plan.measure
    rows = [
        [
            "device",
            "trial",
            "rung",
            "configuration",
            f"val {quality}",
            f"test {quality}",
            "MACs",
            "params",
            "latency",
            "headroom",
        ]
    ]
    exports: list[Path] = []
    taken: set[str] = set()
    results: dict[int, Any] = {}
    if not interrupted and not complete:
        log(
            f"the study holds {len(trials)} of the {plan.trials} requested evaluations: "
            'exports are written with "final": false'
        )
    for b in plan.budgets:
        t = chosen[b.device]
        if t is None:
            rows.append(
                [b.device, "-", "", "nothing fits this device's budget", "", "", "", "", "", ""]
            )
            continue
        metrics = budget_metrics(t.user_attrs, b)
        head = b.headroom(metrics)
        test = ""
        if not interrupted:
            rung = rung_of(t)
            if (rung, t.number) not in results:
                results[rung, t.number] = context.evaluate(
                    candidate_of(t), plan.anchors, test=True, measure_latency=False, rung=rung
                )
            res = results[rung, t.number]
            test = f"{res.test_acc:.2f}%"
            exports.append(
                write_export(
                    export_dir,
                    b,
                    t,
                    res,
                    plan,
                    taken=taken,
                    n_evaluated=len(trials),
                    final=complete,
                )
            )
        rows.append(
            [
                b.device,
                str(t.user_attrs.get(Attr.RUNG0_TRIAL, t.number)),
                "fine-tuned" if rung_of(t) else "least sq.",
                t.user_attrs.get(Attr.LABEL, ""),
                f"{t.user_attrs[Attr.VAL_ACC]:.2f}%",
                test,
                format_quantity(t.user_attrs.get(Attr.MACS, 0)),
                format_quantity(t.user_attrs.get(Attr.PARAMS, 0)),
                latency_cell(b, t.user_attrs),
                ", ".join(f"{k} {v:+.0%}" for k, v in head.items()) or "no limits",
            ]
        )
    if not interrupted:
        publish(export_dir, final_dir)
        exports = [final_dir / p.name for p in exports]
    print(_table(rows), file=out)
    for b in plan.budgets:
        if chosen[b.device] is None:
            print(
                f"device {b.device!r}: no evaluated candidate fits its budget {b.limits()}; "
                "no export written",
                file=out,
            )
    if plan.report and not interrupted:
        report = write_report(
            plan.out / "report.html",
            trial_rows(study, pareto, rung1),
            plan.budgets,
            study_name=plan.study.name,
            chosen={d: _row_id(t) if t is not None else None for d, t in chosen.items()},
            device_latency={
                b.device: (device_latency(t.user_attrs, b), b.latency_source)
                for b in plan.budgets
                if (t := chosen[b.device]) is not None
            },
            measure=plan.measure,
        )
        print(f"report: {report}", file=out)
    for p in exports:
        print(f"export: {p}", file=out)
        if plan.onnx:
            print(f"onnx: {write_onnx(p, p.with_suffix('.onnx'))}", file=out)
    print(f"dashboard: {dashboard_command(plan.storage_url)}", file=out)
    if rung1 is not None:
        print(f"  (rung 1, fine-tuned: study {rung1.study_name!r} in the same storage)", file=out)
    return 130 if interrupted else 0
