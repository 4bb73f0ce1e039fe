"""The budget table: target devices and the limits a stitched network must meet on each.

Users give a CSV file with a header row, one device per row::

    device,max_macs,max_params,max_latency_ms,max_memory_mb,latency_table
    cortex-m7-mcu,2.5M,400K,,1.5,
    raspberry-pi-4,5M,1M,3,,tables/rpi4.json
    edge-server,,,,,

``device`` is required; at least one budget column must be present; an empty cell means no
limit. The optional ``latency_table`` column names a device latency table (a path relative
to the CSV, written by ``python -m search.profile``): that device's latency is predicted
from it instead of measured on the host; the table itself is read and checked against the
study when the run is planned (:mod:`search.latency_tables`). :func:`load_budget_table`
validates the file and raises :class:`BudgetError` with a one-line message naming the
file, line and column, echoing the bad value and saying the fix.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import math
import numbers
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from space import InputError

#: Metric names, in column order: the keys of the ``metrics`` mappings and of
#: :meth:`DeviceBudget.limits`.
METRICS: tuple[str, ...] = ("macs", "params", "latency_ms", "memory_mb")

#: Budget column -> metric name.
BUDGET_COLUMNS: dict[str, str] = {f"max_{m}": m for m in METRICS}

#: The optional column naming a device latency table (a path relative to the CSV).
TABLE_COLUMN = "latency_table"

#: Every column a budget table may have.
KNOWN_COLUMNS: tuple[str, ...] = ("device", *BUDGET_COLUMNS, TABLE_COLUMN)

#: How the summary, report and exports label a latency measured on the search's host.
HOST_MEASURED = "host-measured"

#: Columns that count things and so accept a K/M/G suffix.
_COUNT_COLUMNS = frozenset({"max_macs", "max_params"})
_SUFFIXES = {"k": 1e3, "m": 1e6, "g": 1e9}
_UNITS = {"max_latency_ms": "milliseconds", "max_memory_mb": "megabytes"}
_EMPTY_OK = "or leave the cell empty for no limit"


def _quote(text: str) -> str:
    """Quotes ``text`` for a one-line message: non-printable characters are escaped."""
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"'{escaped}'"


class BudgetError(InputError):
    """A budget table (or one of its values) is invalid.

    ``str(err)`` is one line:
    ``"<file>:<line>: column '<col>': <problem> (got '<value>'); <fix>"``, leaving out the
    parts that do not apply.

    Attributes:
        path: The table's path, or None for a budget built in code.
        line: The 1-based line in the file, or None when the error is about the whole file.
        column: The column's name, or None.
        value: The offending text as written, or None.
        problem: What is wrong.
        fix: How to fix it, or None.
    """

    def __init__(
        self,
        problem: str,
        path: str | Path | None = None,
        line: int | None = None,
        column: str | None = None,
        value: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.path = Path(path) if path is not None else None
        self.line = line
        self.column = column
        self.value = value
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.path is not None:
            where = str(self.path)
            if self.line is not None:
                where += f":{self.line}"
        elif self.line is not None:
            where = f"line {self.line}"
        parts = [where] if where else []
        if self.column is not None:
            parts.append(f"column {_quote(self.column)}")
        text = self.problem
        if self.value is not None:
            text += f" (got {_quote(self.value)})"
        if self.fix:
            text += f"; {self.fix}"
        parts.append(text)
        # Paths and problems may hold newlines too; the message must stay on one line.
        return ": ".join(parts).replace("\r", "\\r").replace("\n", "\\n")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the attributes when pickled (e.g. by Ray).
        args = (self.problem, self.path, self.line, self.column, self.value, self.fix)
        return (type(self), args)


def _is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class DeviceBudget:
    """One target device and its limits; a limit of None means unlimited.

    Attributes:
        device: The device's name (unique within a table).
        max_macs: Most multiply-accumulates per image.
        max_params: Most parameters.
        max_latency_ms: Longest latency per image, in milliseconds.
        max_memory_mb: Most memory, in megabytes.
        line: The CSV line the device was read from, for messages.
        latency_table: The device latency table's path (resolved against the CSV's folder),
            or None: the device's latency is measured on the search's host.
        table_text: The ``latency_table`` cell as written (for messages).
        table: The loaded table (:class:`evaluators.LatencyTable`), attached when the run
            is planned; None until then.
    """

    device: str
    max_macs: float | None = None
    max_params: float | None = None
    max_latency_ms: float | None = None
    max_memory_mb: float | None = None
    line: int | None = None
    latency_table: Path | None = None
    table_text: str | None = field(default=None, compare=False, repr=False)
    table: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise ValueError(f"DeviceBudget.device must be a non-empty name, got {self.device!r}")
        for column in BUDGET_COLUMNS:
            value = getattr(self, column)
            if value is None:
                continue
            ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:
                raise ValueError(
                    f"DeviceBudget.{column} must be a finite number > 0 or None (no limit), "
                    f"got {value!r}"
                )
            object.__setattr__(self, column, float(value))

    @property
    def latency_source(self) -> str:
        """How this device's latency is known: ``"latency table"`` or ``"host-measured"``."""
        return "latency table" if self.latency_table is not None else HOST_MEASURED

    def limits(self) -> dict[str, float]:
        """Returns the set limits keyed by metric name (``"macs"``, ``"params"``, ...)."""
        out = {}
        for column, metric in BUDGET_COLUMNS.items():
            value = getattr(self, column)
            if value is not None:
                out[metric] = value
        return out

    def fits(self, metrics: Mapping[str, float | None]) -> bool:
        """Whether a candidate meets every set limit.

        Args:
            metrics: The candidate's measurements keyed by metric name. A limit whose metric
                is missing (absent, None or NaN) is not met.

        Returns:
            True when every set limit is met; a device without limits fits everything.
        """
        return all(v <= 0 for v in self.violations(metrics).values())

    def violations(self, metrics: Mapping[str, float | None]) -> dict[str, float]:
        """Relative excess per set limit: ``(value - limit) / limit``.

        Args:
            metrics: The candidate's measurements keyed by metric name.

        Returns:
            Per set limit, a value <= 0 when the limit is met; ``inf`` when the metric is
            missing.
        """
        out = {}
        for metric, limit in self.limits().items():
            value = metrics.get(metric)
            out[metric] = math.inf if _is_missing(value) else (value - limit) / limit
        return out

    def headroom(self, metrics: Mapping[str, float | None]) -> dict[str, float]:
        """Fraction of each set budget left: ``1 - value / limit``.

        Args:
            metrics: The candidate's measurements keyed by metric name.

        Returns:
            Per set limit, a value >= 0 when the limit is met (1 means nothing used); ``-inf``
            when the metric is missing.
        """
        return {metric: -v for metric, v in self.violations(metrics).items()}

    def to_dict(self) -> dict[str, Any]:
        """Returns the device's budget row (for exports): the device and every budget column."""
        return {"device": self.device, **{c: getattr(self, c) for c in BUDGET_COLUMNS}}


def constraint_value(
    budgets: Sequence[DeviceBudget],
    metrics: Mapping[str, float | None] | Callable[[DeviceBudget], Mapping[str, float | None]],
) -> float:
    """The Optuna constraint value of a candidate: <= 0 iff it fits at least one device.

    It is the minimum over devices of the largest relative violation on that device, so it
    also says how far an infeasible candidate is from fitting the nearest device. A device
    without limits counts as ``-1`` (nothing used).

    Args:
        budgets: The devices.
        metrics: The candidate's measurements keyed by metric name, or a function giving
            them per device (a device with a latency table has its own latency).

    Returns:
        The constraint value; ``inf`` when a metric that every device limits is missing.

    Raises:
        ValueError: ``budgets`` is empty.
    """
    if not budgets:
        raise ValueError("constraint_value needs at least one device budget, got none")
    of = metrics if callable(metrics) else (lambda b: metrics)
    return min(max(b.violations(of(b)).values(), default=-1.0) for b in budgets)


def fitting_devices(
    budgets: Sequence[DeviceBudget],
    metrics: Mapping[str, float | None] | Callable[[DeviceBudget], Mapping[str, float | None]],
) -> list[str]:
    """Returns the names of the devices a candidate fits, in table order.

    Args:
        budgets: The devices.
        metrics: As for :func:`constraint_value`.
    """
    of = metrics if callable(metrics) else (lambda b: metrics)
    return [b.device for b in budgets if b.fits(of(b))]


def _parse_value(column: str, text: str, path: Path, line: int) -> float:
    """Parses one budget cell (already stripped and non-empty)."""
    if column in _COUNT_COLUMNS:
        example = "a number such as 2500000, 2.5e6 or 2.5M (K/M/G suffixes allowed)"
    else:
        example = f"a plain number of {_UNITS[column]} such as 2.5"

    def error(problem: str, fix: str) -> BudgetError:
        return BudgetError(problem, path, line, column, text, fix)

    number, scale = text, 1.0
    if column in _COUNT_COLUMNS and text[-1:].lower() in _SUFFIXES:
        number, scale = text[:-1].rstrip(), _SUFFIXES[text[-1].lower()]
    try:
        value = float(number) * scale
    except ValueError:
        raise error("not a number", f"write {example}, {_EMPTY_OK}") from None
    if not math.isfinite(value):
        raise error("must be a finite number", f"write {example}, {_EMPTY_OK}")
    if value <= 0:
        raise error("must be greater than zero", f"write {example}, {_EMPTY_OK}")
    return value


#: The largest budget table read (a table holds one row per device).
MAX_TABLE_BYTES = 1 << 20


def _read_text(path: Path) -> str:
    """Reads the file as UTF-8 (a leading BOM is dropped)."""
    if not path.exists():
        raise BudgetError(
            "no such file",
            path,
            fix=f"check the path (relative paths start at {Path.cwd()})",
        )
    if path.is_dir():
        raise BudgetError("is a directory, not a CSV file", path, fix="pass the CSV file's path")
    try:
        size = path.stat().st_size
    except OSError as err:
        raise BudgetError(f"cannot read the file: {err.strerror}", path) from None
    if size > MAX_TABLE_BYTES:
        raise BudgetError(
            f"the file is {size / 2**20:.1f} MiB; a budget table (one row per device) is at "
            f"most {MAX_TABLE_BYTES // 2**20} MiB",
            path,
            fix="pass the budget CSV, not a data file",
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BudgetError(f"cannot read the file: {err.strerror}", path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        bad = "".join(f"\\x{b:02x}" for b in data[err.start : err.end])
        raise BudgetError(
            "not valid UTF-8",
            path,
            line,
            value=bad,
            fix="save the table as UTF-8 (in Excel: 'CSV UTF-8')",
        ) from None


def _parse_header(cells: list[str], path: Path, line: int, raw: str) -> list[str]:
    """Validates the header row and returns the normalised column names."""
    names = [c.strip().lower() for c in cells]
    if "device" not in names:
        fix = "add a 'device' column naming each target device"
        if len(names) == 1 and any(sep in raw for sep in ";\t|"):
            fix = "separate the columns with commas"
        raise BudgetError("missing the required column 'device'", path, line, value=raw, fix=fix)
    seen: dict[str, int] = {}
    for index, name in enumerate(names, start=1):
        if not name:
            raise BudgetError(
                f"header cell {index} is empty",
                path,
                line,
                value=raw,
                fix="name the column or remove the extra comma",
            )
        if name not in KNOWN_COLUMNS:
            hint = difflib.get_close_matches(name, KNOWN_COLUMNS, n=1, cutoff=0.6)
            fix = f"known columns are {', '.join(KNOWN_COLUMNS)}"
            if hint:
                fix = f"did you mean {hint[0]!r}? " + fix
            raise BudgetError("unknown column", path, line, cells[index - 1].strip(), fix=fix)
        if name in seen:
            raise BudgetError(
                f"appears twice in the header (cells {seen[name]} and {index})",
                path,
                line,
                name,
                fix="keep one of them",
            )
        seen[name] = index
    if not any(n in BUDGET_COLUMNS for n in names):
        raise BudgetError(
            "no budget column",
            path,
            line,
            value=raw,
            fix=f"add at least one of {', '.join(BUDGET_COLUMNS)}",
        )
    return names


def load_budget_table(path: str | Path) -> list[DeviceBudget]:
    """Reads and validates a budget table.

    Args:
        path: The CSV file (UTF-8, with or without a BOM).

    Returns:
        The devices in file order.

    Raises:
        BudgetError: The file cannot be read, or anything in it is invalid; the message
            names the file, line and column and echoes the bad value.
    """
    path = Path(path)
    text = _read_text(path)
    if not text.strip():
        raise BudgetError(
            "the file is empty",
            path,
            fix="start with a header row such as 'device,max_macs,max_params'",
        )
    # Physical lines as the csv module counts them (str.splitlines also splits on \f etc.).
    physical = re.split(r"\r\n|\r|\n", text)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    budgets: list[DeviceBudget] = []
    first_line: dict[str, int] = {}
    end = 0
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise BudgetError(
                f"malformed CSV: {err}",
                path,
                reader.line_num,
                value=physical[reader.line_num - 1] if reader.line_num <= len(physical) else None,
                fix="check the quotes on this line",
            ) from None
        end = reader.line_num
        raw = physical[start - 1] if start <= len(physical) else ""
        if not any(c.strip() for c in cells):
            continue  # Blank lines (and rows of empty cells) carry nothing.
        if header is None:
            header, header_line = _parse_header(cells, path, start, raw), start
            continue
        if len(cells) != len(header):
            raise BudgetError(
                f"the row has {len(cells)} cell{'s' * (len(cells) != 1)} but the header "
                f"(line {header_line}) has {len(header)} columns",
                path,
                start,
                value=raw,
                fix="give every row one cell per column; leave a cell empty for no limit",
            )
        row = dict(zip(header, (c.strip() for c in cells), strict=True))
        device = row["device"]
        if not device:
            raise BudgetError(
                "the device name is empty", path, start, "device", device, fix="name the device"
            )
        if any(not c.isprintable() for c in device):
            raise BudgetError(
                "the device name contains control characters",
                path,
                start,
                "device",
                device,
                fix="use printable characters only",
            )
        if device in first_line:
            raise BudgetError(
                f"duplicate device name, first defined on line {first_line[device]}",
                path,
                start,
                "device",
                device,
                fix="give each device a unique name",
            )
        first_line[device] = start
        limits = {
            column: _parse_value(column, row[column], path, start)
            for column in BUDGET_COLUMNS
            if row.get(column)
        }
        table_text = row.get(TABLE_COLUMN) or None
        table = None
        if table_text is not None:
            table = Path(table_text).expanduser()
            if not table.is_absolute():
                table = path.parent / table
        budgets.append(
            DeviceBudget(
                device=device, line=start, latency_table=table, table_text=table_text, **limits
            )
        )
    if not budgets:
        raise BudgetError(
            "no devices: the table has a header but no rows",
            path,
            header_line,
            fix="add one row per target device",
        )
    return budgets


_WINDOWS_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{p}{i}" for p in ("com", "lpt") for i in range(1, 10)}
)
_MAX_STEM = 80


def safe_filename(name: str, taken: set[str] | None = None) -> str:
    """Turns a device name into a file stem that is safe on every common file system.

    The name is NFKC-normalised (accents are folded to ASCII where possible); characters
    other than ``[A-Za-z0-9._-]`` become ``_``; runs of ``_`` or ``.`` collapse; leading
    dots and underscores and trailing dots go; the stem is at most 80 characters and never
    empty, ``.``, ``..`` or a reserved Windows name (``device`` stands in). When anything
    changed, ``-`` and 8 hex digits of the original name's SHA-1 are appended so that
    distinct names stay distinct.

    Args:
        name: The device name.
        taken: Stems already in use; the result differs from each of them
            case-insensitively (a ``-2``, ``-3``, ... suffix is added) and is added to it.

    Returns:
        A stem without path separators that stays inside a folder when joined to it.
    """
    text = unicodedata.normalize("NFKC", name)
    folded = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", folded)
    stem = re.sub(r"_+", "_", stem)
    stem = re.sub(r"\.+", ".", stem)
    stem = stem.lstrip("._").rstrip(".")
    if not stem:
        stem = "device"
    first, dot, rest = stem.partition(".")
    if first.lower() in _WINDOWS_RESERVED:
        stem = f"{first}_{dot}{rest}"
    if stem != name or len(stem) > _MAX_STEM:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        stem = f"{stem[: _MAX_STEM - 9].rstrip('.')}-{digest}"
    if taken is not None:
        lowered = {t.lower() for t in taken}
        base, n = stem, 1
        while stem.lower() in lowered:
            n += 1
            suffix = f"-{n}"
            stem = base[: _MAX_STEM - len(suffix)].rstrip(".") + suffix
        taken.add(stem)
    return stem


def format_quantity(value: float) -> str:
    """Formats a count compactly: ``2500000 -> '2.50M'``, ``1.2e9 -> '1.20G'``, ``950 -> '950'``.

    Args:
        value: The count (MACs, parameters, ...).

    Returns:
        The value with two decimals and a K/M/G/T suffix from 1000 on; below that the
        integer, or two decimals when it is fractional.
    """
    if not math.isfinite(value):
        return str(value)
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale * 0.999995:
            return f"{value / scale:.2f}{suffix}"
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.2f}"
