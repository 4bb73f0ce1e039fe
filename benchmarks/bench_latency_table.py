"""Device latency tables: how well a table predicts latency, and whether picks stay put.

1. **Prediction.** This host is profiled as a device (``python -m search.profile`` in a
   subprocess, ``--threads`` torch threads; its wall time is the profiling time). Every
   candidate of the study's space is then predicted from the table and measured end to end
   on the host in the same run, with the same timing method and threads
   (:func:`evaluators.time_calls`: warm-up, loops of calls, median of repeats). Reported:
   the share of candidates whose prediction is within +-10% of the measurement (target
   >= 90%), Kendall's tau between predicted and measured latency (target >= 0.9), and the
   error distribution.
2. **Stability.** The same search (``--trials``, one worker, the study's seed, no rung 1)
   with one device that has a latency budget and this table runs twice, the second time
   with a CPU-bound job (one busy process) beside it; the device's picks must be identical. The
   host-measured latency of that pick in both runs is shown for contrast.

The load average is recorded at the start and before each part; timings are only
meaningful on a quiet machine.

``--no-stability`` runs only part 1 (the stability runs take 30+ minutes on a loaded
2-core host). Its results JSON then records ``"stability": null`` and its section says
that stability was not run: stability numbers published before (with another table, or
another table format) are neither carried over nor shown beside the new prediction
numbers.

    python -m benchmarks.bench_latency_table            # full: every candidate, 30 trials
    python -m benchmarks.bench_latency_table --quick    # smoke test: a sample, 6 trials
    python -m benchmarks.bench_latency_table --no-stability   # prediction only
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.lib import (
    ROOT,
    bench_parser,
    kendall_tau,
    load_plan,
    machine_info,
    md_table,
    publish,
    study_space,
)
from evaluators import LatencyTable, time_calls, torch_runner
from search.inputs import Plan
from space import StitchConfig, build_stitched


def _burn(stop_at: float) -> None:  # pragma: no cover - a CPU-bound job in a child process
    x = 0
    while time.time() < stop_at:
        x = (x * 1103515245 + 12345) % 2**31


def profile(study: Path, out: Path, threads: int, repeats: int, calibration: int) -> float:
    """Runs ``python -m search.profile`` for this host; returns its wall time."""
    cmd = [sys.executable, "-m", "search.profile", "--study", str(study), "--device", "host-table"]
    cmd += ["--out", str(out), "--threads", str(threads), "--repeats", str(repeats)]
    cmd += ["--calibration", str(calibration)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"profiling failed: {res.stderr[-2000:]}")
    return time.perf_counter() - t0


def predict_and_measure(
    plan: Plan, table: LatencyTable, threads: int, repeats: int, sample: int | None, seed: int
) -> list[dict[str, Any]]:
    """Every (or a sample of) candidate: predicted and measured latency at batch 1."""
    torch.set_num_threads(threads)
    candidates = study_space(plan).all_candidates()
    if sample is not None and sample < len(candidates):
        anchors = [c for c in candidates if c.is_anchor]
        rest = random.Random(seed).sample([c for c in candidates if not c.is_anchor], sample)
        candidates = anchors + rest
    rows = []
    for c in candidates:
        if c.is_anchor:
            net = plan.anchors[c.front].model
        else:
            config = StitchConfig(c.front, c.back, c.front_block, c.back_block)
            net = build_stitched(plan.anchors[c.front], plan.anchors[c.back], config)
        shape = (1, *plan.anchors[c.front].input_size)
        measured = time_calls(torch_runner(net, shape), warmup=3, repeats=repeats)["median_ms"]
        predicted = table.predict(c)
        rows.append(
            {
                "candidate": c.label,
                "predicted_ms": predicted,
                "measured_ms": measured,
                "error_pct": (predicted - measured) / measured * 100,
            }
        )
    return rows


def stability(
    study: Path, table: Path, trials: int, budget_ms: float, root: Path
) -> dict[str, Any]:
    """The same search twice, the second time beside a CPU-bound job."""
    devices = root / "devices.csv"
    devices.write_text(
        f"device,max_latency_ms,latency_table\nhost-table,{budget_ms:.4f},{table.name}\n"
    )
    picks = []
    for loaded in (False, True):
        out = root / ("loaded" if loaded else "quiet")
        burners = []
        if loaded:
            ctx = multiprocessing.get_context("spawn")
            stop_at = time.time() + 3600
            burners = [ctx.Process(target=_burn, args=(stop_at,))]
            for p in burners:
                p.start()
            time.sleep(1.0)
        load = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "search.run", "--budget-table", str(devices)]
        cmd += ["--study", str(study), "--trials", str(trials), "--workers", "1"]
        cmd += ["--no-finetune", "--no-report", "--out", str(out)]
        t0 = time.perf_counter()
        try:
            res = subprocess.run(
                cmd,
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**os.environ, "RAY_AUTH_MODE": "disabled"},
            )
        finally:
            for p in burners:
                p.terminate()
                p.join()
        if res.returncode != 0:
            raise RuntimeError(f"search failed: {res.stderr[-2000:]}")
        export = out / "exports" / "host-table.json"
        doc = json.loads(export.read_text()) if export.exists() else None
        picks.append(
            {
                "cpu_job_beside": loaded,
                "load_avg_1min": round(load, 2),
                "seconds": round(time.perf_counter() - t0, 1),
                "pick": doc["candidate"] if doc else None,
                "trial": doc["study"]["trial_number"] if doc else None,
                "predicted_ms": doc["metrics"]["latency_ms"] if doc else None,
                "host_ms": doc["metrics"]["latency"]["host_ms"] if doc else None,
            }
        )
    return {
        "trials": trials,
        "budget_ms": budget_ms,
        "runs": picks,
        "identical": picks[0]["pick"] == picks[1]["pick"] and picks[0]["pick"] is not None,
    }


def _stability_md(stab: dict[str, Any] | None) -> list[str]:
    """The stability part of the section (a line saying it was not run, without it)."""
    if stab is None:
        return [
            "Stability: not run (`--no-stability`); run the benchmark without it for the "
            "picks quiet and beside a CPU-bound job."
        ]
    return [
        f"Stability: the same search ({stab['trials']} trials, one worker, no rung 1) "
        f"with one device `max_latency_ms` {stab['budget_ms']:.3f} (the median predicted "
        "latency) and this table, run quiet and beside a CPU-bound job (one busy process).",
        md_table(
            ["run", "load avg", "pick (trial)", "predicted ms", "host-measured ms", "s"],
            [
                [
                    "CPU job beside" if r["cpu_job_beside"] else "quiet",
                    r["load_avg_1min"],
                    f"{r['pick']} (#{r['trial']})",
                    f"{r['predicted_ms']:.3f}" if r["predicted_ms"] is not None else "-",
                    f"{r['host_ms']:.3f}" if r["host_ms"] is not None else "-",
                    r["seconds"],
                ]
                for r in stab["runs"]
            ],
        ),
        f"Picks identical: **{'yes' if stab['identical'] else 'NO'}**.",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Profiles this host, predicts and measures every candidate, then the stability runs."""
    info = machine_info()
    plan = load_plan(args.study, args.budget_table)
    with tempfile.TemporaryDirectory(prefix="bench-latency-table-") as tmp:
        root = Path(tmp)
        table_path = root / "host.json"
        load_profile = os.getloadavg()[0]
        seconds = profile(args.study, table_path, args.threads, args.repeats, args.calibration)
        table = LatencyTable.read(table_path)
        load_measure = os.getloadavg()[0]
        rows = predict_and_measure(plan, table, args.threads, args.repeats, args.sample, args.seed)
        errors = [abs(r["error_pct"]) for r in rows]
        within = sum(e <= 10 for e in errors) / len(errors)
        tau = kendall_tau([r["predicted_ms"] for r in rows], [r["measured_ms"] for r in rows])
        budget = statistics.median(r["predicted_ms"] for r in rows)
        stab = (
            None
            if args.no_stability
            else stability(args.study, table_path, args.trials, budget, root)
        )
    entry = table.runtimes[table.predict_runtime]["1"]
    return {
        "machine": info,
        "settings": {
            "threads": args.threads,
            "repeats": args.repeats,
            "calibration": args.calibration,
            "sample": args.sample,
            "quick": args.quick,
            "stability": not args.no_stability,
        },
        "profile": {
            "seconds": seconds,
            "load_avg_1min": round(load_profile, 2),
            "parts": len(entry["parts"]),
            "runtimes": list(table.runtimes),
            "scale": entry.get("scale", 1.0),
            "overhead_ms": entry["overhead_ms"],
        },
        "prediction": {
            "load_avg_1min": round(load_measure, 2),
            "candidates": len(rows),
            "within_10pct": within,
            "kendall_tau": tau,
            "median_abs_error_pct": statistics.median(errors),
            "p90_abs_error_pct": float(np.percentile(errors, 90)),
            "max_abs_error_pct": max(errors),
            "rows": rows,
        },
        "stability": stab,
    }


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    st, prof, pred = res["settings"], res["profile"], res["prediction"]
    return "\n\n".join(
        [
            "This host profiled as a device (`python -m search.profile`, "
            f"{st['threads']} thread(s), {st['repeats']} repeats), then every candidate "
            f"{'(a sample) ' if st['sample'] else ''}predicted from the table and measured end "
            "to end in the same run.",
            md_table(
                ["measure", "value", "target"],
                [
                    ["candidates", pred["candidates"], ""],
                    ["within ±10%", f"{pred['within_10pct']:.1%}", "≥ 90%"],
                    ["Kendall tau", f"{pred['kendall_tau']:.3f}", "≥ 0.9"],
                    [
                        "median / p90 / max abs. error",
                        (
                            f"{pred['median_abs_error_pct']:.1f}% / "
                            f"{pred['p90_abs_error_pct']:.1f}% / "
                            f"{pred['max_abs_error_pct']:.1f}%"
                        ),
                        "",
                    ],
                    [
                        "profiling time",
                        f"{prof['seconds']:.1f} s ({prof['parts']} parts, "
                        f"{', '.join(prof['runtimes'])})",
                        "",
                    ],
                    [
                        "fit",
                        f"scale {prof['scale']:.3f}, overhead {prof['overhead_ms']:+.3f} ms",
                        "",
                    ],
                    [
                        "load average (profile / measure)",
                        f"{prof['load_avg_1min']:.2f} / {pred['load_avg_1min']:.2f}",
                        "",
                    ],
                ],
            ),
            *_stability_md(res["stability"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "latency_table", ground_truth=False)
    parser.add_argument("--quick", action="store_true", help="smoke test: small sample, 6 trials")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (profile, measure)")
    parser.add_argument("--repeats", type=int, default=15, help="timed loops per measurement")
    parser.add_argument("--calibration", type=int, default=12, help="overhead-fit networks")
    parser.add_argument("--sample", type=int, default=None, help="measure only N stitches")
    parser.add_argument("--trials", type=int, default=30, help="trials of each stability run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-stability",
        action="store_true",
        help="run only the prediction part (no stability searches; none reported)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.calibration = 5, 4
        args.sample = args.sample or 24
        args.trials = 6
    res = run(args)
    return publish("latency_table", res, markdown(res), args, argv)


if __name__ == "__main__":
    sys.exit(main())
