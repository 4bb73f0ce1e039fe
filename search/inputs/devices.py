"""The budget table: target devices and the limits a stitched network must meet on each.

Users give a CSV file with a header row, one device per row::

    device,max_macs,max_params,max_latency_ms,max_memory_mb,latency_table,latency_quantile
    cortex-m7-mcu,2.5M,400K,,1.5,,
    raspberry-pi-4,5M,1M,3,,tables/rpi4.json,0.9
    edge-server,,,,,,

``device`` is required; at least one budget column must be present; an empty cell means no
limit. The optional ``latency_table`` column names a device latency table (a path relative
to the CSV, written by ``python -m search.profile``): that device's latency is predicted
from it instead of measured on the host; the table itself is read and checked against the
study when the run is planned (:mod:`search.inputs.device_latency`). A table's prediction
carries an interval; the optional ``latency_quantile`` column (a probability in (0, 1),
default the median) says which quantile of it must fit ``max_latency_ms``: 0.9 picks only
networks whose upper estimate fits. :func:`load_budget_table`
validates the file and raises :class:`BudgetError` with a one-line message naming the
file, line and column, echoing the bad value and saying the fix.
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from search.core import BUDGET_COLUMNS, DeviceBudget
from space import InputError

#: The optional column naming a device latency table (a path relative to the CSV).
TABLE_COLUMN = "latency_table"

#: The optional column saying which quantile of a table's predicted latency must fit.
QUANTILE_COLUMN = "latency_quantile"

#: Every column a budget table may have.
KNOWN_COLUMNS: tuple[str, ...] = ("device", *BUDGET_COLUMNS, TABLE_COLUMN, QUANTILE_COLUMN)

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
    header: list[str] | None = None
    header_line = 0
    budgets: list[DeviceBudget] = []
    first_line: dict[str, int] = {}
    for start, cells, raw in _rows(text, path):
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
        budgets.append(_parse_device(row, path, start, first_line))
    if not budgets:
        raise BudgetError(
            "no devices: the table has a header but no rows",
            path,
            header_line,
            fix="add one row per target device",
        )
    return budgets


def _rows(text: str, path: Path) -> Iterator[tuple[int, list[str], str]]:
    """``(first line, cells, raw line)`` of every CSV row, lines counted as csv counts them."""
    # Physical lines as the csv module counts them (str.splitlines also splits on \f etc.).
    physical = re.split(r"\r\n|\r|\n", text)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    end = 0
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise BudgetError(
                f"malformed CSV: {err}",
                path,
                reader.line_num,
                value=physical[reader.line_num - 1] if reader.line_num <= len(physical) else None,
                fix="check the quotes on this line",
            ) from None
        end = reader.line_num
        yield start, cells, physical[start - 1] if start <= len(physical) else ""


def _parse_device(
    row: dict[str, str], path: Path, line: int, first_line: dict[str, int]
) -> DeviceBudget:
    """One device's row (``first_line`` maps each device named so far to its line)."""
    device = row["device"]
    if not device:
        raise BudgetError(
            "the device name is empty", path, line, "device", device, fix="name the device"
        )
    if any(not c.isprintable() for c in device):
        raise BudgetError(
            "the device name contains control characters",
            path,
            line,
            "device",
            device,
            fix="use printable characters only",
        )
    if device in first_line:
        raise BudgetError(
            f"duplicate device name, first defined on line {first_line[device]}",
            path,
            line,
            "device",
            device,
            fix="give each device a unique name",
        )
    first_line[device] = line
    limits = {
        column: _parse_value(column, row[column], path, line)
        for column in BUDGET_COLUMNS
        if row.get(column)
    }
    table_text = row.get(TABLE_COLUMN) or None
    table = None
    if table_text is not None:
        table = Path(table_text).expanduser()
        if not table.is_absolute():
            table = path.parent / table
    quantile = _parse_quantile(row.get(QUANTILE_COLUMN) or "", table_text, path, line)
    return DeviceBudget(
        device=device,
        line=line,
        latency_table=table,
        table_text=table_text,
        latency_quantile=quantile,
        **limits,
    )


def _parse_quantile(text: str, table_text: str | None, path: Path, line: int) -> float | None:
    """The ``latency_quantile`` cell: a probability in (0, 1), or None when empty."""
    if not text:
        return None
    fix = "write a probability such as 0.9 (0.5 is the median), or leave the cell empty"
    try:
        q = float(text)
    except ValueError:
        raise BudgetError("not a number", path, line, QUANTILE_COLUMN, text, fix) from None
    if not 0 < q < 1:
        raise BudgetError(
            "must be between 0 and 1 (exclusive)", path, line, QUANTILE_COLUMN, text, fix
        )
    if table_text is None:
        raise BudgetError(
            "applies to a latency table's prediction, and this row has no latency_table",
            path,
            line,
            QUANTILE_COLUMN,
            text,
            "name the device's table in the latency_table column, or leave the cell empty",
        )
    return q
