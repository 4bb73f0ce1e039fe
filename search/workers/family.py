"""The family's training loop, run by every Ray Train worker (:func:`train_loop`).

The driver hands each worker a :class:`FamilyJob`: how to rebuild the anchors, the data,
the members with the rung each was best at, and the settings. A worker builds the family
(every stitching layer re-fitted as its lower rung fitted it: least squares, then rung 1's
fine-tuning for the stitches that reached it, on the rung's own thread count so that the
weights are the ones that were measured), or restores it from the latest checkpoint, and
trains epoch by epoch (:class:`evaluators.FamilyTrainer`). After every epoch the first
worker writes a checkpoint: the weights and the trainer's state; after the last one it also
measures every member on the validation images and saves the trained family
(:func:`space.save_family`) inside the checkpoint, where the driver picks it up. With several
workers the family is wrapped for data-parallel training (every worker samples the same
member at each step and trains on its share of the batch).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch

from evaluators import ArrayLoader, FamilySettings, FamilyTrainer, accuracy
from search.workers.evaluation import TrialContext, anchors_from_specs
from space import Anchor, Candidate, StitchedFamily, build_stitched, member_name, save_family

#: The checkpoint's files: the weights and trainer state, and (last epoch) the family.
STATE_FILE = "state.pt"
FAMILY_FILE = "family/family.json"
#: Test-only fault injection (see :class:`FamilyJob`); never set it in production.
FAULT_ENV = "STITCHSEARCH_TEST_FAMILY_FAULT"
#: Progress reports from the first worker: one every this many steps.
PROGRESS_EVERY = 10


@dataclass
class FamilyMember:
    """One member as the driver chose it.

    Attributes:
        candidate: The candidate (JSON form).
        rung: The rung its stitching layer is re-fitted at (0 or 1; anchors: 0).
        metrics: What the lower rungs measured (``macs``, ``params``, ``latency_ms``, ...).
    """

    candidate: dict[str, Any]
    rung: int
    metrics: dict[str, Any]

    @property
    def name(self) -> str:
        """The member's name (an anchor's name, or a stitch's label)."""
        return member_name(Candidate.from_dict(self.candidate))


@dataclass
class FamilyJob:
    """What every worker of a family's training needs.

    Attributes:
        context: What the lower rungs evaluated with (anchors' load arguments, calibration,
            validation and rung 1's training images, thread count, rung 1's settings and
            teacher): the stitches are re-fitted with it.
        members: The members, anchors first.
        settings: :class:`evaluators.FamilySettings` as a dict.
        train: The family's training images (disjoint from validation and test).
        train_images: How many of them to train on (the first; None: all).
        teacher: The anchor distilled from (a frozen copy of it as loaded), or None.
        measure: What the members' accuracy measures (``accuracy`` or ``agreement with ...``).
        threads: Torch threads per worker while training.
        progress: A queue (:class:`ray.util.queue.Queue`) the first worker reports
            ``(epoch, step, loss)`` to, or None.
        test_env: The driver's ``STITCHSEARCH_TEST_*`` variables (test-only fault
            injection: ``STITCHSEARCH_TEST_FAMILY_FAULT=raise`` fails every worker).
    """

    context: TrialContext
    members: list[FamilyMember]
    settings: dict[str, Any]
    train: ArrayLoader | None
    train_images: int | None
    teacher: str | None
    measure: str
    threads: int
    progress: Any = None
    test_env: dict[str, str] = field(default_factory=dict)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: builds or restores the family, trains it.

    Args:
        config: ``{"job": FamilyJob}``.
    """
    job: FamilyJob = config["job"]
    if job.test_env.get(FAULT_ENV) == "raise":
        raise RuntimeError(f"injected test fault ({FAULT_ENV}=raise)")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    family, trainer = build_trainer(job, device, rank=rank, world=world, fitted=not checkpoint)
    resumed = _restore(checkpoint, family, trainer) if checkpoint else 0
    epochs = trainer.settings.epochs
    while trainer.epochs_done < epochs:
        epoch = trainer.epochs_done
        result = trainer.train_epoch(on_step=_progress(job, rank, epoch, trainer.steps))
        last = trainer.epochs_done == epochs
        metrics = {"epoch": epoch, "loss": result.loss, "resumed_from": resumed, "final": last}
        _report(family, trainer, job, rank, metrics, last, device)
    if resumed == epochs:  # a finished run restarted: report its family again
        _report(family, trainer, job, rank, {"resumed_from": resumed, "final": True}, True, device)


def build_trainer(
    job: FamilyJob, device: Any, *, rank: int = 0, world: int = 1, fitted: bool = True
) -> tuple[StitchedFamily, FamilyTrainer]:
    """The family and its trainer, data-parallel over ``world`` workers.

    The stitches are re-fitted at their lower rungs (``fitted``), or left unfitted for a
    checkpoint's weights to fill.
    """
    settings = FamilySettings.from_dict(job.settings)
    anchors = anchors_from_specs(job.context.anchors)
    teacher = _teacher(anchors, job.teacher)
    family = _fitted_family(anchors, job, device) if fitted else _empty_family(anchors, job)
    torch.set_num_threads(max(1, job.threads))
    module = family
    if world > 1:
        module = ray.train.torch.prepare_model(
            family, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
    train = job.train
    if train is None:
        raise ValueError("the family needs training images, and the data has none")
    if job.train_images is not None and job.train_images < train.num_images:
        train = train.subset(job.train_images)
    trainer = FamilyTrainer(
        family,
        train,
        settings,
        macs={m.name: float(m.metrics.get("macs") or 1.0) for m in job.members},
        teacher=teacher,
        device=device,
        rank=rank,
        world=world,
        module=module,
    )
    return family, trainer


def train_here(
    job: FamilyJob, device: Any = "cpu", on_epoch: Any = None
) -> tuple[StitchedFamily, dict[str, dict[str, Any]]]:
    """Trains a family in this process (no Ray): for benchmarks and tests.

    Returns:
        The trained family, and every member's validation measurement
        (:func:`measure_members`).
    """
    family, trainer = build_trainer(job, device)
    while trainer.epochs_done < trainer.settings.epochs:
        result = trainer.train_epoch()
        if on_epoch is not None:
            on_epoch(result)
    return family, measure_members(family, job, device)


def _teacher(anchors: dict[str, Anchor], name: str | None) -> torch.nn.Module | None:
    """A frozen copy of the teacher anchor, as loaded (before any training)."""
    if name is None:
        return None
    copy_ = copy.deepcopy(anchors[name])
    return StitchedFamily({name: copy_}, {name: Candidate.anchor(name)}, {}).member_module(name)


def _empty_family(anchors: dict[str, Anchor], job: FamilyJob) -> StitchedFamily:
    """The family's modules, unfitted (a checkpoint's weights go into them)."""
    members: dict[str, Candidate] = {}
    stitches = {}
    for m in job.members:
        c = Candidate.from_dict(m.candidate)
        members[m.name] = c
        if not c.is_anchor:
            config = c.config
            assert not isinstance(config, str)
            stitches[m.name] = build_stitched(anchors[c.front], anchors[c.back], config).stitch
    return StitchedFamily(anchors, members, stitches)


def _fitted_family(anchors: dict[str, Anchor], job: FamilyJob, device: Any) -> StitchedFamily:
    """The family with every stitch re-fitted at its lower rung (see the module docstring)."""
    members: dict[str, Candidate] = {}
    stitches = {}
    context = job.context
    for m in job.members:
        c = Candidate.from_dict(m.candidate)
        members[m.name] = c
        if c.is_anchor:
            continue
        result = context.evaluate(
            c, anchors, device=str(device), measure_latency=False, rung=m.rung
        )
        stitches[m.name] = result.net.stitch
        m.metrics.setdefault("refit_val_acc", result.val_acc)
    return StitchedFamily(anchors, members, stitches)


def _restore(checkpoint: Any, family: StitchedFamily, trainer: FamilyTrainer) -> int:
    """Loads a checkpoint's weights and trainer state; returns the epochs it had done."""
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)
    family.load_state_dict(state["family"])
    trainer.load_state_dict(state["trainer"])
    return trainer.epochs_done


def _progress(job: FamilyJob, rank: int, epoch: int, steps: int) -> Any:
    if rank != 0 or job.progress is None:
        return None

    def report(step: int, loss: float) -> None:
        if step % PROGRESS_EVERY == 0 or step == steps - 1:
            try:
                job.progress.put_nowait((epoch, step, loss))
            except Exception:  # a full or closed queue only costs progress lines
                return

    return report


def _report(
    family: StitchedFamily,
    trainer: FamilyTrainer,
    job: FamilyJob,
    rank: int,
    metrics: dict[str, Any],
    last: bool,
    device: Any,
) -> None:
    """Reports an epoch; the first worker writes the checkpoint (and, last, the family)."""
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        state = {"family": family.state_dict(), "trainer": trainer.state_dict()}
        torch.save(state, os.path.join(folder, STATE_FILE))
        if last:
            metrics["members"] = measure_members(family, job, device)
            save_family(
                family,
                Path(folder) / FAMILY_FILE,
                trained=trainer.settings.train_anchors,
                measure=job.measure,
                training={
                    "settings": trainer.settings.to_dict(),
                    "history": [h.to_dict() for h in trainer.history],
                    "train_images": trainer.train.num_images,
                    "steps_per_epoch": trainer.steps,
                },
            )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def measure_members(
    family: StitchedFamily, job: FamilyJob, device: Any
) -> dict[str, dict[str, Any]]:
    """Every member's validation accuracy, recorded in the family with its costs."""
    out = {}
    for m in job.members:
        acc = accuracy(family.member_module(m.name), job.context.data.validation, device=device)
        family.metrics[m.name] = {
            **{k: v for k, v in m.metrics.items() if k in ("macs", "params", "latency_ms")},
            "accuracy": acc.top1,
            "val_top5": acc.top5,
        }
        out[m.name] = dict(family.metrics[m.name])
    family.to("cpu")
    return out
