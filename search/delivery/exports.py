"""A device's export: ``<device>.json`` (the manifest) and the fitted stitching layer.

The manifest (:class:`space.ExportManifest`, the one owner of the format) records the chosen
configuration, the anchors with their checkpoints' SHA-256, validation and test metrics,
the device's budget row and latency source, how the stitching layer was fitted (rung 0, or
rung 1 with its settings) and the study it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from optuna.trial import FrozenTrial
from safetensors.torch import save_file

from evaluators import CandidateResult
from search.core import (
    Attr,
    DeviceBudget,
    budget_metrics,
    candidate_of,
    device_latency,
    device_latency_estimate,
    device_latency_text,
    masked_url,
    measure_name,
    rung_of,
    safe_filename,
)
from search.execution import trial_data
from search.inputs import Plan
from space import (
    EXPORT_FORMAT,
    Anchor,
    AnchorRecord,
    ExportManifest,
    StitchRecord,
    place_anchor_weights,
)
from space.files import atomic_path, atomic_write


def write_export(
    export_dir: Path,
    device: DeviceBudget,
    trial: FrozenTrial,
    result: CandidateResult,
    plan: Plan,
    *,
    taken: set[str],
    n_evaluated: int,
    final: bool = True,
    anchors: Mapping[str, Anchor] | None = None,
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
        anchors: The anchors the network runs (default: the plan's); a family's trained
            anchors have their weights placed under ``anchors/`` once and referenced.
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
    source = plan.anchors if anchors is None else anchors
    records = [_record(source[c.front], "front", export_dir)]
    if not c.is_anchor:
        records.append(_record(source[c.back], "back", export_dir))
    metrics = budget_metrics(trial.user_attrs, device)
    attrs = trial.user_attrs
    teacher = plan.data.recipe.teacher if plan.data.recipe is not None else None
    manifest = ExportManifest(
        device=device.device,
        final=bool(final),
        budget=device.to_dict(),
        headroom=device.headroom(metrics),
        candidate=c,
        anchors=tuple(records),
        stitch=None if weights is None else StitchRecord.of(result.net.stitch, weights),
        metrics={
            "validation": {"top1": attrs.get(Attr.VAL_ACC), "top5": attrs.get(Attr.VAL_TOP5)},
            "validation_remeasured": {"top1": result.val_acc, "top5": result.val_top5},
            "test": {"top1": result.test_acc, "top5": getattr(result, "test_top5", None)},
            "macs": attrs.get(Attr.MACS),
            "params": attrs.get(Attr.PARAMS),
            "latency_ms": device_latency_estimate(attrs, device)[0],
            "latency": latency_record(device, attrs),
            "memory_mb": attrs.get(Attr.MEMORY_MB),
            "cka": attrs.get(Attr.CKA),
            # Label-free: top1/top5 are agreement with the teacher the data records.
            **({"measure": measure_name(teacher)} if teacher is not None else {}),
        },
        data=data_record(plan),
        fit=fit_record(plan, trial),
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


def data_record(plan: Plan) -> dict[str, Any]:
    """The data the run measured on, as a manifest's ``data`` (``--check`` rebuilds it)."""
    return {
        "name": plan.data.name,
        "identity": plan.data.identity,
        "validation_images": plan.data.validation.num_images,
        "test_images": plan.data.test.num_images,
        "input_size": list(plan.data.input_size),
        "calibration_images": plan.data.calibration.num_images,
        "batch_size": plan.study.data.batch_size,
        "recipe": plan.data.recipe.to_dict(),
    }


def _record(anchor: Anchor, role: str, export_dir: Path) -> AnchorRecord:
    """An anchor's record; a trained anchor's weights are placed in the export's folder."""
    if anchor.trained_sha256 is None:
        return AnchorRecord.of(anchor, role)
    return AnchorRecord.of(anchor, role, trained=place_anchor_weights(anchor, export_dir))


def latency_record(device: DeviceBudget, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Where a device's latency comes from, for its export: its table, or the host.

    With a table: the prediction's standard deviation (``std_ms``), the quantile checked
    against the budget (``quantile``, 0.5 by default) and its value (``checked_ms``), and
    the line people read (``text``: ``"2.39 ms ± 0.12 (table)"``).
    """
    record: dict[str, Any] = {
        "source": device.latency_source,
        "host_ms": attrs.get(Attr.LATENCY_MS),
    }
    if device.table is not None:
        _, std = device_latency_estimate(attrs, device)
        record["std_ms"] = std
        record["quantile"] = device.latency_quantile or 0.5
        record["checked_ms"] = device_latency(attrs, device)
        record["text"] = device_latency_text(attrs, device)
        record["table"] = {**device.table.identity(), "path": str(device.latency_table)}
    return record


def fit_record(plan: Plan, trial: FrozenTrial) -> dict[str, Any]:
    """How the exported network was fitted: least squares, then rung 1 or the family."""
    record: dict[str, Any] = {
        "calibration_images": plan.data.calibration.num_images,
        "steps": plan.study.fit.steps,
        "lr": plan.study.fit.lr,
        "rung": rung_of(trial),
    }
    attrs = trial.user_attrs
    if rung_of(trial) == 2:
        record["family"] = {
            "family_id": attrs.get(Attr.FAMILY_ID),
            "settings": attrs.get(Attr.FAMILY),
            "members": attrs.get(Attr.FAMILY_MEMBERS),
            "artifact": "family.json",
            "train_images": plan.study.family.train_images
            or (plan.data.train.num_images if plan.data.train is not None else None),
            "epochs": attrs.get(Attr.FAMILY_EPOCHS),
            "resumed_from": attrs.get(Attr.FAMILY_RESUMED),
            "seconds": attrs.get(Attr.FAMILY_SECONDS),
            "loss_curve": attrs.get(Attr.LOSS_CURVE),
            "member_loss": attrs.get(Attr.MEMBER_LOSS),
            "member_steps": attrs.get(Attr.MEMBER_STEPS),
            "family_trial": trial.number,
            "lower_rung": attrs.get(Attr.LOWER_RUNG),
            "lower_val_acc": attrs.get(Attr.LOWER_VAL_ACC),
            "rung1_trial": attrs.get(Attr.RUNG1_TRIAL),
            "rung0_val_acc": attrs.get(Attr.RUNG0_VAL_ACC),
        }
    elif rung_of(trial):
        record["finetune"] = {
            **attrs.get(Attr.FINETUNE, {}),
            "train_images": train.num_images if (train := trial_data(plan).train) else None,
            "rung1_trial": trial.number,
            "rung0_val_acc": attrs.get(Attr.RUNG0_VAL_ACC),
            "loss_first": attrs.get(Attr.LOSS_FIRST),
            "loss_last": attrs.get(Attr.LOSS_LAST),
            "seconds": attrs.get(Attr.FINETUNE_SECONDS),
        }
    return record
