"""Rebuilds every benchmark and its section of BENCHMARKS.md, one script after another.

    python -m benchmarks.run_all                      # everything (ground truth resumed)
    python -m benchmarks.run_all --only search,claims
    python -m benchmarks.run_all --rebuild-ground-truth
    python -m benchmarks.run_all --only rung1          # rung-1 table resumed, then analysed

Each script runs in its own process (clean threads and memory) and is also runnable alone
(``python -m benchmarks.bench_<name> --help``). The ground truth is cached in
``benchmarks/results/ground_truth.json``: only missing candidates are evaluated unless
``--rebuild-ground-truth`` is given (8 minutes on 2 cores for the default zoo, measured).
The rung-1 table (every stitch fine-tuned) is cached in the same way in
``benchmarks/results/rung1_ground_truth.json``; ``rung1`` finishes it before analysing.

Every step runs on the CPU (the scripts' default device). The GPU runs of the real-weight
benchmarks (``--device cuda``) keep their own sections and results (``real_pair_gpu``,
``real_trials_gpu``), which this never touches. Each step's wall time, exit code, date and
commit are recorded in ``benchmarks/results/run_all.json`` (the last run of each step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.lib import (
    DEFAULT_BUDGETS,
    DEFAULT_GROUND_TRUTH,
    DEFAULT_MD,
    DEFAULT_STUDY,
    RESULTS,
    ROOT,
    machine_info,
    write_json,
)

#: (name, takes --study/--budget-table, takes --ground-truth)
STEPS = (
    ("ground_truth", True, False),
    ("pruning", False, True),
    ("signals", True, True),
    ("search", True, True),
    ("trial_cost", True, False),
    ("scaling", True, False),
    ("scaling_rung1", True, False),
    ("claims", True, True),
    ("rung1", True, True),
    ("latency_table", True, False),
    ("real_pair", False, False),
    ("real_trials", False, False),
)


def commands(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """The command line of every selected step."""
    only = set(args.only.split(",")) if args.only else {s for s, _, _ in STEPS}
    unknown = only - {s for s, _, _ in STEPS}
    if unknown:
        names = [s for s, *_ in STEPS]
        raise SystemExit(f"error: --only: unknown steps {sorted(unknown)}; choose from {names}")
    out = []
    for name, study, gt in STEPS:
        if name not in only:
            continue
        module = "scaling" if name == "scaling_rung1" else name
        cmd = [sys.executable, "-m", f"benchmarks.bench_{module}", "--md", str(args.md)]
        if study:
            cmd += ["--study", str(args.study), "--budget-table", str(args.budget_table)]
        if gt:
            cmd += ["--ground-truth", str(args.ground_truth)]
        if name == "ground_truth":
            cmd += ["--out", str(args.ground_truth)]
            if args.rebuild_ground_truth:
                cmd.append("--rebuild")
        if name == "scaling_rung1":
            cmd += ["--rung", "1"]
        if name == "rung1":
            cmd.append("--build")  # only missing stitches are fine-tuned
        out.append((name, cmd))
    return out


def record_step(
    path: Path, name: str, cmd: list[str], code: int, seconds: float, info: dict
) -> None:
    """Records one step's wall time in ``path`` (other steps' records are kept)."""
    steps = json.loads(path.read_text())["steps"] if path.is_file() else {}
    steps[name] = {
        "seconds": round(seconds, 1),
        "exit": code,
        "command": " ".join(["python", *cmd[1:]]),
        "date": info["date"],
        "commit": info["commit"],
        "cpu": info["cpu"],
        "cores": info["cores"],
        "load_avg_1min": info["load_avg_1min"],
    }
    ordered = {s: steps[s] for s, *_ in STEPS if s in steps}
    write_json(
        path, {"steps": ordered, "total_seconds": sum(v["seconds"] for v in ordered.values())}
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study YAML")
    parser.add_argument("--budget-table", type=Path, default=DEFAULT_BUDGETS, help="devices CSV")
    parser.add_argument("--ground-truth", type=Path, default=DEFAULT_GROUND_TRUTH)
    parser.add_argument("--md", type=Path, default=DEFAULT_MD, help="markdown file to update")
    parser.add_argument("--only", default=None, help="comma-separated steps to run")
    parser.add_argument("--rebuild-ground-truth", action="store_true")
    parser.add_argument(
        "--times", type=Path, default=RESULTS / "run_all.json", help="step times JSON"
    )
    args = parser.parse_args(argv)
    failed = []
    for name, cmd in commands(args):
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        info = machine_info()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, check=False)
        seconds = time.perf_counter() - t0
        print(f"== {name}: exit {proc.returncode} in {seconds:.0f}s", flush=True)
        record_step(args.times, name, cmd, proc.returncode, seconds, info)
        if proc.returncode != 0:
            failed.append(name)
            if name == "ground_truth":
                break  # everything else reads it
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
