"""The run's plan: the command line and every input, validated into one frozen value.

:func:`prepare` reads the flags, the budget table, the study YAML, the anchors and the data
and returns a :class:`Plan`, or raises :class:`space.InputError` (one line naming the file or
field, exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shlex
import socket
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluators import (
    DataRecipe,
    DataSplits,
    FinetuneSettings,
    label_by_teacher,
    largest_anchor,
    make_splits,
)
from search.budgets import DeviceBudget, load_budget_table, safe_filename
from search.console import OneLineParser
from search.evaluation import TrialContext
from search.latency_tables import attach_tables
from search.storage import (
    DEFAULT_RETRY_S,
    PASSWORD_ENV,
    check_storage,
    has_password,
    storage_url,
    url_without_password,
)
from search.study import Study, load_anchors, load_study
from search.trials import measure_name
from space import Anchor, InputError

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"
DEFAULT_STUDY = STUDIES_DIR / "default.yaml"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = OneLineParser(
        prog="python -m search.run",
        description="Search stitched networks for a table of target devices.",
        epilog="Example: python -m search.run --budget-table devices.csv",
    )
    p.add_argument(
        "--budget-table",
        required=True,
        metavar="CSV",
        help="devices and budgets: a CSV with a 'device' column and any of max_macs, "
        "max_params (K/M/G suffixes allowed), max_latency_ms, max_memory_mb, and an optional "
        "latency_table (a device latency table from python -m search.profile)",
    )
    p.add_argument(
        "--study",
        default=str(DEFAULT_STUDY),
        metavar="YAML",
        help="study definition (default: studies/default.yaml: the shipped zoo on Fashion-MNIST)",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna RDB storage URL, e.g. postgresql+psycopg://user@127.0.0.1:5432/db "
        f"(default: sqlite under --out); give a PostgreSQL password in ${PASSWORD_ENV}, "
        "not in the URL",
    )
    p.add_argument(
        "--storage-retry",
        type=_positive_float("--storage-retry"),
        default=DEFAULT_RETRY_S,
        metavar="SECONDS",
        help="how long to keep retrying a storage that stops answering mid-study before "
        f"stopping with the resume command (default: {DEFAULT_RETRY_S:g})",
    )
    p.add_argument(
        "--trials",
        type=_positive_int("--trials"),
        default=None,
        help="total candidates to evaluate in the study, resumed runs included "
        "(default: the study's)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int("--workers"),
        default=None,
        help="concurrent Ray trials (default: the study's)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default: runs/<study name>)"
    )
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study's)")
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join an existing Ray cluster ('auto' or host:port) instead of starting one",
    )
    p.add_argument("--onnx", action="store_true", help="also write ONNX for every exported device")
    p.add_argument(
        "--no-finetune",
        action="store_true",
        help="skip rung 1 (stitch-only fine-tuning) in this run; picks use least squares only",
    )
    p.add_argument(
        "--no-report", action="store_true", help="skip the HTML report (faster in tests)"
    )
    return p


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a whole number, got {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value

    return parse


def _positive_float(flag: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be > 0 seconds, got {text}")
        return value

    return parse


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything a run needs, validated before anything is written.

    Attributes:
        study: The study definition (``--trials`` applied).
        study_path: The study YAML.
        budgets: The devices and their budgets.
        budget_path: The budget CSV.
        anchors: The loaded anchors by name.
        anchor_kwargs: ``load_anchor`` keyword arguments by anchor name (workers rebuild the
            anchors from them).
        data: The data splits (calibration sized for CKA and fitting).
        out: The output folder.
        storage_url: The Optuna RDB storage URL (print it only through
            :func:`search.storage.masked_url`: it may hold a password).
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

    @property
    def measure(self) -> str:
        """What validation and test top-1 measure: ``accuracy`` or ``agreement with <teacher>``."""
        return measure_name(self.study.teacher)

    def trial_context(
        self,
        *,
        threads: int,
        use_gpu: bool = False,
        rung: int = 0,
        teacher: str | None = None,
    ) -> TrialContext:
        """What every evaluation of this run shares: data, fitting and latency settings.

        The one place the study's evaluation settings are unpacked; the workers and the
        re-measurement of each device's pick both evaluate through it.

        Args:
            threads: Torch threads per evaluation.
            use_gpu: Evaluate on the GPU when there is one.
            rung: The highest rung evaluated with it; rung 1 ships the training images.
            teacher: The anchor rung 1 distils from (when ``finetune.distill > 0``).
        """
        ft = self.study.finetune
        return TrialContext(
            anchors=dict(self.anchor_kwargs),
            data=self.trial_data(train=rung >= 1),
            fit_steps=self.study.fit.steps,
            fit_lr=self.study.fit.lr,
            latency_batch=self.study.latency_batch,
            threads=threads,
            use_gpu=use_gpu,
            finetune=self.finetune_settings() if ft.enabled and rung >= 1 else None,
            teacher=teacher,
        )

    def finetune_settings(self) -> FinetuneSettings:
        """Rung 1's fine-tuning settings, from the study's ``finetune`` section."""
        ft = self.study.finetune
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

    def trial_data(self, *, train: bool = True) -> DataSplits:
        """The data splits trials use.

        Calibration is cut to the fitting size. The training split (its first
        ``finetune.train_images`` images) is kept when the study fine-tunes and ``train``
        (rung 1), else dropped: the splits are shipped to every worker.
        """
        ft = self.study.finetune
        split = self.data.train if train and ft.enabled else None
        if split is not None and split.num_images > ft.train_images:
            split = split.subset(ft.train_images)
        return dataclasses.replace(
            self.data,
            calibration=self.data.calibration.subset(self.study.data.calibration),
            train=split,
        )


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
    if args.no_finetune:
        study = study.model_copy(
            update={"finetune": study.finetune.model_copy(update={"enabled": False})}
        )
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
    data = study.data.model_copy(update={"teacher": teacher})
    finetune = study.finetune.model_copy(update={"teacher": teacher})
    return study.model_copy(update={"data": data, "finetune": finetune})


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
