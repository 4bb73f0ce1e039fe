"""The run's plan: the command line and every input, validated into one frozen value.

:func:`prepare` reads the flags, the budget table, the study YAML, the anchors and the data
and returns a :class:`Plan`, or raises :class:`space.InputError` (one line naming the file or
field, exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import logging
import re
import shlex
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluators import DataRecipe, DataSplits, label_by_teacher, largest_anchor, make_splits
from search.core import (
    PASSWORD_ENV,
    DeviceBudget,
    SearchSpace,
    has_password,
    measure_name,
    safe_filename,
    url_without_password,
)
from search.inputs.device_latency import attach_tables
from search.inputs.devices import load_budget_table
from search.inputs.storage import check_storage, storage_url
from search.inputs.study import Study
from search.inputs.study_anchors import load_anchors, study_space
from search.inputs.study_file import load_study
from space import Anchor, InputError, member_name

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
DEFAULT_STUDY = STUDIES_DIR / "default.yaml"


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a run needs, validated before anything is written.

    Attributes:
        study: The study definition (``--trials`` applied).
        study_path: The study YAML.
        budgets: The devices and their budgets.
        budget_path: The budget CSV.
        anchors: The loaded anchors by name.
        anchor_kwargs: ``load_anchor`` keyword arguments by anchor id (workers rebuild the
            anchors from them).
        data: The data splits (calibration sized for CKA and fitting).
        out: The output folder.
        storage_url: The Optuna RDB storage URL (print it only through
            :func:`search.core.masked_url`: it may hold a password).
        storage_retry_s: How long a storage that stops answering is retried.
        trials: Evaluations the study should hold.
        workers: Concurrent Ray trials.
        seed: The sampler seed.
        ray_address: An existing Ray cluster to join, or None for a local one.
        onnx: Also write ONNX for every export.
        report: Write the HTML report.
        driver_id: This run's id (written into its trials and heartbeat).
        command: The command line, for "run it again" hints; a password in ``--storage``
            is left out (a shell comment then says to set ``$PGPASSWORD``).
        verbose: Show Optuna's INFO lines (``--verbose``); by default only its warnings.
    """

    study: Study
    study_path: Path
    budgets: tuple[DeviceBudget, ...]
    budget_path: Path
    anchors: Mapping[str, Anchor]
    anchor_kwargs: Mapping[str, dict[str, Any]]
    data: DataSplits
    out: Path
    storage_url: str
    storage_retry_s: float
    trials: int
    workers: int
    seed: int
    ray_address: str | None
    onnx: bool
    report: bool
    driver_id: str
    command: str
    verbose: bool = False

    @functools.cached_property
    def space(self) -> SearchSpace:
        """The study's search space over its anchors (checked by :func:`prepare`)."""
        return study_space(self.study, self.anchors, self.study_path)

    @property
    def measure(self) -> str:
        """What validation and test top-1 measure: ``accuracy`` or ``agreement with <teacher>``."""
        return measure_name(self.study.teacher)


def prepare(args: argparse.Namespace, argv: Sequence[str] = ()) -> Plan:
    """Validates all inputs and loads anchors and data; writes nothing.

    Args:
        args: The parsed command line.
        argv: The raw arguments (for the resume hint).

    Raises:
        InputError: A one-line message naming the file or field (exit 2).
    """
    budget_path = Path(args.budget_table)
    budgets = load_budget_table(budget_path)
    study_path = Path(args.study)
    study = load_study(study_path)
    if args.trials is not None:
        study = study.model_copy(update={"trials": args.trials})
    for flag, section in (("no_finetune", "finetune"), ("no_family", "family")):
        if getattr(args, flag, False):
            off = getattr(study, section).model_copy(update={"enabled": False})
            study = study.model_copy(update={section: off})
    out = Path(args.out) if args.out else Path("runs") / safe_filename(study.name)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {str(out)!r} exists and is not a folder; pick another path")
    url = storage_url(args.storage, out)
    check_storage(url)
    anchors, anchor_kwargs = load_anchors(study, study_path)
    study = _resolve_teacher(study, anchors)
    budgets = attach_tables(
        budgets,
        budget_path,
        study_name=study.name,
        study_path=study_path,
        anchors=anchors,
        resolutions=study.resolutions,
        cuts=study.cuts,
    )
    data = _load_data(study, study_path, anchors)
    _check_family(study, study_path, data, anchors)
    return Plan(
        study=study,
        study_path=study_path,
        budgets=tuple(budgets),
        budget_path=budget_path,
        anchors=anchors,
        anchor_kwargs=anchor_kwargs,
        data=data,
        out=out,
        storage_url=url,
        storage_retry_s=args.storage_retry,
        trials=study.trials,
        workers=args.workers or study.workers,
        seed=study.seed if args.seed is None else args.seed,
        ray_address=_ray_address(args.ray_address),
        onnx=args.onnx,
        report=not args.no_report,
        driver_id=uuid.uuid4().hex,
        command=_display_command(argv, args.storage),
        verbose=bool(getattr(args, "verbose", False)),
    )


def _display_command(argv: Sequence[str], storage: str | None) -> str:
    """The command line for hints, with a password in ``--storage`` left out."""
    if storage is None or not has_password(storage):
        return "python -m search.run " + shlex.join(argv)
    safe = url_without_password(storage)
    shown = [
        a.replace(storage, safe) if a == storage or a.startswith("--storage=") else a for a in argv
    ]
    return (
        "python -m search.run "
        + shlex.join(shown)
        + f"  # with the storage password in ${PASSWORD_ENV}"
    )


_RAY_ADDRESS = re.compile(r"^(auto|(ray://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5})$")


def _ray_address(raw: str | None) -> str | None:
    """Validates ``--ray-address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``)."""
    if raw is None:
        return None
    address = raw.strip()
    if not _RAY_ADDRESS.match(address):
        raise InputError(
            f"--ray-address: {raw!r} is not a Ray cluster address; use auto, HOST:PORT (as "
            "printed by `ray start --head`) or ray://HOST:PORT"
        )
    if address != "auto":
        # ray.init waits minutes for a cluster that is not there; ask the port first.
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as e:
            raise InputError(
                f"--ray-address: no Ray cluster answers at {address!r} "
                f"({e.strerror or type(e).__name__}); start one with `ray start --head "
                "--port=PORT` or check the address"
            ) from None
    return address


def _resolve_teacher(study: Study, anchors: Mapping[str, Anchor]) -> Study:
    """A label-free study with its teacher named: the study's, else the most MACs."""
    if not study.label_free:
        return study
    teacher = study.teacher or largest_anchor(anchors)
    update = {"teacher": teacher}
    return study.model_copy(
        update={
            "data": study.data.model_copy(update=update),
            "finetune": study.finetune.model_copy(update=update),
            "family": study.family.model_copy(update=update),
        }
    )


def _load_data(study: Study, study_path: Path, anchors: Mapping[str, Anchor]) -> DataSplits:
    d = study.data
    sizes = {anchor.input_size for anchor in anchors.values()}
    first = next(iter(anchors.values()))
    root = d.root
    if root is not None and not Path(root).expanduser().is_absolute():
        root = str(study_path.parent / root)
    if d.dataset in ("imagefolder", "images") and root is None:
        raise InputError(f"{study_path}: field 'data.root': required for {d.dataset}")
    try:
        recipe = DataRecipe(
            d.dataset,
            root=root,
            calibration=max(d.calibration, study.cka.images, study.pruning_images),
            validation=d.validation,
            test=d.test,
            batch_size=d.batch_size,
            input_size=first.input_size,
            num_classes=first.num_classes if d.dataset == "synthetic" else None,
        )
        data = make_splits(recipe, anchor=first)
        if study.label_free:
            teacher = str(study.teacher)
            data = label_by_teacher(data, anchors[teacher], name=teacher, anchor=first)
    except InputError as e:
        raise InputError(f"{study_path}: field 'data': {e}") from None
    for name, anchor in anchors.items():
        if anchor.num_classes != data.num_classes:
            raise InputError(
                f"{study_path}: anchor {name!r} has {anchor.num_classes} classes but the "
                f"{data.name} data has {data.num_classes}; pass num_classes in timm_kwargs"
            )
    if len(sizes) > 1:
        logging.getLogger(__name__).info("anchors take different input sizes: %s", sizes)
    return data


def _check_family(
    study: Study, study_path: Path, data: DataSplits, anchors: Mapping[str, Anchor]
) -> None:
    """The family has training images, and the members it names are candidates of the study.

    Raises:
        InputError: One line naming the ``family`` field.
    """
    family = study.family
    if not family.enabled:
        return
    if data.train is None:
        raise InputError(
            f"{study_path}: field 'family.enabled': the {data.name} data has no training "
            "split to train the family on; set family.enabled: false"
        )
    if family.train_images is not None and family.train_images > data.train.num_images:
        raise InputError(
            f"{study_path}: field 'family.train_images': {family.train_images} is more than the "
            f"{data.train.num_images} training images; give at most that, or null for all"
        )
    if family.members == "auto":
        return
    candidates = study_space(study, anchors, study_path).all_candidates()
    labels = {c.label for c in candidates} | {member_name(c) for c in candidates}
    for i, label in enumerate(family.members):
        if label not in labels:
            near = difflib.get_close_matches(label, sorted(labels), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise InputError(
                f"{study_path}: field 'family.members[{i}]': {label!r} is not a candidate of "
                f"this study; {hint}name an anchor or a stitch as the summary labels it "
                "('zoo:resnet-l[:5] -> zoo:resnet-s[3:]'), or use members: auto"
            )
