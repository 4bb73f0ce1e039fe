"""The sections of a study definition, validated with pydantic.

Anchors, data, CKA, pruning, fitting and rung 1; :class:`search.inputs.study.Study`
assembles them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from space import anchor_id_problem


class StrictModel(BaseModel):
    """A study section: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AnchorSpec(StrictModel):
    """One anchor of the study.

    Attributes:
        name: A zoo name (``zoo:resnet-s``) or a timm model name.
        id: What the study calls the anchor: in the search space, candidate keys, labels,
            caches, latency tables, exports and the report (default: ``name``). Two
            checkpoints of one architecture need ids of their own (``resnet50-moco``).
        checkpoint: Local ``.safetensors``/``.pth`` weights (relative to the study file).
        pretrained: Use timm's pretrained weights (needs the model hub).
        timm_kwargs: Passed to ``timm.create_model``.
        input_size: ``[C, H, W]`` the anchor runs at, if not the model's default.
    """

    name: str = Field(min_length=1)
    id: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None

    @field_validator("id")
    @classmethod
    def _valid_id(cls, value: str | None) -> str | None:
        if value is not None and (problem := anchor_id_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @property
    def anchor_id(self) -> str:
        """The anchor's id: ``id``, else ``name``."""
        return self.id or self.name

    @model_validator(mode="after")
    def _check(self) -> AnchorSpec:
        if self.name.startswith("zoo:") and (
            self.checkpoint or self.pretrained or self.timm_kwargs or self.input_size
        ):
            raise ValueError(f"zoo anchor {self.name!r} takes no checkpoint/pretrained/kwargs")
        if self.checkpoint and self.pretrained:
            raise ValueError("give either checkpoint or pretrained: true, not both")
        return self

    def load_kwargs(self, base: Path | None = None) -> dict[str, Any]:
        """Keyword arguments for :func:`space.load_anchor` (checkpoint resolved from ``base``).

        ``anchor_id`` is among them when the anchor has an id other than its name.

        A relative checkpoint becomes an absolute path (``base / checkpoint``): the workers
        that rebuild the anchor from these arguments run in another working directory.
        """
        kw: dict[str, Any] = dict(self.timm_kwargs)
        if self.id is not None and self.id != self.name:
            kw["anchor_id"] = self.id
        if self.checkpoint:
            path = Path(self.checkpoint).expanduser()
            if not path.is_absolute() and base is not None:
                path = Path(os.path.abspath(base / path))
            kw["checkpoint"] = str(path)
        if self.pretrained:
            kw["pretrained"] = True
        if self.input_size:
            kw["input_size"] = tuple(self.input_size)
        return kw


class DataSpec(StrictModel):
    """Dataset and split sizes.

    Attributes:
        dataset: ``fashion-mnist``, ``imagefolder``, ``synthetic`` (tests) or ``images`` (a
            folder of unlabelled images: a label-free study, which optimises ``agreement``
            with ``teacher``).
        root: Data directory (Fashion-MNIST IDX files, an ImageFolder tree, or the folder of
            images).
        calibration: Images for least-squares stitch fitting.
        validation: Images the search optimises (carved from the training split).
        test: Test images for the final report of the chosen networks (default: all).
        batch_size: Evaluation batch size.
        teacher: ``images`` only: the anchor whose top-1 predictions the study agrees with and
            rung 1 distils from (default: ``finetune.teacher``, else the anchor with the most
            MACs).
    """

    dataset: Literal["fashion-mnist", "imagefolder", "synthetic", "images"] = "fashion-mnist"
    root: str | None = None
    calibration: int = Field(default=256, ge=1)
    validation: int = Field(default=2000, ge=1)
    test: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=500, ge=1)
    teacher: str | None = Field(default=None, min_length=1)


class CkaSpec(StrictModel):
    """The CKA pruning rule.

    Attributes:
        images: Images for the CKA matrices (one matrix per ordered anchor pair).
        threshold: Prune stitch points whose CKA is below this (0 disables).
        top_k: Keep only the ``top_k`` back cuts with the highest CKA per front cut
            (``null`` disables).
    """

    images: int = Field(default=512, ge=2)
    threshold: float = Field(default=0.0, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)


class PruningSpec(StrictModel):
    """The pruning rule: which stitch points a stitch-point signal removes before the search.

    Attributes:
        signal: ``kl`` (default: KL divergence of the least-squares stitched network's outputs
            from the back anchor's on calibration images), ``residual`` (the least-squares
            fit's relative residual) or ``cka`` (see :mod:`evaluators.signals`).
        images: Calibration images for the signal (default: ``data.calibration``, the
            images a rung-0 trial fits on; ``cka`` uses ``cka.images``).
        depth: Keep the first ``depth`` Pareto layers of (signal, MACs) within each ordered
            anchor pair (null: off).
        threshold: Prune stitch points whose signal is worse than this (below it for
            ``cka``, above it for ``residual`` and ``kl``; null: off).
        top_k: Keep only the ``top_k`` back cuts with the best signal per front cut (null:
            off).
    """

    signal: Literal["kl", "residual", "cka"] = "kl"
    images: int | None = Field(default=None, ge=4)
    depth: int | None = Field(default=3, ge=1)
    threshold: float | None = Field(default=None, ge=0.0)
    top_k: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> PruningSpec:
        if self.signal == "cka" and self.threshold is not None and self.threshold > 1:
            raise ValueError(f"a CKA threshold lies in [0, 1], got {self.threshold}")
        return self


class MacsSpec(StrictModel):
    """How MACs are counted.

    Attributes:
        allow_unsupported: Operators fvcore has no handle for that may count as zero MACs
            (``aten::linalg_vector_norm``); any other such operator fails the count (see
            :mod:`evaluators.macs`). Trials record the allowed ones they met.
    """

    allow_unsupported: list[Annotated[str, Field(strict=True)]] = Field(default_factory=list)

    @field_validator("allow_unsupported")
    @classmethod
    def _operator_names(cls, value: list[str]) -> list[str]:
        for i, op in enumerate(value):
            if not re.fullmatch(r"[A-Za-z_][\w.]*::[\w.]+", op):
                raise ValueError(
                    f"item {i} {op!r} is not an operator name; give TorchScript names such "
                    "as aten::linalg_vector_norm"
                )
        twice = sorted({op for op in value if value.count(op) > 1})
        if twice:
            raise ValueError(f"lists {twice} twice; give each operator once")
        return value


class FitSpec(StrictModel):
    """Stitching-layer fitting.

    Attributes:
        steps: Fine-tuning steps of the stitching layer after least squares (0: none).
        lr: Fine-tuning learning rate.
    """

    steps: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-3, gt=0)


class PromoteSpec(StrictModel):
    """Which rung-0 candidates are promoted to rung 1 (stitch-only fine-tuning).

    Attributes:
        per_device: The best feasible rung-0 stitches per device (by validation accuracy).
        front: Also promote the stitches on the rung-0 Pareto front (accuracy vs MACs).
    """

    per_device: int = Field(default=3, ge=0)
    front: bool = True


class FinetuneSpec(StrictModel):
    """Rung 1: fine-tune the stitching layer alone on training images.

    Attributes:
        enabled: Run rung 1 after the rung-0 search.
        train_images: Training images (disjoint from validation and test).
        steps: Optimiser steps.
        batch_size: Images per step.
        lr: Peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        schedule: ``onecycle``, ``cosine`` or ``constant``.
        warmup: Share of the steps spent warming up (``onecycle``).
        distill: Weight of distillation from the teacher's logits (0: labels only).
        teacher: The anchor distilled from (default: the rung-0 most accurate anchor).
        temperature: Distillation temperature.
        seed: Seed of the batch order.
        promote: The promotion rule.
        max_trials: Rung-1 evaluations the study holds at most (the rung-1 budget).
        max_seconds: Stop promoting after this many seconds of rung 1 in one run (null:
            no limit).
    """

    enabled: bool = False
    train_images: int = Field(default=20000, ge=1)
    steps: int = Field(default=78, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-2, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup: float = Field(default=0.3, gt=0, lt=1)
    distill: float = Field(default=0.0, ge=0, le=1)
    teacher: str | None = None
    temperature: float = Field(default=2.0, gt=0)
    seed: int = 0
    promote: PromoteSpec = Field(default_factory=PromoteSpec)
    max_trials: int = Field(default=16, ge=1)
    max_seconds: float | None = Field(default=None, gt=0)


class FamilySpec(StrictModel):
    """The family: anchors and promoted stitches trained jointly (SN-Net), the last rung.

    The defaults were chosen on the default study (BENCHMARKS.md, the family section).

    Attributes:
        enabled: Train the family after rung 1.
        members: ``auto`` (each device's best candidate, the stitches on the Pareto front
            of the candidates at their highest rung, then the devices' next best, with the
            anchors they use), or a list of candidate labels
            (``"zoo:resnet-l[:5] -> zoo:resnet-s[3:]"``, or an anchor's name).
        max_members: The most members (anchors included).
        epochs: Passes over the training images.
        train_images: Training images (the first of the training split; null: all of it).
        batch_size: Images per step (over all workers).
        lr: Peak learning rate of the stitching layers (AdamW, one-cycle).
        anchors: ``trainable`` (SN-Net) or ``frozen`` (only the stitching layers train).
        anchor_lr: Peak learning rate of the anchors when they train.
        weight_decay: AdamW weight decay.
        warmup: Share of the steps spent warming up.
        sampling: ``uniform`` (every member alike) or ``macs`` (SN-Netv2: by groups of MACs).
        anchor_share: Share of the steps that train a bare anchor (null: as any member).
        distill: Weight of distillation from the teacher (label-free studies: 1).
        temperature: Distillation temperature.
        teacher: The anchor distilled from (default: a label-free study's teacher, else
            ``finetune.teacher``, else the most accurate anchor at rung 0).
        freeze_bn: Keep BatchNorm statistics frozen while training.
        seed: Seed of the batch order and of the member sampling.
        workers: Ray Train workers (data-parallel; each gets a GPU when the cluster has them).
    """

    enabled: bool = False
    members: Literal["auto"] | list[Annotated[str, Field(min_length=1)]] = "auto"
    max_members: int = Field(default=10, ge=1, le=1000)
    epochs: int = Field(default=5, ge=1, le=10_000)
    train_images: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    lr: float = Field(default=1e-3, gt=0, le=1)
    anchors: Literal["trainable", "frozen"] = "trainable"
    anchor_lr: float = Field(default=1e-3, gt=0, le=1)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup: float = Field(default=0.3, gt=0, lt=1)
    sampling: Literal["uniform", "macs"] = "uniform"
    anchor_share: float | None = Field(default=None, ge=0, le=1)
    distill: float = Field(default=0.5, ge=0, le=1)
    temperature: float = Field(default=1.0, gt=0, le=100)
    teacher: str | None = Field(default=None, min_length=1)
    freeze_bn: bool = True
    seed: int = Field(default=0, ge=0)
    workers: int = Field(default=1, ge=1, le=1024)

    @field_validator("members")
    @classmethod
    def _distinct_members(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("lists no member; give candidate labels, or use auto")
            twice = sorted({m for m in value if value.count(m) > 1})
            if twice:
                raise ValueError(f"lists {twice} twice; give each member once")
        return value
