"""Command lines: one-line errors, and argument types that name the flag."""

from __future__ import annotations

import argparse
from collections.abc import Callable


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def one_line(text: str) -> str:
    """``text`` with line breaks escaped, for a one-line error message."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def positive_int(flag: str) -> Callable[[str], int]:
    """An argparse ``type`` accepting whole numbers >= 1; errors name ``flag``."""

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


def positive_float(flag: str) -> Callable[[str], float]:
    """An argparse ``type`` accepting finite seconds > 0; errors name ``flag``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag} must be > 0 seconds, got {text}")
        return value

    return parse
