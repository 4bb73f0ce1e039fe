"""Study definitions: YAML files under ``studies/``, validated with pydantic.

Every field is optional except ``anchors``; see ``studies/default.yaml`` for a documented
example. Errors name the file and the field (``cka.threshold``), echo the bad value and say
what is expected.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from search.candidates import PruningRule, SearchSpace, build_space
from search.trials import OBJECTIVES
from space import Anchor, InputError, load_anchor

_OBJECTIVE_ALIASES = {"latency": "latency_ms", "acc": "accuracy", "val_acc": "accuracy"}
#: The objectives that measure how good a candidate is: accuracy (labelled data) or agreement
#: with the teacher (a label-free study, ``data.dataset: images``).
QUALITY_OBJECTIVES = ("accuracy", "agreement")


class StudyError(InputError):
    """A study definition is invalid; the message is one line naming file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnchorSpec(_Strict):
    """One anchor of the study.

    Attributes:
        name: A zoo name (``zoo:resnet-s``) or a timm model name.
        checkpoint: Local ``.safetensors``/``.pth`` weights (relative to the study file).
        pretrained: Use timm's pretrained weights (needs the model hub).
        timm_kwargs: Passed to ``timm.create_model``.
        input_size: ``[C, H, W]`` the anchor runs at, if not the model's default.
    """

    name: str = Field(min_length=1)
    checkpoint: str | None = None
    pretrained: bool = False
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    input_size: tuple[int, int, int] | None = None

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

        A relative checkpoint becomes an absolute path (``base / checkpoint``): the workers
        that rebuild the anchor from these arguments run in another working directory.
        """
        kw: dict[str, Any] = dict(self.timm_kwargs)
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


class DataSpec(_Strict):
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


class CkaSpec(_Strict):
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


class PruningSpec(_Strict):
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


class FitSpec(_Strict):
    """Stitching-layer fitting.

    Attributes:
        steps: Fine-tuning steps of the stitching layer after least squares (0: none).
        lr: Fine-tuning learning rate.
    """

    steps: int = Field(default=0, ge=0)
    lr: float = Field(default=1e-3, gt=0)


class PromoteSpec(_Strict):
    """Which rung-0 candidates are promoted to rung 1 (stitch-only fine-tuning).

    Attributes:
        per_device: The best feasible rung-0 stitches per device (by validation accuracy).
        front: Also promote the stitches on the rung-0 Pareto front (accuracy vs MACs).
    """

    per_device: int = Field(default=3, ge=0)
    front: bool = True


class FinetuneSpec(_Strict):
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


class Study(_Strict):
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
        """A label-free study optimises agreement and fine-tunes by pure distillation."""
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
        names = [a.name for a in self.anchors]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"anchors are listed twice: {dup}")
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
        return self

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
        """The teacher a label-free study names (``data.teacher``, else ``finetune.teacher``).

        None in a labelled study, or when the study leaves the choice to the default (the
        anchor with the most MACs, chosen when the anchors are loaded).
        """
        if not self.label_free:
            return None
        return self.data.teacher or self.finetune.teacher

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


def _field_path(loc: tuple[Any, ...], data: Any) -> str:
    parts = []
    node = data
    for item in loc:
        if isinstance(item, int) and isinstance(node, list):
            parts.append(f"[{item}]")
            node = node[item] if item < len(node) else None
        elif isinstance(item, str) and item in ("function-after", "function-before"):
            continue
        else:
            if isinstance(item, str) and item.startswith(("function-", "tagged-union")):
                continue
            parts.append(("." if parts else "") + str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return "".join(parts) or "<top level>"


def _value_at(loc: tuple[Any, ...], data: Any) -> Any:
    node = data
    for item in loc:
        in_dict = isinstance(node, dict) and item in node
        in_list = isinstance(node, list) and isinstance(item, int) and item < len(node)
        if in_dict or in_list:
            node = node[item]
        else:
            return None
    return node


def parse_study(data: Any, *, source: str = "<study>") -> Study:
    """Validates a study definition given as a mapping.

    Raises:
        StudyError: One line naming ``source`` and the first bad field.
    """
    if not isinstance(data, dict):
        raise StudyError(f"{source}: a study must be a YAML mapping, got {type(data).__name__}")
    try:
        return Study.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(err.get("loc", ()))
        field = _field_path(loc, data)
        msg = re.sub(r"^Value error, ", "", err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            allowed = _allowed_fields(loc[:-1])
            msg = "unknown field" + (f"; known fields: {', '.join(allowed)}" if allowed else "")
        if not loc:  # a check across fields; its message starts with the field it is about
            about = re.match(r"^([a-z_]+(?:\.[a-z_]+)+) |^(objective) '", msg)
            if about:
                field = about.group(1) or "objectives"
        # A check across fields echoes its values itself, not the whole study.
        value = _value_at(loc, data) if loc else None
        shown = f" (got {value!r})" if value is not None and err.get("type") != "missing" else ""
        raise StudyError(f"{source}: field '{field}': {msg}{shown}") from None


def _allowed_fields(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Study
    for item in loc:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(str(item))
        if field is None:
            return []
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        sub = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None:
            return []
        model = sub
    return sorted(model.model_fields)


#: The largest study YAML read, and the most values its aliases may expand to (a study
#: holds a few dozen; an "alias bomb" of a few lines expands to billions).
MAX_STUDY_BYTES = 1 << 20
MAX_STUDY_VALUES = 100_000


def _expanded_size(root: yaml.Node | None) -> int:
    """How many values a YAML node graph holds once every alias is expanded (capped)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = MAX_STUDY_VALUES + 1  # a recursive alias expands forever
        if isinstance(node, yaml.SequenceNode):
            n = 1 + sum(size(item) for item in node.value)
        elif isinstance(node, yaml.MappingNode):
            n = 1 + sum(size(k) + size(v) for k, v in node.value)
        else:
            n = 1
        sizes[id(node)] = n = min(n, MAX_STUDY_VALUES + 1)
        return n

    return 0 if root is None else size(root)


def load_study(path: str | Path) -> Study:
    """Reads and validates a study YAML file.

    Raises:
        StudyError: Missing/unreadable file, bad YAML, or an invalid field.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyError(
            f"study file {str(path)!r} does not exist; pass --study PATH to a YAML file "
            "(see studies/default.yaml)"
        )
    size = path.stat().st_size
    if size > MAX_STUDY_BYTES:
        raise StudyError(
            f"{path}: the file is {size / 2**20:.1f} MiB; a study YAML is at most "
            f"{MAX_STUDY_BYTES // 2**20} MiB: pass the study definition, not a data file"
        )
    try:
        text = path.read_text(encoding="utf-8")
        values = _expanded_size(yaml.compose(text, Loader=yaml.SafeLoader))
        if values > MAX_STUDY_VALUES:
            raise StudyError(
                f"{path}: its aliases (*name) expand to more than {MAX_STUDY_VALUES} values; "
                "write the study without deeply nested aliases"
            )
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise StudyError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "constructor for the tag" in problem:
            problem += "; study files are plain YAML: remove the tag"
        raise StudyError(f"{path}{where}: invalid YAML ({problem})") from None
    return parse_study(data, source=str(path))


def load_anchors(
    study: Study, study_path: Path
) -> tuple[dict[str, Anchor], dict[str, dict[str, Any]]]:
    """Loads the study's anchors, in the study's order.

    Args:
        study: The study.
        study_path: Its file (checkpoint paths are relative to its folder).

    Returns:
        The anchors by name, and the ``load_anchor`` keyword arguments of each.

    Raises:
        InputError: An anchor cannot be loaded (the message names ``anchors[i]``), or cannot
            run at one of the study's ``resolutions`` (the message names ``resolutions[i]``).
    """
    anchors: dict[str, Anchor] = {}
    kwargs: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(study.anchors):
        kw = spec.load_kwargs(study_path.parent)
        try:
            anchors[spec.name] = load_anchor(spec.name, **kw)
        except InputError as e:
            raise InputError(f"{study_path}: field 'anchors[{i}]' ({spec.name}): {e}") from None
        kwargs[spec.name] = kw
    check_resolutions(study, anchors, study_path)
    study_space(study, anchors, study_path)
    return anchors, kwargs


def study_space(study: Study, anchors: Mapping[str, Anchor], study_path: Path) -> SearchSpace:
    """The study's search space over its loaded anchors (``resolutions``, ``cuts``).

    Raises:
        InputError: ``cuts: stages`` with an anchor that has no stages, or two anchors with
            different numbers of stages; one line naming the field ``cuts`` and the fix.
    """
    try:
        return build_space(anchors, study.resolutions, study.cuts)
    except ValueError as e:
        raise InputError(
            f"{study_path}: field 'cuts': {e}; use cuts: all, or anchors whose stages match "
            "(e.g. two EfficientNets)"
        ) from None


def check_resolutions(study: Study, anchors: dict[str, Anchor], study_path: Path) -> None:
    """Checks that every anchor runs at every one of the study's ``resolutions``.

    Each anchor's view at each size is built once here (:meth:`space.Anchor.at_resolution`:
    a ViT's copy with its position embedding interpolated) and reused by the search.

    Raises:
        InputError: One line naming ``resolutions[i]``, the anchor and why.
    """
    for i, r in enumerate(study.resolutions or ()):
        for anchor in anchors.values():
            try:
                anchor.at_resolution(r)
            except ValueError as e:
                raise InputError(
                    f"{study_path}: field 'resolutions[{i}]': {e}; list sizes every anchor "
                    "runs at (see the README's table of families)"
                ) from None
