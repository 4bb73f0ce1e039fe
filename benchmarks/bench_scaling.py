"""Worker scaling: trials per minute with 1 and 2 Ray workers on this machine's cores.

Runs the real ``python -m search.run`` on the study with ``--workers`` 1, then 2 (each a
fresh study in a temporary folder, the same ``--trials`` and seed; each trial gets
``cores / workers`` torch threads), ``--repeats`` times each, and reads the timings back
from the study: trials per minute over the tuning window (first evaluated trial's start to
the last one's end), the command's wall time, and the workers' mean ``trial_seconds`` (the
two runs evaluate partly different candidates, so this shows how comparable they are).

    python -m benchmarks.bench_scaling

``--rung 1`` measures rung 1 (fine-tuning promoted stitches) instead: one run evaluates
``--trials`` rung-0 candidates with ``--no-finetune``; then, for each worker count, a copy of
that folder is resumed without it, so the run does only rung 1 (the same promoted stitches
every time), and fine-tunes per minute are read from the rung-1 study's trials.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from benchmarks.lib import (
    RESULTS,
    bench_parser,
    machine_info,
    md_table,
    mean_std,
    publish,
    run_storage,
    search_run,
)
from search.strategy import rung1_study_name


def summarise(
    runs: list[dict[str, Any]], workers: list[int], columns: dict[str, str]
) -> dict[str, Any]:
    """Per worker count: each column over the repeats, and the speed-up over the first count.

    Args:
        runs: The runs (``workers`` and the columns' source fields).
        workers: The worker counts, the first the baseline.
        columns: Summary name -> the runs' field (``trials_per_minute`` sets the speed-up).
    """
    summary = {}
    for w in workers:
        mine = [r for r in runs if r["workers"] == w]
        summary[str(w)] = {name: [r[f] for r in mine] for name, f in columns.items()}
    base = np.mean(summary[str(workers[0])]["trials_per_minute"])
    for w in workers:
        summary[str(w)]["speedup"] = float(np.mean(summary[str(w)]["trials_per_minute"]) / base)
    return summary


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
    columns = ("trials_per_minute", "wall_seconds", "window_seconds", "worker_seconds_mean")
    summary = summarise(runs, args.workers, {c: c for c in columns})
    return {
        "machine": machine_info(),
        "study": str(args.study),
        "trials": args.trials,
        "repeats": args.repeats,
        "workers": args.workers,
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "trials_detail"} for r in runs],
    }


def run_rung1(args: argparse.Namespace) -> dict[str, Any]:
    """Rung-1 throughput: the same promoted stitches fine-tuned with each worker count."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "rung0"
        search_run(
            args.study,
            args.budget_table,
            trials=args.trials,
            workers=2,
            seed=args.seed,
            out=base,
            cka_cache=args.cka_cache,
            extra=["--no-finetune"],
        )
        name = optuna.get_all_study_names(run_storage(base))[0]
        for rep in range(args.repeats):
            for w in args.workers:
                out = Path(tmp) / f"w{w}-{rep}"
                shutil.copytree(base, out, ignore=shutil.ignore_patterns("exports", "ray"))
                t0 = time.perf_counter()
                search_run(
                    args.study,
                    args.budget_table,
                    trials=args.trials,
                    workers=w,
                    seed=args.seed,
                    out=out,
                )
                wall = time.perf_counter() - t0
                st = optuna.load_study(study_name=rung1_study_name(name), storage=run_storage(out))
                done = [t for t in st.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
                window = max(t.datetime_complete.timestamp() for t in done) - min(
                    t.datetime_start.timestamp() for t in done
                )
                seconds = [t.duration.total_seconds() for t in done]
                runs.append(
                    {
                        "workers": w,
                        "repeat": rep,
                        "finetuned": len(done),
                        "window_seconds": window,
                        "wall_seconds": wall,
                        "finetunes_per_minute": 60.0 * len(done) / window,
                        "trial_seconds_mean": float(np.mean(seconds)),
                    }
                )
                print(
                    f"  rung 1, workers {w}, repeat {rep}: {len(done)} fine-tuned, "
                    f"{runs[-1]['finetunes_per_minute']:.1f}/min",
                    file=sys.stderr,
                    flush=True,
                )
    columns = {
        "trials_per_minute": "finetunes_per_minute",
        "wall_seconds": "wall_seconds",
        "window_seconds": "window_seconds",
        "worker_seconds_mean": "trial_seconds_mean",
        "finetuned": "finetuned",
    }
    summary = summarise(runs, args.workers, columns)
    return {
        "machine": machine_info(),
        "study": str(args.study),
        "rung": 1,
        "trials": args.trials,
        "repeats": args.repeats,
        "workers": args.workers,
        "summary": summary,
        "runs": runs,
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
    if res.get("rung") == 1:
        return "\n".join(
            [
                f"Rung 1 (`--rung 1`): one study with {res['trials']} rung-0 trials "
                "(`--no-finetune`), then per worker count a copy of it resumed with rung 1 on "
                f"(the same {res['summary'][str(res['workers'][0])]['finetuned'][0]} promoted "
                f"stitches each time), {res['repeats']} repeat(s) (mean ± std). Fine-tunes "
                "per minute over the rung-1 window (first rung-1 trial's start to the last "
                "one's end); `trial time` is the Optuna duration of a rung-1 trial. "
                "Target: 2 workers >= 1.7x one.",
                "",
                md_table(
                    [
                        "workers",
                        "fine-tunes / min",
                        "speed-up",
                        "rung-1 window",
                        "command wall time",
                        "trial time",
                    ],
                    rows,
                ),
            ]
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
    """The command line; returns the exit code."""
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
    parser.add_argument(
        "--rung",
        type=int,
        choices=(0, 1),
        default=0,
        help="0: rung-0 trials (least squares); 1: rung-1 fine-tuning of promoted stitches",
    )
    args = parser.parse_args(argv)
    if args.rung == 1:
        if args.out == RESULTS / "scaling.json":
            args.out = RESULTS / "scaling_rung1.json"
        res = run_rung1(args)
        return publish("scaling_rung1", res, markdown(res), args, argv, script="scaling")
    res = run(args)
    return publish("scaling", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
