"""User-input errors: the one base class every boundary raises and every CLI catches.

Anything that reads user input (CLI flags, a budget CSV, a study YAML, a checkpoint, a data
path, an export manifest) raises a subclass of :class:`InputError` whose ``str()`` is one line
naming the file, line or field, echoing the bad value and saying the fix. The CLIs print that
line and exit 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib


class InputError(ValueError):
    """A user input is invalid; ``str(err)`` is one line that says where, what and the fix.

    It subclasses ``ValueError`` so that library callers catching ``ValueError`` keep
    working; the CLIs catch only this class.
    """


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
