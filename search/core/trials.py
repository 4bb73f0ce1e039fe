"""The trial record: what a stored trial says, under which names.

One owner for everything the search writes into, and reads back from, an Optuna study:

- :class:`Attr`: the user-attribute keys of a trial (and :class:`StudyAttr` of the study);
- :data:`OBJECTIVES`: the objective table (name, direction, unit, the worker metric it is
  read from); the study YAML, the searcher, the storage check and the report all use it;
- the candidate codec (:func:`candidate_of`, via :class:`space.Candidate`);
- small readers over trials (:func:`evaluated_trials`, :func:`budget_metrics`).

Everything here is plain data and pure functions; nothing talks to Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.core.budgets import HOST_MEASURED, DeviceBudget
from space import Candidate


class Attr:
    """User-attribute keys of a trial."""

    #: The driver (run) that asked for the trial.
    DRIVER = "driver"
    #: :attr:`space.Candidate.key` of the configuration.
    KEY = "key"
    #: :attr:`space.Candidate.label`.
    LABEL = "label"
    #: ``"anchor"`` or ``"stitch"``.
    KIND = "kind"
    #: :meth:`space.Candidate.to_dict`.
    CONFIG = "config"
    #: The input resolution in pixels the candidate ran at (studies with ``resolutions``).
    RESOLUTION = "resolution"
    #: CKA at the stitch point (stitches only).
    CKA = "cka"
    #: Why the CKA rule, a collision or the total pruned it.
    PRUNED_REASON = "pruned_reason"
    #: Why the evaluation failed.
    FAIL_REASON = "fail_reason"
    #: The trial number whose result a repeat copies.
    DUPLICATE_OF = "duplicate_of"
    #: Devices whose budgets the candidate fits (visible in optuna-dashboard).
    FITS_DEVICES = "fits_devices"
    #: Whether it fits any device (optuna-dashboard does not read Optuna 5 constraints).
    FEASIBLE = "feasible"
    #: Set on the anchors enqueued at study set-up.
    SEEDED = "seeded"
    # Metrics reported by a worker.
    VAL_ACC = "val_acc"
    VAL_TOP5 = "val_top5"
    MACS = "macs"
    #: Operators fvcore could not count that the study allowed to count as zero
    #: (``"aten::foo x12, ..."``; absent when every operator was counted).
    MACS_UNCOUNTED = "macs_uncounted"
    PARAMS = "params"
    STITCH_PARAMS = "stitch_params"
    LATENCY_MS = "latency_ms"
    LATENCY_SPREAD_MS = "latency_spread_ms"
    #: Latency predicted from each device's latency table, by device (devices with a
    #: table only; ``latency_ms`` stays the host's measurement).
    DEVICE_LATENCY_MS = "device_latency_ms"
    #: The standard deviation of each table-predicted latency, by device.
    DEVICE_LATENCY_STD_MS = "device_latency_std_ms"
    #: Each device's latency as people read it: ``"2.39 ms ± 0.12 (table)"``.
    DEVICE_LATENCY_TEXT = "device_latency"
    MEMORY_MB = "memory_mb"
    FIT_RESIDUAL = "fit_residual"
    #: Least-squares relative residual over the stitch's whole target (the pruning signal
    #: ``residual``, measured again by the trial's own fit).
    RESIDUAL = "residual"
    FIT_SECONDS = "fit_seconds"
    EVAL_SECONDS = "eval_seconds"
    TRIAL_SECONDS = "trial_seconds"
    HOST = "host"
    EVAL_PID = "eval_pid"
    # The fidelity ladder (rung 0: least squares; rung 1: stitch-only fine-tuning).
    #: The rung of a rung-1 trial (rung-0 trials carry none).
    RUNG = "rung"
    #: The rung-0 trial a rung-1 trial fine-tuned.
    RUNG0_TRIAL = "rung0_trial"
    #: That trial's (least-squares) validation accuracy.
    RUNG0_VAL_ACC = "rung0_val_acc"
    #: The fine-tuning settings (:class:`evaluators.FinetuneSettings` as a dict).
    FINETUNE = "finetune"
    FINETUNE_SECONDS = "finetune_seconds"
    FINETUNE_STEPS = "finetune_steps"
    #: Training images used (repeats counted).
    TRAIN_IMAGES_SEEN = "train_images_seen"
    LOSS_FIRST = "loss_first"
    LOSS_LAST = "loss_last"
    LOSS_MIN = "loss_min"
    #: Mean training loss over ~20 equal runs of steps (the family: per epoch).
    LOSS_CURVE = "loss_curve"
    # The family (rung 2): anchors and stitches trained jointly.
    #: The rung-1 trial a family member's stitch came from (members fine-tuned at rung 1).
    RUNG1_TRIAL = "rung1_trial"
    #: The rung a family member's stitch was initialised from (0 or 1).
    LOWER_RUNG = "lower_rung"
    #: The member's validation accuracy at that rung.
    LOWER_VAL_ACC = "lower_val_acc"
    #: Which trained family (a fingerprint of its members, settings and data).
    FAMILY_ID = "family_id"
    #: The family's settings (:class:`evaluators.FamilySettings` as a dict).
    FAMILY = "family"
    #: The family's members (names), in order.
    FAMILY_MEMBERS = "family_members"
    #: Epochs trained, and the epoch the last run resumed from (0: it started afresh).
    FAMILY_EPOCHS = "family_epochs"
    FAMILY_RESUMED = "family_resumed_from"
    FAMILY_SECONDS = "family_seconds"
    #: Mean loss of this member in the last epoch, and its steps over all epochs.
    MEMBER_LOSS = "member_loss"
    MEMBER_STEPS = "member_steps"


#: What a worker reports that is stored on the trial (everything else is dropped).
RESULT_ATTRS = frozenset(
    {
        Attr.VAL_ACC,
        Attr.VAL_TOP5,
        Attr.MACS,
        Attr.MACS_UNCOUNTED,
        Attr.PARAMS,
        Attr.STITCH_PARAMS,
        Attr.LATENCY_MS,
        Attr.LATENCY_SPREAD_MS,
        Attr.MEMORY_MB,
        Attr.CKA,
        Attr.FIT_RESIDUAL,
        Attr.RESIDUAL,
        Attr.FIT_SECONDS,
        Attr.EVAL_SECONDS,
        Attr.TRIAL_SECONDS,
        Attr.HOST,
        Attr.EVAL_PID,
        Attr.RUNG0_VAL_ACC,
        Attr.FINETUNE,
        Attr.FINETUNE_SECONDS,
        Attr.FINETUNE_STEPS,
        Attr.TRAIN_IMAGES_SEEN,
        Attr.LOSS_FIRST,
        Attr.LOSS_LAST,
        Attr.LOSS_MIN,
        Attr.LOSS_CURVE,
        Attr.LOWER_VAL_ACC,
    }
)


def unflatten(result: Mapping[str, Any]) -> dict[str, Any]:
    """A worker's result with the nested dicts Ray Tune flattened (``a/b`` keys) rebuilt.

    Ray Tune reports ``{"fit_residual": {"linear": 0.1}}`` to searchers as
    ``{"fit_residual/linear": 0.1}``; the stored attribute keeps the nested form.
    """
    out: dict[str, Any] = {}
    for key, value in result.items():
        head, sep, rest = key.partition("/")
        if sep and head in RESULT_ATTRS:
            node = out.setdefault(head, {})
            *path, leaf = rest.split("/")
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = value
        else:
            out[key] = value
    return out


#: How the summary and the report name each rung.
RUNG_NAMES = {0: "least sq.", 1: "fine-tuned", 2: "family"}


def rung_of(trial: FrozenTrial) -> int:
    """The rung a trial's result comes from (:data:`RUNG_NAMES`; 0: least squares)."""
    return int(trial.user_attrs.get(Attr.RUNG, 0))


def finetune_attrs(finetune: Mapping[str, Any] | None) -> dict[str, Any]:
    """A rung-1 evaluation's fine-tuning record as trial user attributes."""
    if not finetune:
        return {}
    return {
        Attr.FINETUNE: dict(finetune["settings"]),
        Attr.FINETUNE_SECONDS: round(float(finetune["seconds"]), 3),
        Attr.FINETUNE_STEPS: int(finetune["steps"]),
        Attr.TRAIN_IMAGES_SEEN: int(finetune["images_seen"]),
        Attr.LOSS_FIRST: float(finetune["loss_first"]),
        Attr.LOSS_LAST: float(finetune["loss_last"]),
        Attr.LOSS_MIN: float(finetune["loss_min"]),
        Attr.LOSS_CURVE: [round(float(v), 5) for v in finetune["loss_curve"]],
    }


def macs_uncounted_text(uncounted: Mapping[str, int]) -> str:
    """The operators a MAC count left out, as stored on a trial (``"aten::foo x12, ..."``)."""
    return ", ".join(f"{op} x{n}" for op, n in sorted(uncounted.items()))


#: The metrics device budgets are checked against.
BUDGET_METRICS = (Attr.MACS, Attr.PARAMS, Attr.LATENCY_MS, Attr.MEMORY_MB)


class StudyAttr:
    """User-attribute keys of a study."""

    #: The driver that created the study.
    CREATOR = "created_by"
    #: Set once the anchors are enqueued and the CKA-pruned points recorded.
    SETUP_COMPLETE = "setup_complete"
    #: The objective names, in order.
    OBJECTIVES = "objectives"
    #: The study YAML as validated (JSON).
    DEFINITION = "study_definition"
    # Drivers' heartbeats (``heartbeat:<driver id>``) belong to :mod:`search.store.liveness`.


@dataclass(frozen=True)
class Objective:
    """One objective of a study.

    Attributes:
        name: The name in the study YAML and in optuna-dashboard.
        direction: Optuna's direction.
        unit: What the value counts (for reports).
        metric: The worker metric (trial user attribute) it is read from.
    """

    name: str
    direction: Literal["maximize", "minimize"]
    unit: str
    metric: str


#: Every objective a study may optimise, by name.
OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("accuracy", "maximize", "top-1 %", Attr.VAL_ACC),
        # A label-free study: top-1 agreement with the teacher (the labels are its top-1).
        Objective("agreement", "maximize", "top-1 agreement %", Attr.VAL_ACC),
        Objective("macs", "minimize", "multiply-accumulates", Attr.MACS),
        Objective("params", "minimize", "parameters", Attr.PARAMS),
        Objective("latency_ms", "minimize", "milliseconds", Attr.LATENCY_MS),
    )
}


def measure_name(teacher: str | None) -> str:
    """What validation and test top-1 measure: ``"accuracy"``, or agreement with a teacher.

    Args:
        teacher: The teacher of a label-free study, or None for labelled data.

    Returns:
        ``"accuracy"`` or ``"agreement with <teacher>"``.
    """
    return "accuracy" if teacher is None else f"agreement with {teacher}"


def metric_names(objectives: list[str], teacher: str | None) -> list[str]:
    """The objective names optuna-dashboard shows: ``agreement with <teacher>`` spelled out."""
    return [measure_name(teacher) if o == "agreement" else o for o in objectives]


def candidate_of(trial: FrozenTrial) -> Candidate:
    """The candidate a trial evaluated."""
    return Candidate.from_dict(trial.user_attrs[Attr.CONFIG])


def annotation(candidate: Candidate, driver_id: str, cka: float | None) -> dict[str, Any]:
    """The user attributes that say which candidate a trial evaluates, and for whom."""
    attrs: dict[str, Any] = {
        Attr.DRIVER: driver_id,
        Attr.KEY: candidate.key,
        Attr.LABEL: candidate.label,
        Attr.KIND: "anchor" if candidate.is_anchor else "stitch",
        Attr.CONFIG: candidate.to_dict(),
    }
    if candidate.resolution is not None:
        attrs[Attr.RESOLUTION] = candidate.resolution
    if cka is not None:
        attrs[Attr.CKA] = round(cka, 6)
    return attrs


def is_repeat(trial: FrozenTrial) -> bool:
    """Whether a trial copies an earlier trial's result instead of evaluating."""
    return Attr.DUPLICATE_OF in trial.user_attrs


def evaluated_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials that evaluated a candidate (repeats answered from storage excluded)."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not is_repeat(t)
    ]


def budget_metrics(
    values: Mapping[str, Any], budget: DeviceBudget | None = None
) -> dict[str, float | None]:
    """The metrics budgets are checked against, from a result or user attributes.

    Args:
        values: A worker's result or a trial's user attributes.
        budget: The device they are checked for. When it has a latency table,
            ``latency_ms`` is the latency the table predicts for the candidate (named by
            ``values["config"]``; None without it) instead of the host's measurement.
    """
    out = {k: values.get(k) for k in BUDGET_METRICS}
    if budget is not None and budget.table is not None:
        out[Attr.LATENCY_MS] = device_latency(values, budget)
    return out


def device_latency(values: Mapping[str, Any], budget: DeviceBudget) -> float | None:
    """The latency checked against a device's ``max_latency_ms``.

    With a table: the prediction's ``latency_quantile`` (the median, i.e. the prediction,
    by default); else the host's measurement.

    Args:
        values: A result or user attributes with ``config`` (the candidate).
        budget: The device.
    """
    if budget.table is None:
        return values.get(Attr.LATENCY_MS)
    config = values.get(Attr.CONFIG)
    if config is None:
        return None
    candidate = Candidate.from_dict(config)
    if budget.latency_quantile is None:
        return budget.table.predict(candidate)
    return budget.table.quantile(candidate, budget.latency_quantile)


def device_latency_estimate(
    values: Mapping[str, Any], budget: DeviceBudget
) -> tuple[float | None, float | None]:
    """A device's latency and its standard deviation: the table's, else ``(host, None)``."""
    if budget.table is None:
        return values.get(Attr.LATENCY_MS), None
    config = values.get(Attr.CONFIG)
    if config is None:
        return None, None
    return budget.table.estimate(Candidate.from_dict(config))


def device_latency_text(values: Mapping[str, Any], budget: DeviceBudget) -> str:
    """A device's latency as people read it, with its source and interval.

    ``"2.39 ms ± 0.12 (table)"``; with a ``latency_quantile``, also the value checked:
    ``"2.39 ms ± 0.12 (table; q0.9 2.54 ms)"``; without a table ``"1.16 ms
    (host-measured)"``; ``"- (table)"`` when unknown.
    """
    value, std = device_latency_estimate(values, budget)
    if budget.table is None:
        return f"{value:.2f} ms ({HOST_MEASURED})" if value is not None else "- (host-measured)"
    if value is None:
        return "- (table)"
    source = "table"
    if budget.latency_quantile is not None:
        checked = device_latency(values, budget)
        source += f"; q{budget.latency_quantile:g} {checked:.2f} ms"
    return f"{value:.2f} ms ± {std:.2f} ({source})"
