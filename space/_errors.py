"""Shared helpers for user-facing error messages."""

from __future__ import annotations

import difflib


def close_matches(name: str, candidates: list[str], n: int = 5) -> str:
    """Returns a "did you mean" suffix listing up to ``n`` close matches of ``name``.

    Args:
        name: The unknown name the user gave.
        candidates: The known names.
        n: How many suggestions to list at most.

    Returns:
        A string starting with ``"; did you mean "`` or an empty string when nothing is close.
    """
    matches = difflib.get_close_matches(name, candidates, n=n, cutoff=0.6)
    if not matches:
        return ""
    return "; did you mean " + ", ".join(repr(m) for m in matches) + "?"
