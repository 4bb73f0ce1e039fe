"""Trial contexts: what every evaluation of a run shares, built from the plan.

The one place the study's evaluation settings are unpacked into a
:class:`~search.workers.evaluation.TrialContext`; the workers (rung 0 and rung 1) and the
re-measurement of each device's pick all evaluate through it.
"""

from __future__ import annotations

import dataclasses

import optuna

from evaluators import DataSplits, FamilySettings, FinetuneSettings
from search.core import Attr, candidate_of, evaluated_trials
from search.inputs import Plan
from search.workers.evaluation import TrialContext


def trial_context(
    plan: Plan,
    *,
    threads: int,
    use_gpu: bool = False,
    rung: int = 0,
    teacher: str | None = None,
    family: str | None = None,
) -> TrialContext:
    """What every evaluation of this run shares: data, fitting and latency settings.

    Args:
        plan: The run's plan.
        threads: Torch threads per evaluation.
        use_gpu: Evaluate on the GPU when there is one.
        rung: The highest rung evaluated with it; rung 1 ships the training images.
        teacher: The anchor rung 1 distils from (when ``finetune.distill > 0``).
        family: The trained family's JSON, whose members rung 2 evaluates.
    """
    ft = plan.study.finetune
    return TrialContext(
        anchors=dict(plan.anchor_kwargs),
        data=trial_data(plan, train=rung >= 1),
        fit_steps=plan.study.fit.steps,
        fit_lr=plan.study.fit.lr,
        latency_batch=plan.study.latency_batch,
        threads=threads,
        use_gpu=use_gpu,
        finetune=finetune_settings(plan) if ft.enabled and rung >= 1 else None,
        teacher=teacher,
        family=family,
        macs_allow=tuple(plan.study.macs.allow_unsupported),
    )


def finetune_settings(plan: Plan) -> FinetuneSettings:
    """Rung 1's fine-tuning settings, from the study's ``finetune`` section."""
    ft = plan.study.finetune
    return FinetuneSettings(
        steps=ft.steps,
        batch_size=ft.batch_size,
        lr=ft.lr,
        weight_decay=ft.weight_decay,
        schedule=ft.schedule,
        warmup=ft.warmup,
        distill=ft.distill,
        temperature=ft.temperature,
        seed=ft.seed,
    )


def trial_data(plan: Plan, *, train: bool = True) -> DataSplits:
    """The data splits trials use.

    Calibration is cut to the fitting size. The training split (its first
    ``finetune.train_images`` images) is kept when the study fine-tunes and ``train``
    (rung 1), else dropped: the splits are shipped to every worker.
    """
    ft = plan.study.finetune
    split = plan.data.train if train and ft.enabled else None
    if split is not None and split.num_images > ft.train_images:
        split = split.subset(ft.train_images)
    return dataclasses.replace(
        plan.data,
        calibration=plan.data.calibration.subset(plan.study.data.calibration),
        train=split,
    )


def teacher_of(plan: Plan, study: optuna.Study) -> str | None:
    """The anchor rung 1 distils from: the study's, else the most accurate at rung 0.

    A label-free study distils from its teacher (the anchor its agreement is measured
    with). None when rung 1 does not distil.
    """
    if plan.study.label_free:
        return plan.study.teacher
    ft = plan.study.finetune
    if ft.distill <= 0:
        return None
    if ft.teacher is not None:
        return ft.teacher
    return _most_accurate_anchor(plan, study)


def _most_accurate_anchor(plan: Plan, study: optuna.Study) -> str:
    """The anchor with the best rung-0 accuracy (the deepest before any is evaluated)."""
    anchors = [t for t in evaluated_trials(study) if t.user_attrs.get(Attr.KIND) == "anchor"]
    if not anchors:
        return max(plan.anchors, key=lambda n: plan.anchors[n].num_blocks)
    best = max(anchors, key=lambda t: t.user_attrs.get(Attr.VAL_ACC, -1.0))
    return candidate_of(best).front


def family_settings(plan: Plan) -> FamilySettings:
    """The family's training settings, from the study's ``family`` section."""
    f = plan.study.family
    return FamilySettings(
        epochs=f.epochs,
        batch_size=f.batch_size,
        lr=f.lr,
        anchor_lr=f.anchor_lr if f.anchors == "trainable" else None,
        weight_decay=f.weight_decay,
        warmup=f.warmup,
        sampling=f.sampling,
        anchor_share=f.anchor_share,
        distill=f.distill,
        temperature=f.temperature,
        freeze_bn=f.freeze_bn,
        seed=f.seed,
    )


def family_teacher(plan: Plan, study: optuna.Study) -> str | None:
    """The anchor the family distils from (None when it does not distil).

    A label-free study's teacher; else ``family.teacher``, ``finetune.teacher``, or the most
    accurate anchor at rung 0.
    """
    f = plan.study.family
    if plan.study.label_free:
        return plan.study.teacher
    if f.distill <= 0:
        return None
    if f.teacher is not None:
        return f.teacher
    if plan.study.finetune.teacher is not None:
        return plan.study.finetune.teacher
    return _most_accurate_anchor(plan, study)
