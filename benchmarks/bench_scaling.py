"""Worker scaling: trials per minute with 1 and 2 Ray workers on this machine's cores.

Runs the real ``python -m search.run`` on the study with ``--workers`` 1, then 2 (each a
fresh study in a temporary folder, the same ``--trials`` and seed; each trial gets
``cores / workers`` torch threads), ``--repeats`` times each, and reads the timings back
from the study: trials per minute over the tuning window (first evaluated trial's start to
the last one's end), the command's wall time, and the workers' mean ``trial_seconds`` (the
two runs evaluate partly different candidates, so this shows how comparable they are).

    python -m benchmarks.bench_scaling
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    bench_parser,
    machine_info,
    md_table,
    mean_std,
    publish,
    search_run,
)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The runs, one per worker count and repeat."""
    runs = []
    for rep in range(args.repeats):
        for w in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                r = search_run(
                    args.study,
                    args.budget_table,
                    trials=args.trials,
                    workers=w,
                    seed=args.seed + rep,
                    out=Path(tmp) / "run",
                    cka_cache=args.cka_cache,
                )
            r["repeat"] = rep
            runs.append(r)
            print(
                f"  workers {w}, repeat {rep}: {r['trials_per_minute']:.1f} trials/min",
                file=sys.stderr,
                flush=True,
            )
    summary = {}
    for w in args.workers:
        mine = [r for r in runs if r["workers"] == w]
        summary[str(w)] = {
            "trials_per_minute": [r["trials_per_minute"] for r in mine],
            "wall_seconds": [r["wall_seconds"] for r in mine],
            "window_seconds": [r["window_seconds"] for r in mine],
            "worker_seconds_mean": [r["worker_seconds_mean"] for r in mine],
        }
    base = str(args.workers[0])
    for w in args.workers:
        summary[str(w)]["speedup"] = float(
            np.mean(summary[str(w)]["trials_per_minute"])
            / np.mean(summary[base]["trials_per_minute"])
        )
    return {
        "machine": machine_info(),
        "study": str(args.study),
        "trials": args.trials,
        "repeats": args.repeats,
        "workers": args.workers,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "trials_detail"} for r in runs],
    }


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    rows = []
    for w in res["workers"]:
        s = res["summary"][str(w)]
        rows.append(
            (
                w,
                mean_std(s["trials_per_minute"], "{:.1f}"),
                f"{s['speedup']:.2f}x",
                mean_std(s["window_seconds"], "{:.0f}") + " s",
                mean_std(s["wall_seconds"], "{:.0f}") + " s",
                mean_std(s["worker_seconds_mean"], "{:.2f}") + " s",
            )
        )
    return "\n".join(
        [
            f"`python -m search.run --trials {res['trials']} --workers W` on a fresh study, "
            f"{res['repeats']} repeat(s) per worker count (mean ± std); each trial gets "
            f"`{res['machine']['cores']} // W` torch threads. Trials per minute over the "
            "tuning window; wall time includes start-up (Ray, anchors, data, the CKA matrices "
            "unless `--cka-cache` holds them), "
            "selection and exports.",
            "",
            md_table(
                [
                    "workers",
                    "trials / min",
                    "speed-up",
                    "tuning window",
                    "command wall time",
                    "worker time per trial",
                ],
                rows,
            ),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "scaling", ground_truth=False, cka_cache=True)
    parser.add_argument("--trials", type=int, default=40, help="trials per run")
    parser.add_argument(
        "--workers",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2],
        help="worker counts",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per worker count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(args)
    return publish("scaling", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
