"""Text for people: file names made safe, and compact quantities."""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata

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
