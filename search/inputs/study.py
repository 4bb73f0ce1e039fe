"""Study definitions: YAML files under ``studies/``, validated with pydantic.

Every field is optional except ``anchors``; see ``studies/default.yaml`` for a documented
example. Errors name the file and the field (``cka.threshold``), echo the bad value and say
what is expected.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from search.core import OBJECTIVES, PruningRule
from search.inputs.sections import (
    AnchorSpec,
    CkaSpec,
    DataSpec,
    FamilySpec,
    FinetuneSpec,
    FitSpec,
    MacsSpec,
    PruningSpec,
    StrictModel,
)
from space import InputError

_OBJECTIVE_ALIASES = {"latency": "latency_ms", "acc": "accuracy", "val_acc": "accuracy"}
#: The objectives that measure how good a candidate is: accuracy (labelled data) or agreement
#: with the teacher (a label-free study, ``data.dataset: images``).
QUALITY_OBJECTIVES = ("accuracy", "agreement")


class StudyError(InputError):
    """A study definition is invalid; the message is one line naming file and field."""


class Study(StrictModel):
    """A study definition.

    Attributes:
        name: Study name in the storage.
        anchors: Two or more anchors (strings or mappings).
        data: Dataset and split sizes.
        objectives: ``accuracy`` (maximised; ``agreement`` with the teacher in a label-free
            study, the default there) and ``macs`` (minimised) at least; ``params`` and
            ``latency_ms`` optional.
        trials: Candidates to evaluate (pruned and repeated configurations are recorded but
            don't count).
        workers: Concurrent Ray trials.
        sampler: ``tpe`` (default), ``nsga2`` or ``random``.
        seed: Seed of the sampler.
        self_stitch: Reserved: stitching an anchor to itself is not searched yet, so only
            ``false`` is accepted (``space.build_stitched`` builds such networks directly).
        cka: CKA matrices (recorded on every stitch trial); its ``threshold`` and ``top_k``
            are the old form of a CKA pruning rule, still read when ``pruning`` is absent.
        pruning: The pruning rule (default: ``kl`` signal, ``depth`` 3).
        fit: Stitch fitting settings (rung 0).
        finetune: Rung 1: stitch-only fine-tuning of promoted candidates.
        family: The family: anchors and promoted stitches trained jointly (the last rung).
        macs: How MACs are counted: operators fvcore cannot count that may count as zero.
        latency_batch: Batch size for the latency measurement (latency at batch 1 is
            always measured).
        trial_timeout_s: Seconds after which a trial is stopped and recorded as failed.
        max_retries: Retries of a trial whose worker process died.
        resolutions: Input sizes in pixels (square images) to search: each candidate runs
            at one of them, both anchors on the same images resized to it. ``None`` (the
            default): every candidate runs at its front anchor's native size.
        cuts: Which stitch points each ordered pair holds: ``all`` (default, every
            ``(k, j)``) or ``stages`` (stage boundaries only, front cut after stage ``s``
            and back cut after the same stage ``s``: :func:`space.stage_stitch_points`;
            needs anchors with stages, the same number of them).
    """

    name: str = Field(default="default", min_length=1, max_length=200)
    anchors: list[AnchorSpec] = Field(min_length=2)
    data: DataSpec = Field(default_factory=DataSpec)
    objectives: list[str] = Field(default_factory=lambda: ["accuracy", "macs"])
    trials: int = Field(default=60, ge=1)
    workers: int = Field(default=2, ge=1)
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seed: int = 0
    self_stitch: bool = False
    cka: CkaSpec = Field(default_factory=CkaSpec)
    pruning: PruningSpec = Field(default_factory=PruningSpec)
    fit: FitSpec = Field(default_factory=FitSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    family: FamilySpec = Field(default_factory=FamilySpec)
    macs: MacsSpec = Field(default_factory=MacsSpec)
    latency_batch: int = Field(default=1, ge=1)
    trial_timeout_s: float = Field(default=600.0, gt=0)
    max_retries: int = Field(default=1, ge=0)
    resolutions: list[Annotated[int, Field(strict=True, gt=0)]] | None = Field(
        default=None, min_length=1
    )
    cuts: Literal["all", "stages"] = "all"

    @model_validator(mode="before")
    @classmethod
    def _label_free_defaults(cls, value: Any) -> Any:
        """A label-free study optimises agreement; rung 1 and the family distil only."""
        if not isinstance(value, dict):
            return value
        data = value.get("data")
        if not isinstance(data, dict) or data.get("dataset") != "images":
            return value
        value = dict(value)
        value.setdefault("objectives", ["agreement", "macs"])
        finetune = value.get("finetune")
        if finetune is None or isinstance(finetune, dict):
            value["finetune"] = {"distill": 1.0, **(finetune or {})}
        family = value.get("family")
        if family is None or isinstance(family, dict):
            value["family"] = {"distill": 1.0, **(family or {})}
        return value

    @field_validator("self_stitch")
    @classmethod
    def _no_self_stitch(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "stitching an anchor to itself is not searched yet; remove self_stitch (or "
                "set it to false)"
            )
        return value

    @field_validator("anchors", mode="before")
    @classmethod
    def _anchor_strings(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("resolutions")
    @classmethod
    def _distinct_resolutions(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            twice = sorted({r for r in value if value.count(r) > 1})
            if twice:
                raise ValueError(f"lists {twice} twice; give each input size once")
        return value

    @field_validator("objectives", mode="before")
    @classmethod
    def _objectives(cls, value: Any) -> Any:
        if not isinstance(value, list):
            raise ValueError("must be a list such as [accuracy, macs]")
        out = []
        for v in value:
            v = _OBJECTIVE_ALIASES.get(v, v) if isinstance(v, str) else v
            if v not in OBJECTIVES:
                raise ValueError(f"unknown objective {v!r}; choose from {sorted(OBJECTIVES)}")
            if v in out:
                raise ValueError(f"objective {v!r} is listed twice")
            out.append(v)
        quality = [o for o in out if o in QUALITY_OBJECTIVES]
        if len(quality) != 1 or "macs" not in out:
            raise ValueError(
                "must include macs and one of accuracy (labelled data) or agreement (a "
                "label-free study, data.dataset: images)"
            )
        return out

    @model_validator(mode="after")
    def _unique_anchors(self) -> Study:
        self._check_ids()
        names = self.anchor_ids
        if "pruning" in self.model_fields_set and (
            self.cka.threshold > 0 or self.cka.top_k is not None
        ):
            raise ValueError(
                "give the pruning rule in 'pruning' only: cka.threshold and cka.top_k are its "
                "old form (use pruning: {signal: cka, threshold: ..., top_k: ...})"
            )
        teacher = self.finetune.teacher
        if teacher is not None and teacher not in names:
            raise ValueError(
                f"finetune.teacher {teacher!r} is not one of the study's anchors {names}"
            )
        self._check_label_free(names)
        self._check_family(names)
        return self

    def _check_ids(self) -> None:
        """Every anchor has an id of its own (its ``id``, else its ``name``)."""
        first: dict[str, int] = {}
        for j, spec in enumerate(self.anchors):
            i = first.setdefault(spec.anchor_id, j)
            if i == j:
                continue
            if spec.id is None and self.anchors[i].id is None:
                raise ValueError(
                    f"anchors[{j}].name {spec.name!r} is listed twice (anchors[{i}] too); to "
                    "stitch two checkpoints of one architecture, give each an id of its own: "
                    f"{{id: {spec.name}-b, name: {spec.name}, checkpoint: ...}}"
                )
            field = "id" if spec.id is not None else "name"
            raise ValueError(
                f"anchors[{j}].{field} {spec.anchor_id!r} is the id of anchors[{i}] too; give "
                f"each anchor an id of its own (e.g. id: {spec.anchor_id}-b)"
            )

    @property
    def anchor_ids(self) -> list[str]:
        """The anchors' ids (each ``id``, else its ``name``), in the study's order."""
        return [a.anchor_id for a in self.anchors]

    def _check_family(self, names: list[str]) -> None:
        """The family's teacher is an anchor; the family runs at the anchors' native sizes."""
        family = self.family
        if family.teacher is not None and family.teacher not in names:
            raise ValueError(
                f"family.teacher {family.teacher!r} is not one of the study's anchors {names}"
            )
        if family.enabled and self.resolutions is not None:
            raise ValueError(
                "family.enabled trains every member at its front anchor's native size, and a "
                "study with resolutions searches other sizes; set family.enabled: false (or "
                "remove resolutions)"
            )
        if not self.label_free:
            return
        teacher = self.data.teacher or self.finetune.teacher
        if family.teacher is not None and teacher is not None and family.teacher != teacher:
            raise ValueError(
                f"family.teacher {family.teacher!r} differs from the study's teacher "
                f"{teacher!r}; a label-free family distils from the teacher it agrees with"
            )
        if family.distill != 1.0:
            raise ValueError(
                f"family.distill is {family.distill}, but images data has no labels: a "
                "label-free family trains by pure distillation (1.0); remove it"
            )

    def _check_label_free(self, names: list[str]) -> None:
        """A label-free study (``images``) agrees with one teacher and uses no labels."""
        teacher = self.data.teacher
        if not self.label_free:
            if teacher is not None:
                raise ValueError(
                    f"data.teacher is for a label-free study (dataset: images), not "
                    f"{self.data.dataset!r}; remove it (rung 1 distils from finetune.teacher)"
                )
            if "agreement" in self.objectives:
                raise ValueError(
                    f"objective 'agreement' is for a label-free study (dataset: images); the "
                    f"{self.data.dataset!r} data has labels: optimise accuracy"
                )
            return
        if teacher is not None and teacher not in names:
            raise ValueError(
                f"data.teacher {teacher!r} is not one of the study's anchors {names}; name one "
                "of them, or leave it out for the anchor with the most MACs"
            )
        other = self.finetune.teacher
        if teacher is not None and other is not None and other != teacher:
            raise ValueError(
                f"data.teacher {teacher!r} and finetune.teacher {other!r} differ; a label-free "
                "study distils from the teacher it agrees with: give one of them"
            )
        if "accuracy" in self.objectives:
            raise ValueError(
                "objective 'accuracy' needs labels, and images data has none; optimise "
                "agreement (with the teacher) instead: objectives: [agreement, macs]"
            )
        if self.finetune.distill != 1.0:
            raise ValueError(
                f"finetune.distill is {self.finetune.distill}, but images data has no labels: "
                "a label-free study fine-tunes by pure distillation (1.0); remove it"
            )
        if self.fit.steps:
            raise ValueError(
                f"fit.steps is {self.fit.steps}, but fitting steps train on labels and images "
                "data has none; remove it (rung 1 fine-tunes by distillation from the teacher)"
            )

    @property
    def label_free(self) -> bool:
        """Whether the data has no labels (``images``): the study measures agreement."""
        return self.data.dataset == "images"

    @property
    def teacher(self) -> str | None:
        """The teacher a label-free study names: ``data``'s, ``finetune``'s or ``family``'s.

        None in a labelled study, or when the study leaves the choice to the default (the
        anchor with the most MACs, chosen when the anchors are loaded).
        """
        if not self.label_free:
            return None
        return self.data.teacher or self.finetune.teacher or self.family.teacher

    @property
    def legacy_cka_rule(self) -> bool:
        """Whether the rule is the old ``cka: {threshold, top_k}`` form (no ``pruning``)."""
        return "pruning" not in self.model_fields_set and (
            self.cka.threshold > 0 or self.cka.top_k is not None
        )

    @property
    def pruning_rule(self) -> PruningRule:
        """The pruning rule: ``pruning``, or the old CKA rule of ``cka`` when only it is given."""
        if self.legacy_cka_rule:
            return PruningRule(self.cka.threshold, self.cka.top_k)
        p = self.pruning
        return PruningRule(p.threshold, p.top_k, signal=p.signal, depth=p.depth)

    @property
    def pruning_images(self) -> int:
        """Calibration images the pruning signal is computed on."""
        if self.pruning_rule.signal == "cka":
            return self.cka.images
        return self.pruning.images or self.data.calibration

    @property
    def directions(self) -> list[str]:
        """Optuna directions, in objective order."""
        return [OBJECTIVES[o].direction for o in self.objectives]
