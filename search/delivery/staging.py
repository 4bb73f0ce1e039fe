"""Publishing exports whole: staged in a driver's own folder, then renamed into place.

A driver writes into its own staging folder, which then replaces ``exports/`` in two
renames, so a run killed while exporting leaves the previous exports (or none), never a mix.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

STAGING_PREFIX = ".exports-"


def staging_dir(out: Path, driver_id: str) -> Path:
    """The folder a driver writes its exports into before publishing them."""
    return out / f"{STAGING_PREFIX}{driver_id[:12]}.tmp"


def clean_staging(out: Path, *, live: set[str]) -> list[Path]:
    """Removes staging folders left by killed drivers (not those of ``live`` drivers).

    Returns:
        The removed folders.
    """
    removed = []
    for d in out.glob(f"{STAGING_PREFIX}*"):
        owner = d.name.removeprefix(STAGING_PREFIX).split(".", 1)[0]
        if d.is_dir() and not any(x.startswith(owner) for x in live):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def publish(staging: Path, target: Path) -> None:
    """Replaces ``target`` by ``staging`` (two renames; the old folder is then deleted)."""
    old = staging.with_name(staging.name.replace(".tmp", ".old"))
    for _ in range(10):  # another driver publishing into the same folder: try again
        try:
            if target.exists():
                os.replace(target, old)
            os.replace(staging, target)
            break
        except OSError:
            time.sleep(0.1)
    else:
        raise OSError(f"could not publish {staging} as {target}")
    shutil.rmtree(old, ignore_errors=True)
