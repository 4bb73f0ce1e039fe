"""The family rung: the promoted members trained jointly on Ray Train, then recorded.

After rung 1, :func:`run_family` chooses the members (:func:`search.strategy.family_members`),
fingerprints them with the settings, the data and the anchors, and trains them with a Ray
Train :class:`~ray.train.torch.TorchTrainer`: one worker on this machine, or data-parallel
workers (``family.workers``, a GPU each when the cluster has them) on the cluster the run
joined. Every epoch is checkpointed under ``--out/family/ray/family-<id>``, so a run stopped
by Ctrl-C, SIGKILL or a crash resumes from its last epoch when it is started again; a family
already trained and recorded is not trained again. The trained family is kept as
``--out/family/<id>/family.json`` (:func:`space.save_family`) and every member is recorded as
a trial of the ``<study>:family`` study.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.trial import FrozenTrial
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    RunConfig,
    ScalingConfig,
    TrainingFailedError,
)
from ray.train.torch import TorchTrainer
from ray.util.queue import Queue

from evaluators import FamilySettings, steps_per_epoch
from search.core import Attr, SearchSpace, candidate_of, evaluated_trials, rung_of
from search.execution.console import FamilyProgress, SignalGuard
from search.execution.contexts import family_settings, family_teacher, teacher_of, trial_context
from search.execution.driver import RunState, worker_share
from search.inputs import Plan
from search.strategy import (
    Recorder,
    best_of_rungs,
    family_members,
    family_trials,
    record_family,
    rung1_trials,
)
from search.workers.family import FAMILY_FILE, FamilyJob, FamilyMember, train_here, train_loop
from space import member_name

#: Where a run keeps its families, under ``--out``.
FAMILY_DIR = "family"


def family_path(out: Path, family_id: str) -> Path:
    """The trained family's JSON for a family id, under the run's output folder."""
    return out / FAMILY_DIR / family_id / "family.json"


def run_family(
    plan: Plan,
    study: optuna.Study,
    rung1: optuna.Study | None,
    family_study: optuna.Study,
    space: SearchSpace,
    *,
    state: RunState,
    guard: SignalGuard | None = None,
    log: Callable[..., Any] = print,
) -> RunState:
    """Trains the family of the study's best candidates and records its members.

    A family whose members are recorded already (same members, settings, data and anchors)
    is not trained again; one interrupted mid-training resumes from its last epoch.
    """
    spec = plan.study.family
    lower = best_of_rungs(evaluated_trials(study), rung1_trials(rung1) if rung1 else [])
    names = None if spec.members == "auto" else list(spec.members)
    members = family_members(lower, plan.budgets, max_members=spec.max_members, names=names)
    if not any(t.user_attrs.get(Attr.KIND) == "stitch" for t in members):
        log("family: no stitch among the evaluated candidates to train with the anchors; skipped")
        state.family_complete = True
        return state
    settings = family_settings(plan)
    teacher = family_teacher(plan, study)
    family_id = fingerprint(plan, members, settings, teacher)
    path = family_path(plan.out, family_id)
    state.family_id = family_id
    if len(family_trials(family_study, family_id)) >= len(members) and path.is_file():
        log(f"family {family_id}: {len(members)} members trained before; nothing to redo")
        state.family_complete = True
        return state
    cpus, use_gpu = worker_share(plan, state, guard)
    job = family_job(
        plan,
        study,
        members,
        settings=settings,
        teacher=teacher,
        refit_threads=cpus,
        train_threads=max(1, plan_cpus(plan) // spec.workers),
    )
    train = job.train_images or (plan.data.train.num_images if plan.data.train else 0)
    steps = steps_per_epoch(train, settings.batch_size)
    n_stitches = sum(t.user_attrs.get(Attr.KIND) == "stitch" for t in members)
    log(
        f"family {family_id}: training {len(members) - n_stitches} anchors and {n_stitches} "
        f"stitches jointly ({settings.epochs} epochs of {train} training images, {steps} steps "
        f"each; anchors {'trained' if settings.train_anchors else 'frozen'}; "
        f"{spec.workers} Ray Train worker(s){', GPU' if use_gpu else ''})"
    )
    t0 = time.perf_counter()
    try:
        metrics, checkpoint = _train(plan, job, family_id, cpus, use_gpu, settings, steps)
    except TrainingFailedError as e:
        log(
            f"family {family_id}: training failed ({_cause(e)}); the picks use the lower "
            f"rungs; run the same command again to resume from the last epoch: {plan.command}"
        )
        return state
    seconds = time.perf_counter() - t0
    _keep(checkpoint, path)
    resumed = int(metrics.get("resumed_from", 0))
    with guard.critical() if guard is not None else contextlib.nullcontext():
        _record(plan, family_study, space, members, metrics["members"], path, resumed, seconds)
    log(
        f"family {family_id}: trained in {seconds:.0f} s"
        + (f" (resumed after epoch {resumed})" if resumed else "")
        + f"; kept in {path.parent}"
    )
    state.family_complete = True
    return state


def _record(
    plan: Plan,
    family_study: optuna.Study,
    space: SearchSpace,
    members: list[FrozenTrial],
    measured: dict[str, dict[str, Any]],
    path: Path,
    resumed: int,
    seconds: float,
) -> None:
    """Records every trained member as a trial of the family study (its settings, losses)."""
    training = json.loads(path.read_text())["training"]
    settings = training["settings"]
    attrs = {
        Attr.FAMILY_ID: path.parent.name,
        Attr.FAMILY: settings,
        Attr.FAMILY_MEMBERS: [member_name(candidate_of(t)) for t in members],
        Attr.FAMILY_EPOCHS: settings["epochs"],
        Attr.FAMILY_RESUMED: resumed,
        Attr.FAMILY_SECONDS: round(seconds, 3),
        Attr.LOSS_CURVE: [round(h["loss"], 5) for h in training["history"]],
    }
    record_family(
        family_study,
        space,
        members,
        measured,
        recorder=Recorder(family_study, driver_id=plan.driver_id, budgets=plan.budgets, cka={}),
        objectives=plan.study.objectives,
        attrs=attrs,
        member_attrs=_member_attrs(training["history"]),
    )


def fingerprint(
    plan: Plan, members: list[FrozenTrial], settings: FamilySettings, teacher: str | None
) -> str:
    """A family's id: its members and their rungs, settings, teacher, data and anchors."""
    doc = {
        "members": [(t.user_attrs.get(Attr.KEY), rung_of(t), t.number) for t in members],
        "settings": settings.to_dict(),
        "train_images": plan.study.family.train_images,
        "workers": plan.study.family.workers,
        "teacher": teacher,
        "data": plan.data.identity,
        "anchors": {n: a.identity for n, a in plan.anchors.items()},
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def family_job(
    plan: Plan,
    study: optuna.Study,
    members: list[FrozenTrial],
    *,
    settings: FamilySettings,
    teacher: str | None,
    refit_threads: int,
    train_threads: int,
) -> FamilyJob:
    """What every Ray Train worker gets.

    Args:
        plan: The run's plan.
        study: The rung-0 study (rung 1's teacher is its most accurate anchor by default).
        members: The members' trials at their highest rung.
        settings: The family's settings.
        teacher: The anchor the family distils from.
        refit_threads: Torch threads the lower rungs evaluated with (a stitch is re-fitted
            with as many, so that its weights are the ones that were measured).
        train_threads: Torch threads per worker while training.
    """
    rung1 = any(rung_of(t) == 1 for t in members)
    context = trial_context(
        plan, threads=refit_threads, rung=1 if rung1 else 0, teacher=teacher_of(plan, study)
    )
    spec = plan.study.family
    return FamilyJob(
        context=context,
        members=[
            FamilyMember(
                candidate=candidate_of(t).to_dict(),
                rung=rung_of(t),
                metrics={k: t.user_attrs.get(k) for k in (Attr.MACS, Attr.PARAMS, Attr.LATENCY_MS)},
            )
            for t in members
        ],
        settings=settings.to_dict(),
        train=plan.data.train,
        train_images=spec.train_images,
        teacher=teacher,
        measure=plan.measure,
        threads=train_threads,
        test_env={k: v for k, v in os.environ.items() if k.startswith("STITCHSEARCH_TEST_")},
    )


def plan_cpus(plan: Plan) -> int:
    """The CPUs of the Ray cluster the run started or joined."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _train(
    plan: Plan,
    job: FamilyJob,
    family_id: str,
    cpus: int,
    use_gpu: bool,
    settings: FamilySettings,
    steps: int,
) -> tuple[dict[str, Any], Any]:
    """Runs the TorchTrainer with a progress bar; returns the last metrics and checkpoint."""
    spec = plan.study.family
    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    job.progress = queue
    progress = FamilyProgress(settings.epochs, steps)
    done = threading.Event()
    reader = threading.Thread(target=progress.follow, args=(queue, done), daemon=True)
    reader.start()
    resources: dict[str, float] = {"CPU": float(job.threads)}
    if use_gpu:
        resources["GPU"] = 1.0
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=spec.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"family-{family_id}",
            storage_path=str((plan.out / FAMILY_DIR / "ray").resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=plan.study.max_retries),
        ),
    )
    try:
        result = trainer.fit()
    finally:
        done.set()
        reader.join(timeout=5)
        progress.close()
    return dict(result.metrics or {}), result.checkpoint


def _cause(error: TrainingFailedError) -> str:
    """A failed training's cause on one line: the first worker's error, else the message."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = next(iter(failures.values()), None) or getattr(error, "controller_failure", None)
    text = f"{type(cause).__name__}: {cause}" if cause is not None else str(error)
    return " ".join(text.split())[:300]


def _keep(checkpoint: Any, path: Path) -> None:
    """Copies the trained family out of the final checkpoint to ``path`` (whole or nothing)."""
    staging = path.parent.with_name(path.parent.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    with checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / Path(FAMILY_FILE).parent, staging)
    shutil.rmtree(path.parent, ignore_errors=True)
    staging.rename(path.parent)


def _member_attrs(history: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per member: its mean loss in the last epoch and its steps over all epochs."""
    steps: dict[str, int] = {}
    for h in history:
        for name, n in h["member_steps"].items():
            steps[name] = steps.get(name, 0) + int(n)
    last = history[-1]["member_loss"] if history else {}
    return {
        name: {
            Attr.MEMBER_LOSS: round(float(last[name]), 5) if name in last else None,
            Attr.MEMBER_STEPS: n,
        }
        for name, n in steps.items()
    }


def train_family_here(
    plan: Plan,
    study: optuna.Study,
    members: list[FrozenTrial],
    settings: FamilySettings,
    *,
    teacher: str | None,
    threads: int,
    on_epoch: Callable[[Any], None] | None = None,
) -> tuple[Any, dict[str, dict[str, Any]], float]:
    """Trains a family in this process, as one Ray Train worker would (benchmarks, tests).

    Returns:
        The trained :class:`space.StitchedFamily`, every member's validation measurement and
        the seconds it took (building the family included).
    """
    job = family_job(
        plan,
        study,
        members,
        settings=settings,
        teacher=teacher,
        refit_threads=max(1, threads // plan.workers),
        train_threads=threads,
    )
    t0 = time.perf_counter()
    family, measured = train_here(job, on_epoch=on_epoch)
    return family, measured, time.perf_counter() - t0
