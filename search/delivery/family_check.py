"""``--check`` of a family's export: every member measured again and compared with its record.

:func:`check_family` loads ``exports/family.json`` (verifying every file by SHA-256), rebuilds
the data its ``data`` section records, and measures every member as the search did:
validation and test top-1 on that data, MACs (fvcore) at its front anchor's input size and
the parameters its forward pass uses. Each must equal what the family records (accuracies
within ``tolerance`` points).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evaluators import (
    ANY_OP,
    accuracy,
    anchor_param_count,
    count_macs,
    stitched_param_counts,
)
from search.delivery.check import CheckResult, CheckRow, splits_for
from space import ExportError, StitchedFamily, StitchedNet, load_family
from space.manifest import check_data, read_json_object


def check_family(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    tolerance: float = 0.0,
    batch_size: int | None = None,
) -> CheckResult:
    """Measures every member of a saved family again and compares it with the record.

    Args:
        path: The family's JSON (``exports/family.json``).
        data_dir: See :func:`search.delivery.check.splits_for`.
        tolerance: Largest accepted difference of accuracies, in percentage points.
        batch_size: Evaluation batch size.

    Returns:
        The comparison, one row per member and metric.

    Raises:
        ExportError: The family or a file it names is invalid, missing or altered, or it
            records no data to measure on.
        DataError: The data cannot be found or does not fit.
    """
    path = Path(path)
    family = load_family(path)
    doc = read_json_object(path)
    if "data" not in doc:
        raise ExportError(
            path,
            "records no data to measure its members on",
            field="data",
            fix="check a family exported by python -m search.run (exports/family.json)",
        )
    data = check_data(path, doc["data"])
    first = family.anchors[family.members[family.names[0]].front]
    splits = splits_for(path, data, first, data_dir, batch_size=batch_size)
    measure = str(doc.get("measure", "accuracy"))
    result = CheckResult(
        path=path, device="(family)", label=f"{len(family.names)} members", measure=measure
    )
    what = "" if measure == "accuracy" else f" {measure}"
    for name in family.names:
        got = _measure(family, name, splits, path)
        rec = family.metrics.get(name, {})
        for metric, key, tol in (
            (f"test top-1{what} (%)", "test_accuracy", tolerance),
            (f"validation top-1{what} (%)", "accuracy", tolerance),
            ("MACs", "macs", 0.0),
            ("params", "params", 0.0),
        ):
            _compare(result, f"{name}: {metric}", rec.get(key), got[key], tol)
    return result


def _measure(family: StitchedFamily, name: str, splits: Any, path: Path) -> dict[str, float | None]:
    """One member's accuracies, MACs and used parameters, measured as the search does."""
    c = family.members[name]
    model = family.member_module(name)
    size = family.input_size(name)
    try:
        test = accuracy(model, splits.test, input_size=size)
        val = accuracy(model, splits.validation, input_size=size)
    except ValueError as e:
        raise ExportError(path, f"member {name!r}: {e}") from None
    if c.is_anchor:
        params = anchor_param_count(family.anchors[c.front])
    else:
        config = c.config
        assert not isinstance(config, str)
        stitch = family.stitch_of(name)
        net = StitchedNet(family.anchors[c.front], family.anchors[c.back], config, stitch)
        params = stitched_param_counts(net)["total"]
    return {
        "test_accuracy": test.top1,
        "accuracy": val.top1,
        "macs": count_macs(model, size, allow_unsupported=[ANY_OP]),  # as the study counted
        "params": params,
    }


def _compare(result: CheckResult, metric: str, expected: Any, measured: Any, tol: float) -> None:
    same = expected == measured or (
        expected is not None and measured is not None and abs(expected - measured) <= tol
    )
    if not same:
        result.problems.append(
            f"{metric}: the family records {expected}, the artifact measures {measured}"
        )
    result.rows.append(CheckRow(metric, expected, measured, None, "ok" if same else "DIFFERS"))
