"""Re-measuring an export and comparing it with its manifest and its device's budget.

:func:`check_export` rebuilds the network (verifying every file by SHA-256), re-measures
test and validation accuracy on the export's dataset, MACs and parameters, and compares them
with the manifest and the budget. Latency and memory depend on the machine: their recorded
values are checked against the budget only.

The dataset is rebuilt from the manifest's ``data.recipe`` (a :class:`evaluators.DataRecipe`)
with :func:`evaluators.make_splits`. Exports written before that key existed are read by
:func:`_legacy_recipe`, the one place that reconstructs a recipe from the older fields.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators import (
    ANY_OP,
    DataError,
    DataRecipe,
    DataSplits,
    RecipeError,
    accuracy,
    anchor_param_count,
    count_macs,
    make_splits,
    stitched_param_counts,
)
from search.core import BUDGET_COLUMNS, DeviceBudget
from space import Anchor, ExportError, LoadedExport, check_fields, read_export

# evaluators.synthetic_splits' identity: classes, (C, H, W), calibration, validation, test, seed.
_SYNTHETIC = re.compile(r"^synthetic-(\d+)-\((\d+), (\d+), (\d+)\)-(\d+)-(\d+)-(\d+)-(-?\d+)$")


@dataclass
class CheckRow:
    """One line of the check's table.

    Attributes:
        metric: What is compared.
        expected: The manifest's value.
        measured: The re-measured value, or None when not re-measured.
        limit: The device's budget for it, or None.
        status: ``"ok"``, ``"DIFFERS"``, ``"OVER BUDGET"`` or ``"recorded"`` (not
            re-measured, within budget).
    """

    metric: str
    expected: float | None
    measured: float | None
    limit: float | None
    status: str


@dataclass
class CheckResult:
    """What ``--check`` found.

    Attributes:
        path: The manifest.
        device: The target device.
        label: The candidate.
        rows: The compared figures.
        problems: One line per figure that differs or does not fit (empty: all good).
        measure: What top-1/top-5 measure: ``"accuracy"``, or ``"agreement with <teacher>"``
            for a label-free export (re-measured against the teacher's recorded predictions).
    """

    path: Path
    device: str
    label: str
    rows: list[CheckRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    measure: str = "accuracy"

    @property
    def ok(self) -> bool:
        """Whether every figure matches and fits the budget."""
        return not self.problems

    def table(self) -> str:
        """The rows as a plain-text table."""

        def fmt(v: float | None, metric: str) -> str:
            if v is None:
                return "-"
            if metric.startswith(("test", "validation")):
                return f"{v:.4f}"
            if float(v).is_integer():
                return str(int(v))
            return f"{v:.4g}"

        lines = [["metric", "manifest", "measured", "budget", "status"]]
        for r in self.rows:
            measured = "not re-measured" if r.status == "recorded" else fmt(r.measured, r.metric)
            lines.append(
                [
                    r.metric,
                    fmt(r.expected, r.metric),
                    measured,
                    fmt(r.limit, r.metric),
                    r.status if r.status != "recorded" else "ok",
                ]
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
        out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in out)


def _budget(path: Path, doc: Mapping[str, Any]) -> DeviceBudget:

    row = doc["budget"]
    check_fields(path, row, frozenset({"device", *BUDGET_COLUMNS}), "budget")
    try:
        budget = DeviceBudget(**row)
    except ValueError as e:
        raise ExportError(path, str(e), field="budget") from None
    if budget.device != doc["device"]:
        raise ExportError(
            path,
            f"is {budget.device!r} but the export is for {doc['device']!r}",
            field="budget.device",
        )
    return budget


def _dataset_of(path: Path, name: Any) -> str:
    """The recipe dataset that a manifest's ``data.name`` stands for."""
    if name in ("synthetic", "fashion-mnist"):
        return name
    if isinstance(name, str) and name.startswith("imagefolder:"):
        return "imagefolder"
    if isinstance(name, str) and name.startswith("images:"):
        return "images"
    raise ExportError(
        path,
        f"unknown dataset {name!r}",
        field="data.name",
        fix="expected 'synthetic', 'fashion-mnist', 'imagefolder:<name>' or 'images:<name>'",
    )


def _recorded_recipe(path: Path, data: Mapping[str, Any]) -> DataRecipe:
    """The manifest's ``data.recipe``, validated and consistent with ``data.name``."""
    try:
        recipe = DataRecipe.from_dict(data["recipe"])
    except RecipeError as e:
        raise ExportError(path, e.problem, field=f"data.recipe.{e.field}") from None
    except DataError as e:
        raise ExportError(path, str(e), field="data.recipe") from None
    if recipe.dataset != _dataset_of(path, data["name"]):
        raise ExportError(
            path,
            f"is {recipe.dataset!r} but data.name is {data['name']!r}",
            field="data.recipe.dataset",
            fix="the two must name the same dataset; re-export from the study",
        )
    return recipe


def _legacy_recipe(path: Path, data: Mapping[str, Any]) -> tuple[DataRecipe, bool]:
    """The recipe of an export written before ``data.recipe`` existed, from its older fields.

    Synthetic data is read back from its identity string; Fashion-MNIST and ImageFolder data
    from the recorded sizes (Fashion-MNIST calibration defaults to 1 image: the check does
    not use it).

    Returns:
        The recipe, and whether the rebuilt identity must equal the recorded one (only for
        synthetic data or when ``data.calibration_images`` was recorded).
    """
    dataset = _dataset_of(path, data["name"])
    cal = data.get("calibration_images")  # validated by ExportManifest.check_data
    bs = data.get("batch_size") or 256
    try:
        if dataset == "synthetic":
            m = _SYNTHETIC.match(str(data["identity"]))
            if m is None:
                raise ExportError(
                    path,
                    f"cannot reproduce synthetic data from identity {data['identity']!r}",
                    field="data.identity",
                )
            n_cls, c, h, w, n_cal, v, t, s = (int(g) for g in m.groups())
            recipe = DataRecipe(
                "synthetic",
                calibration=n_cal,
                validation=v,
                test=t,
                batch_size=bs,
                seed=s,
                input_size=(c, h, w),
                num_classes=n_cls,
            )
            return recipe, True
        recipe = DataRecipe(
            dataset,
            calibration=(cal or 1) if dataset == "fashion-mnist" else cal,
            validation=data["validation_images"],
            test=data["test_images"],
            batch_size=bs,
            seed=data.get("seed", 0),
            input_size=tuple(data["input_size"]) if dataset == "fashion-mnist" else None,
        )
    except RecipeError as e:
        raise ExportError(path, e.problem, field=f"data.{e.field}") from None
    return recipe, cal is not None


def load_data(
    loaded: LoadedExport, data_dir: str | Path | None = None, *, batch_size: int | None = None
) -> DataSplits:
    """The validation and test splits an export was measured on (:func:`splits_for`).

    Raises:
        ExportError: The data section is invalid or cannot be reproduced.
        DataError: The data cannot be found or does not fit (from the loaders).
    """
    data = loaded.typed_manifest.check_data()
    return splits_for(loaded.path, data, loaded.anchors["front"], data_dir, batch_size=batch_size)


def splits_for(
    path: Path,
    data: Mapping[str, Any],
    anchor: Anchor,
    data_dir: str | Path | None = None,
    *,
    batch_size: int | None = None,
) -> DataSplits:
    """The validation and test splits a manifest's (validated) ``data`` section records.

    Args:
        path: The manifest (for messages).
        data: Its ``data`` section.
        anchor: The anchor whose evaluation transform image folders go through.
        data_dir: The Fashion-MNIST IDX folder or the ImageFolder root, instead of the one
            the recipe records (required for ImageFolder exports without ``data.recipe``).
        batch_size: Evaluation batch size (default: the recorded one, else 256).

    Raises:
        ExportError: The data section is invalid or cannot be reproduced.
        DataError: The data cannot be found or does not fit (from the loaders).
    """
    name = data["name"]
    n_val, n_test = data["validation_images"], data["test_images"]
    if "recipe" in data:
        recipe, exact_identity = _recorded_recipe(path, data), True
    else:
        recipe, exact_identity = _legacy_recipe(path, data)
    if data_dir is not None and recipe.dataset != "synthetic":
        recipe = dataclasses.replace(recipe, root=str(data_dir))
    if batch_size:
        recipe = dataclasses.replace(recipe, batch_size=batch_size)
    if recipe.dataset == "imagefolder" and recipe.root is None:
        raise ExportError(
            path,
            f"is {name!r}: the check needs the ImageFolder root",
            field="data.name",
            fix="pass --data DIR (the folder holding train/ and val/)",
        )
    splits = make_splits(recipe, anchor=anchor)
    if exact_identity and splits.identity != data["identity"]:
        raise ExportError(
            path,
            f"the rebuilt {name} data has identity {splits.identity!r}, the export records "
            f"{data['identity']!r}",
            field="data.identity",
            fix="check --data: it must be the dataset the search ran on",
        )
    for what, loader, n in (
        ("validation", splits.validation, n_val),
        ("test", splits.test, n_test),
    ):
        if loader.num_images != n:
            raise ExportError(
                path,
                f"records {n} images but the data gives {loader.num_images}",
                field=f"data.{what}_images",
            )
    return splits


def check_export(
    export: str | Path | LoadedExport,
    *,
    data_dir: str | Path | None = None,
    tolerance: float = 0.0,
    batch_size: int | None = None,
) -> CheckResult:
    """Re-measures an export and compares it with its manifest and its device's budget.

    Accuracy (test and validation, top-1 and top-5) is re-measured on the export's dataset
    (a label-free export: agreement with the teacher's predictions its recipe records),
    MACs with :func:`evaluators.count_macs` at the front anchor's input size (any operator it
    cannot count allowed, as the study allowed it for the recorded figure), parameters as
    the search counts them (the parameters the forward pass uses). Latency and memory are
    not re-measured; their recorded values are checked against the budget.

    Args:
        export: The export's manifest, or an export already read with
            :func:`space.read_export`.
        data_dir: See :func:`load_data`.
        tolerance: Largest accepted difference of accuracies, in percentage points (0:
            exactly equal). MACs and parameters must always be equal.
        batch_size: Evaluation batch size.

    Returns:
        The comparison; ``result.ok`` says whether everything matched and fits.

    Raises:
        ExportError: The export is invalid, its files missing or altered, or its network
            gives non-finite logits.
        DataError: The data cannot be found or does not fit.
    """
    loaded = export if isinstance(export, LoadedExport) else read_export(export)
    path, doc = loaded.path, loaded.manifest
    budget = _budget(path, doc)
    m = loaded.typed_manifest.check_metrics()
    splits = load_data(loaded, data_dir, batch_size=batch_size)
    model, size = loaded.model, loaded.input_size
    try:
        test = accuracy(model, splits.test, input_size=size)
        val = accuracy(model, splits.validation, input_size=size)
    except ValueError as e:  # e.g. non-finite logits: the verified network itself is broken
        raise ExportError(path, str(e)) from None
    macs = count_macs(model, size, allow_unsupported=[ANY_OP])  # the study's count, again
    if loaded.is_stitch:
        params = stitched_param_counts(model)["total"]
    else:
        params = anchor_param_count(loaded.anchors["front"])
    measure = m.get("measure", "accuracy")
    if splits.recipe is not None and splits.recipe.teacher is not None:
        measure = f"agreement with {splits.recipe.teacher}"
    result = CheckResult(path=path, device=budget.device, label=str(doc["label"]), measure=measure)
    limits = budget.limits()

    def compare(metric: str, expected: Any, measured: Any, tol: float, limit_key: str | None):
        limit = limits.get(limit_key) if limit_key else None
        same = expected == measured or (
            expected is not None and measured is not None and abs(expected - measured) <= tol
        )
        status = "ok" if same else "DIFFERS"
        if not same:
            result.problems.append(
                f"{metric}: the manifest records {expected}, the artifact measures {measured}"
            )
        if limit is not None and (measured is None or measured > limit):
            status = "OVER BUDGET" if same else status
            result.problems.append(
                f"{metric}: {measured} exceeds the budget {limit:g} of device {budget.device!r}"
            )
        result.rows.append(CheckRow(metric, expected, measured, limit, status))

    what = "" if measure == "accuracy" else f" {measure}"
    compare(f"test top-1{what} (%)", m["test"]["top1"], test.top1, tolerance, None)
    compare(f"test top-5{what} (%)", m["test"]["top5"], test.top5, tolerance, None)
    val_expected = m["validation_remeasured"]
    compare(f"validation top-1{what} (%)", val_expected["top1"], val.top1, tolerance, None)
    compare(f"validation top-5{what} (%)", val_expected["top5"], val.top5, tolerance, None)
    compare("MACs", m["macs"], macs, 0, "macs")
    compare("params", m["params"], params, 0, "params")
    for metric in ("latency_ms", "memory_mb"):
        limit = limits.get(metric)
        recorded = m[metric]
        if metric == "latency_ms" and "checked_ms" in (m.get("latency") or {}):
            recorded = m["latency"]["checked_ms"]  # the table's quantile the budget checked
        status = "recorded"
        if limit is not None and (recorded is None or recorded > limit):
            status = "OVER BUDGET"
            result.problems.append(
                f"{metric} (recorded): {recorded} exceeds the budget {limit:g} of device "
                f"{budget.device!r}"
            )
        result.rows.append(CheckRow(f"{metric} (recorded)", recorded, None, limit, status))
    return result
