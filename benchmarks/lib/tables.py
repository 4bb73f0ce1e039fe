"""Cached, resumable tables of evaluations, built in worker processes (the ground truths).

:func:`build_table` keeps the entries a table file already holds and evaluates the missing
ones in ``processes`` spawned processes (:func:`parallel_map`), writing the file as it goes,
so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.output import write_json
from space import Candidate

#: What a worker evaluates: a candidate's fields and its CKA (``None``: an anchor).
Job = tuple[dict[str, Any], float | None]


@dataclass(frozen=True)
class TableBuild:
    """How a table is built: in how many processes, and what is evaluated again.

    Attributes:
        processes: Evaluation processes.
        threads: Torch threads per process.
        rebuild: Ignore the cached entries.
        limit: Evaluate at most this many missing entries (testing).
    """

    processes: int
    threads: int
    rebuild: bool = False
    limit: int | None = None


def parallel_map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    processes: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """Maps ``fn`` over ``items`` in ``processes`` spawned processes (in order of completion).

    With ``processes <= 1`` everything runs in this process (``initializer`` first).
    """
    if processes <= 1 or len(items) <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap_unordered(fn, items)


def candidate_job(cka: Mapping[tuple[str, str], np.ndarray]) -> Callable[[Candidate], Job]:
    """The :func:`build_table` job of a candidate: its fields, and its CKA (``None``: anchor)."""

    def job(c: Candidate) -> Job:
        fields = {
            "front": c.front,
            "back": c.back,
            "front_block": c.front_block,
            "back_block": c.back_block,
        }
        return fields, (
            None if c.is_anchor else float(cka[(c.front, c.back)][c.front_block, c.back_block])
        )

    return job


def build_table(
    path: Path,
    raw: dict[str, Any],
    wanted: Mapping[str, Candidate],
    build: TableBuild,
    *,
    job: Callable[[Candidate], Any],
    evaluate: Callable[[Any], dict[str, Any]],
    initializer: Callable[..., None],
    initargs: tuple,
    order: Callable[[Candidate], Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    report: Callable[[int, int, dict[str, Any], float, dict[str, Any]], None] | None = None,
    name: str = "table",
) -> dict[str, Any]:
    """Builds or finishes a cached, resumable table of evaluations (the ground truths).

    Entries already in ``path`` (same ``raw["version"]``, keys still wanted) are kept; the
    missing ones are evaluated by ``evaluate`` in ``build.processes`` processes and written to
    ``path`` every 10 s and at the end, with the build's wall time summed over sessions.

    Args:
        path: The table's JSON (read, then written).
        raw: The table without its entries: ``version``, ``meta``, ... (``entries`` and
            ``build_seconds`` are set here, in place when ``raw`` holds them).
        wanted: Entry key -> candidate.
        build: Processes, and whether to ignore the cached entries or evaluate only a few.
        job: The ``evaluate`` item of a candidate (picklable).
        evaluate: Evaluates one item in a worker; returns a record with the candidate's
            ``key``.
        initializer: Per-process set-up.
        initargs: Its arguments.
        order: Sort key of the missing candidates (default: ``wanted``'s order).
        on_record: Called with each new record before it is stored.
        report: Called with ``(done, todo, record, seconds, entries)`` after each record.
        name: The table's name in the first progress line.

    Returns:
        ``raw``, with ``entries`` and ``build_seconds``; the table as read when nothing was
        missing (it is then not rewritten, so it keeps the machine and date of its build).
    """
    path = Path(path)
    old: dict[str, Any] = {}
    if path.is_file() and not build.rebuild:
        old = json.loads(path.read_text())
        if old.get("version") != raw["version"]:
            old = {}
    entries = {k: v for k, v in old.get("entries", {}).items() if k in wanted}
    dropped = len(old.get("entries", {})) - len(entries)
    todo = [(k, c) for k, c in wanted.items() if k not in entries]
    if order is not None:
        todo.sort(key=lambda kc: order(kc[1]))
    if build.limit is not None:
        todo = todo[: build.limit]
    raw["entries"] = entries
    raw["build_seconds"] = float(old.get("build_seconds", 0.0)) if entries else 0.0
    print(
        f"{name}: {len(wanted)} candidates, {len(entries)} cached, {len(todo)} to evaluate "
        f"({dropped} stale entries dropped), {build.processes} process(es)",
        file=sys.stderr,
        flush=True,
    )
    if old and not todo and not dropped:
        return old  # complete: left as it is, with the machine and date of its build
    keys = {c.key: k for k, c in todo}
    start = last_write = time.perf_counter()
    base = raw["build_seconds"]
    for done, rec in enumerate(
        parallel_map(
            evaluate,
            [job(c) for _, c in todo],
            processes=build.processes,
            initializer=initializer,
            initargs=initargs,
        ),
        start=1,
    ):
        if on_record is not None:
            on_record(rec)
        entries[keys[rec["key"]]] = rec
        now = time.perf_counter()
        raw["build_seconds"] = round(base + now - start, 2)
        if now - last_write > 10 or done == len(todo):
            write_json(path, raw)
            last_write = now
        if report is not None:
            report(done, len(todo), rec, now - start, entries)
    write_json(path, raw)
    return raw
