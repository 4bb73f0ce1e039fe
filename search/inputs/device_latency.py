"""Device latency tables in a run: read each device's table and check it fits the study.

A budget row with a ``latency_table`` cell gets its table attached when the run is planned
(:func:`attach_tables`), before anything is written. A table made for another study, for
another checkpoint of an anchor, at another input size, of an older table format (parts
timed alone, before prefixes and suffixes), or lacking a part some candidate of the study
needs is refused with one line naming the CSV row, what does not match and the
command that re-profiles the device.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from evaluators import (
    LatencyTable,
    LatencyTableError,
    anchor_key,
    anchor_latency_record,
    candidate_resolutions,
    study_fingerprint,
)
from search.core import DeviceBudget, build_space
from search.inputs.devices import TABLE_COLUMN, BudgetError
from space import Anchor, Candidate


def profile_command(study_path: Path, device: str, out: Path | str) -> str:
    """The command that (re-)profiles a device for a study."""
    return "python -m search.profile " + shlex.join(
        ["--study", str(study_path), "--device", device, "--out", str(out)]
    )


def _short(identity: str) -> str:
    name, _, digest = identity.rpartition("@")
    return f"{name}@{digest[:12]}" if name else identity[:24]


def check_table(
    table: LatencyTable,
    *,
    device: str,
    study_name: str,
    anchors: Mapping[str, Anchor],
    candidates: Sequence[Candidate],
) -> str | None:
    """What keeps a table from predicting a study's candidates on a device, or None.

    Args:
        table: The table.
        device: The budget row's device.
        study_name: The study's name.
        anchors: The study's anchors by name, in order.
        candidates: Every candidate of the study.

    Returns:
        One phrase saying what does not match, or None when the table fits.
    """
    if table.device != device:
        return f"was profiled for device {table.device!r}, not {device!r}"
    if table.study["name"] != study_name:
        return f"was made for study {table.study['name']!r}, not this run's study {study_name!r}"
    recorded = table.anchors
    sizes = candidate_resolutions(candidates)
    records = [anchor_latency_record(a, sizes) for a in anchors.values()]
    for rec in records:
        name = rec["name"]
        theirs = recorded.get(name)
        if theirs is None:
            return f"has no timings for anchor {name!r} (missing parts {anchor_key(name)}, ...)"
        if theirs["identity"] != rec["identity"]:
            return (
                f"was made for anchor {name!r} with other weights ({_short(theirs['identity'])}"
                f", checkpoint sha256 {str(theirs.get('checkpoint_sha256'))[:12]}); this "
                f"study's is {_short(rec['identity'])}"
            )
        if list(theirs["input_size"]) != list(rec["input_size"]):
            return (
                f"timed anchor {name!r} at input size {list(theirs['input_size'])}, but the "
                f"study runs it at {list(rec['input_size'])}"
            )
        if theirs["num_blocks"] != rec["num_blocks"] or theirs["cuts"] != rec["cuts"]:
            return f"records other blocks or cut shapes for anchor {name!r}"
        for r in sizes:
            cuts = theirs.get("cuts_at", {}).get(str(r)) if isinstance(theirs, dict) else None
            if cuts is None:
                return (
                    f"has no timings for anchor {name!r} at the study's resolution {r} px "
                    f"(missing parts {anchor_key(name, r)}, ...)"
                )
            if cuts != rec["cuts_at"][str(r)]:
                return f"records other cut shapes for anchor {name!r} at {r} px"
    if table.study["fingerprint"] != study_fingerprint(records):
        names = [r["name"] for r in table.study["anchors"]]
        return f"was made for the anchors {names}, not {[r['name'] for r in records]}"
    missing = table.missing_parts(candidates)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        return f"has no timing for part {missing[0]!r}{more}"
    return None


def attach_tables(
    budgets: Sequence[DeviceBudget],
    budget_path: Path,
    *,
    study_name: str,
    study_path: Path,
    anchors: Mapping[str, Anchor],
    resolutions: Sequence[int] | None = None,
    cuts: str = "all",
) -> tuple[DeviceBudget, ...]:
    """Reads each device's latency table, checks it against the study, and attaches it.

    Args:
        budgets: The budget rows.
        budget_path: The CSV (for messages).
        study_name: The study's name.
        study_path: The study YAML (for the re-profile command).
        anchors: The study's loaded anchors, in order.
        resolutions: The study's searched input sizes (``None``: native sizes); a table
            must hold every part at each of them.
        cuts: The study's ``cuts`` (``stages``: a table needs only the stage-boundary parts).

    Returns:
        The rows, those with a ``latency_table`` carrying the loaded table.

    Raises:
        BudgetError: A table is missing, unreadable or invalid, or does not fit the study;
            one line naming the CSV row, what is wrong and the fix.
    """
    if not any(b.latency_table is not None for b in budgets):
        return tuple(budgets)
    candidates = build_space(anchors, resolutions, cuts).all_candidates()
    out = []
    for b in budgets:
        if b.latency_table is None:
            out.append(b)
            continue
        fix = "re-profile the device: " + profile_command(study_path, b.device, b.latency_table)

        def error(problem: str, fix: str = fix, b: DeviceBudget = b) -> BudgetError:
            return BudgetError(
                f"device {b.device!r}: latency table {problem}",
                budget_path,
                b.line,
                TABLE_COLUMN,
                b.table_text,
                fix,
            )

        try:
            table = LatencyTable.read(b.latency_table)
        except LatencyTableError as e:
            if not b.latency_table.exists():
                raise error(
                    f"{str(b.latency_table)!r}: no such file",
                    "give the path relative to the CSV's folder, or profile the device: "
                    + profile_command(study_path, b.device, b.latency_table),
                ) from None
            raise error(f"{str(b.latency_table)!r}: {e}") from None
        problem = check_table(
            table, device=b.device, study_name=study_name, anchors=anchors, candidates=candidates
        )
        if problem is not None:
            raise error(f"{str(b.latency_table)!r} {problem}")
        out.append(dataclasses.replace(b, table=table))
    return tuple(out)
