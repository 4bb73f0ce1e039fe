"""Real searches: ``python -m search.run`` in a subprocess, its timings read from the study.

For the benchmarks that measure the whole system (trial cost, worker scaling) rather than
replay the searcher: each run is a fresh study in its own folder, optionally started with
cached CKA matrices so that it skips computing them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from benchmarks.lib.environment import ROOT
from search.core import Attr, evaluated_trials


def run_storage(out: Path) -> str:
    """The storage URL of the study a run with ``--out out`` writes."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def search_run(
    study: Path | str,
    budget_table: Path | str,
    *,
    trials: int,
    workers: int,
    seed: int,
    out: Path,
    cka_cache: Path | None = None,
    timeout: float = 1800,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs ``python -m search.run`` in a subprocess and reads its timings from the study.

    Args:
        study: Study YAML.
        budget_table: Devices CSV.
        trials: ``--trials``.
        workers: ``--workers``.
        seed: ``--seed``.
        out: ``--out`` (a fresh folder: a new study).
        cka_cache: A folder of cached CKA matrices to copy into ``out`` first (the run then
            skips computing them).
        timeout: Seconds before the run is killed.
        extra: More flags for ``search.run`` (e.g. ``--no-finetune``).

    Returns:
        Wall time, the tuning window (first evaluated trial's start to the last one's
        completion), per-trial worker timings and Optuna durations, trials per minute.

    Raises:
        RuntimeError: The run failed (with the tail of its stderr).
    """
    out = Path(out)
    if cka_cache is not None and Path(cka_cache).is_dir():
        shutil.copytree(cka_cache, out / "cache" / "cka", dirs_exist_ok=True)
    cmd = [sys.executable, "-m", "search.run", "--budget-table", str(budget_table)]
    cmd += ["--study", str(study), "--trials", str(trials), "--workers", str(workers)]
    cmd += ["--seed", str(seed), "--out", str(out), "--no-report", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return {
        "command": " ".join(cmd[1:]),
        "workers": workers,
        "trials": trials,
        "seed": seed,
        "wall_seconds": wall,
        **_timings(out, workers),
        "stderr_tail": proc.stderr[-1500:],
    }


def _timings(out: Path, workers: int) -> dict[str, Any]:
    """The tuning window, trial counts and per-trial times of a finished run's study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = run_storage(out)
    name = optuna.get_all_study_names(storage)[0]
    st = optuna.load_study(study_name=name, storage=storage)
    rows = [
        {
            "number": t.number,
            "key": t.user_attrs.get(Attr.KEY),
            "trial_seconds": t.user_attrs.get(Attr.TRIAL_SECONDS),
            "fit_seconds": t.user_attrs.get(Attr.FIT_SECONDS),
            "eval_seconds": t.user_attrs.get(Attr.EVAL_SECONDS),
            "duration": t.duration.total_seconds() if t.duration else None,
            "start": t.datetime_start.timestamp(),
            "complete": t.datetime_complete.timestamp(),
        }
        for t in evaluated_trials(st)
    ]
    window = max(r["complete"] for r in rows) - min(r["start"] for r in rows) if rows else 0.0
    worker = sum(r["trial_seconds"] or 0.0 for r in rows)
    n = len(rows)
    return {
        "window_seconds": window,
        "evaluated": n,
        "pruned": len(st.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
        "failed": len(st.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        "trials_per_minute": 60.0 * n / window if window > 0 else None,
        "worker_seconds_total": worker,
        "worker_seconds_mean": worker / n if n else None,
        "slot_overhead_per_trial": (window * workers - worker) / n if n else None,
        "duration_minus_worker_mean": (
            float(np.mean([r["duration"] - (r["trial_seconds"] or 0.0) for r in rows]))
            if rows
            else None
        ),
        "trials_detail": rows,
    }
