"""Device latency tables, judged against what the machine itself can reproduce.

1. **Profile.** This host is profiled as a device (``python -m search.profile`` in a
   subprocess: interleaved rounds, ``--threads`` torch threads, optionally ``--cpus``; its
   wall time is the profiling time, and its noise floor is read from the table).
2. **Ground truth, twice.** Every candidate of the study's space is built and timed end to
   end the way profiling times parts: all candidates once per round, in a shuffled order,
   ``--rounds`` rounds, the median (:func:`evaluators.time_interleaved`), under the
   table's threads and CPU affinity (:func:`evaluators.apply_timing`). This is done twice,
   independently (other round orders); the share of candidates whose two measurements agree
   within ±10% is **the machine's ceiling**: no table can agree with a measurement more
   often than the measurement agrees with itself.
3. **Judged.** Against the first measurement: the share of predictions within ±10% and
   ±20%, Kendall's tau, the median and p90 error, the share within ±10% as a fraction of
   the ceiling, and the **feasibility agreement**: at three latency budgets (the 25th, 50th
   and 75th percentile of the anchors' measured latencies), the share of candidate/budget
   decisions (fits or not) the table makes as the measurement does (and the same share
   between the two measurements, its ceiling). Also how often the measurement falls within
   the prediction's ±1 and ±2 standard deviations, and what ``latency_quantile: 0.9`` does
   at the median budget (networks the table lets in that the measurement finds too slow).

Targets (issue 24): Kendall tau >= 0.9; within ±10% >= 90% of the ceiling; feasibility
agreement >= 95% (CPU); on a GPU >= 90% within ±10% and tau >= 0.95. ``--device-type cuda``
runs the whole benchmark on a GPU (CUDA events) at ``--batch-sizes`` (e.g. ``1,64``);
such a run writes its own results (``latency_table_cuda.json``) and section.

    python -m benchmarks.bench_latency_table            # every candidate, batch 1, CPU
    python -m benchmarks.bench_latency_table --quick    # smoke test: a sample, few rounds
    python -m benchmarks.bench_latency_table --device-type cuda --batch-sizes 1,64
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.lib import RESULTS, ROOT, bench_parser, kendall_tau, machine_info, md_table, publish
from evaluators import (
    LatencyTable,
    apply_timing,
    candidate_network,
    clock_for,
    relative_difference,
    time_interleaved,
    torch_runner,
)
from search.inputs import load_anchors, load_study, study_space
from space import Candidate

#: The two agreement thresholds reported.
WITHIN = (0.10, 0.20)

#: The anchors' latency percentiles the feasibility budgets sit at.
BUDGET_PERCENTILES = (25, 50, 75)


def profile(args: argparse.Namespace, out: Path) -> float:
    """Runs ``python -m search.profile`` for this host; returns its wall time."""
    cmd = [sys.executable, "-m", "search.profile", "--study", str(args.study)]
    cmd += ["--device", "host-table", "--out", str(out), "--runtimes", "torch"]
    cmd += ["--threads", str(args.threads), "--rounds", str(args.rounds)]
    cmd += ["--calibration", str(args.calibration), "--device-type", args.device_type]
    cmd += ["--batch-sizes", ",".join(map(str, args.batches))]
    if args.cpus:
        cmd += ["--cpus", args.cpus]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"profiling failed: {res.stderr[-2000:]}")
    return time.perf_counter() - t0


def measure(
    anchors: dict[str, Any],
    candidates: Sequence[Candidate],
    *,
    batch: int,
    rounds: int,
    seed: int,
    device_type: str,
) -> dict[str, float]:
    """Every candidate end to end in interleaved rounds: label -> median ms per call."""
    runners = {}
    for c in candidates:
        net, size = candidate_network(anchors, c)
        runners[c.label] = torch_runner(net, (batch, *size), device_type)
    timings, _ = time_interleaved(
        runners, rounds=rounds, warmup=3, seed=seed, clock=clock_for(device_type)
    )
    return {label: t["median_ms"] for label, t in timings.items()}


def _share_within(a: Sequence[float], b: Sequence[float], share: float) -> float:
    return sum(relative_difference(x, y) <= share for x, y in zip(a, b, strict=True)) / len(a)


def _decisions(values: Sequence[float], budgets: Sequence[float]) -> list[bool]:
    return [v <= b for b in budgets for v in values]


def _agreement(a: Sequence[bool], b: Sequence[bool]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def judge(
    predicted: Sequence[float],
    std: Sequence[float],
    first: Sequence[float],
    second: Sequence[float],
    anchor_latencies: Sequence[float],
    upper: Sequence[float],
) -> dict[str, Any]:
    """The table's predictions against the first measurement, and the machine's ceiling.

    Args:
        predicted: The table's prediction of each candidate (ms).
        std: Each prediction's standard deviation.
        first: The first ground-truth measurement of each candidate.
        second: The second, independent one.
        anchor_latencies: The anchors' first measurements (the budgets' percentiles).
        upper: Each candidate's 0.9 quantile from the table.
    """
    errors = [abs(p - m) / m * 100 for p, m in zip(predicted, first, strict=True)]
    ceiling = _share_within(second, first, WITHIN[0])
    within = {f"{w:.0%}": _share_within(predicted, first, w) for w in WITHIN}
    budgets = [float(np.percentile(anchor_latencies, q)) for q in BUDGET_PERCENTILES]
    truth = _decisions(first, budgets)
    median_budget = budgets[BUDGET_PERCENTILES.index(50)]
    covered = [
        abs(m - p) / s if s > 0 else np.inf for p, m, s in zip(predicted, first, std, strict=True)
    ]

    def too_slow(estimates: Sequence[float]) -> int:
        return sum(e <= median_budget < m for e, m in zip(estimates, first, strict=True))

    return {
        "candidates": len(predicted),
        "within": within,
        "ceiling_10pct": ceiling,
        "within_10pct_of_ceiling": within["10%"] / ceiling if ceiling else float("nan"),
        "kendall_tau": kendall_tau(predicted, first),
        "ceiling_kendall_tau": kendall_tau(second, first),
        "median_abs_error_pct": statistics.median(errors),
        "p90_abs_error_pct": float(np.percentile(errors, 90)),
        "max_abs_error_pct": max(errors),
        "feasibility": {
            "budgets_ms": budgets,
            "agreement": _agreement(_decisions(predicted, budgets), truth),
            "ceiling": _agreement(_decisions(second, budgets), truth),
        },
        "coverage": {
            "1_std": sum(c <= 1 for c in covered) / len(covered),
            "2_std": sum(c <= 2 for c in covered) / len(covered),
        },
        "quantile_0_9": {
            "budget_ms": median_budget,
            "fits_median": sum(p <= median_budget for p in predicted),
            "too_slow_median": too_slow(predicted),
            "fits_q09": sum(u <= median_budget for u in upper),
            "too_slow_q09": too_slow(upper),
        },
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Profiles this host, measures every candidate twice, and judges the table."""
    info = machine_info()
    study = load_study(args.study)
    anchors, _ = load_anchors(study, args.study)
    for a in anchors.values():
        a.model.to(args.device_type).eval()
    candidates = study_space(study, anchors, args.study).all_candidates()
    if args.sample is not None and args.sample < len(candidates):
        stitches = [c for c in candidates if not c.is_anchor]
        picked = random.Random(args.seed).sample(stitches, args.sample)
        candidates = [c for c in candidates if c.is_anchor] + picked
    with tempfile.TemporaryDirectory(prefix="bench-latency-table-") as tmp:
        table_path = Path(tmp) / "host.json"
        seconds = profile(args, table_path)
        table = LatencyTable.read(table_path)
    batches: dict[str, Any] = {}
    with apply_timing(table.timing()):
        for batch in args.batches:
            t0 = time.perf_counter()
            kw = {"batch": batch, "rounds": args.rounds, "device_type": args.device_type}
            first = measure(anchors, candidates, seed=args.seed + 1, **kw)
            second = measure(anchors, candidates, seed=args.seed + 2, **kw)
            truth_seconds = time.perf_counter() - t0
            estimates = [table.estimate(c, batch=batch) for c in candidates]
            labels = [c.label for c in candidates]
            judged = judge(
                [p for p, _ in estimates],
                [s for _, s in estimates],
                [first[k] for k in labels],
                [second[k] for k in labels],
                [first[c.label] for c in candidates if c.is_anchor],
                [table.quantile(c, 0.9, batch=batch) for c in candidates],
            )
            entry = table.runtimes["torch"][str(batch)]
            batches[str(batch)] = {
                **judged,
                "ground_truth_seconds": truth_seconds,
                "noise": entry["noise"],
                "fit": {
                    "scale": entry["scale"],
                    "overhead_ms": entry["overhead_ms"],
                    "residual_pct": entry["fit"]["residual_pct"],
                },
                "parts": len(entry["parts"]),
                "rows": [
                    {
                        "candidate": k,
                        "predicted_ms": p,
                        "std_ms": s,
                        "first_ms": first[k],
                        "second_ms": second[k],
                    }
                    for k, (p, s) in zip(labels, estimates, strict=True)
                ],
            }
    return {
        "machine": info,
        "device": torch.cuda.get_device_name() if args.device_type == "cuda" else info["cpu"],
        "settings": {
            "device_type": args.device_type,
            "threads": args.threads,
            "cpus": args.cpus,
            "affinity": table.settings.get("affinity"),
            "rounds": args.rounds,
            "calibration": args.calibration,
            "batch_sizes": args.batches,
            "sample": args.sample,
            "seed": args.seed,
            "quick": args.quick,
        },
        "profile_seconds": seconds,
        "batches": batches,
    }


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _batch_rows(b: dict[str, Any], gpu: bool) -> list[list[Any]]:
    feas, q = b["feasibility"], b["quantile_0_9"]
    noise = b["noise"]
    return [
        ["candidates", b["candidates"], ""],
        [
            "within ±10% / ±20%",
            f"{_pct(b['within']['10%'])} / {_pct(b['within']['20%'])}",
            "≥ 90% within ±10%" if gpu else "",
        ],
        ["machine's ceiling (two measurements within ±10%)", _pct(b["ceiling_10pct"]), ""],
        [
            "within ±10%, as a share of the ceiling",
            _pct(b["within_10pct_of_ceiling"]),
            "" if gpu else "≥ 90%",
        ],
        [
            "Kendall tau (ceiling: measurement vs measurement)",
            f"{b['kendall_tau']:.3f} ({b['ceiling_kendall_tau']:.3f})",
            "≥ 0.95" if gpu else "≥ 0.9",
        ],
        [
            "median / p90 / max abs. error",
            f"{b['median_abs_error_pct']:.1f}% / {b['p90_abs_error_pct']:.1f}% / "
            f"{b['max_abs_error_pct']:.1f}%",
            "",
        ],
        [
            "feasibility agreement (ceiling)",
            f"{_pct(feas['agreement'])} ({_pct(feas['ceiling'])}) at "
            + ", ".join(f"{v:.3f}" for v in feas["budgets_ms"])
            + " ms",
            "≥ 95%",
        ],
        [
            "measurement within ±1 / ±2 std of the prediction",
            f"{_pct(b['coverage']['1_std'])} / {_pct(b['coverage']['2_std'])}",
            "",
        ],
        [
            f"at {q['budget_ms']:.3f} ms: fit by the table, too slow measured",
            f"median {q['fits_median']}, {q['too_slow_median']} too slow; quantile 0.9 "
            f"{q['fits_q09']}, {q['too_slow_q09']} too slow",
            "",
        ],
        [
            "profile noise floor",
            f"±{noise['floor_pct']:.1f}% ({_pct(noise['halves_within_10pct'])} of timings "
            "agree across halves)",
            "",
        ],
        [
            "fit",
            f"scale {b['fit']['scale']:.3f}, overhead {b['fit']['overhead_ms']:+.3f} ms, "
            f"leave-one-out {b['fit']['residual_pct']:.1f}%",
            "",
        ],
        ["ground truth (two measurements)", f"{b['ground_truth_seconds']:.0f} s", ""],
    ]


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    st = res["settings"]
    gpu = st["device_type"] == "cuda"
    pinned = f", CPUs {st['cpus']}" if st["cpus"] else ""
    parts = [
        f"This host ({res['device']}) profiled as a device (`python -m search.profile`, "
        f"{st['threads']} thread(s){pinned}, {st['rounds']} interleaved rounds, "
        f"{res['profile_seconds']:.0f} s), then every candidate "
        f"{'(a sample) ' if st['sample'] else ''}predicted from the table and measured end "
        f"to end twice, independently, in {st['rounds']} interleaved rounds each.",
    ]
    for batch, b in res["batches"].items():
        parts.append(f"**Batch {batch}**")
        parts.append(md_table(["measure", "value", "target"], _batch_rows(b, gpu)))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "latency_table", ground_truth=False, out=Path("-"))
    parser.add_argument("--quick", action="store_true", help="smoke test: a sample, 4 rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (profile, measure)")
    parser.add_argument("--cpus", default=None, help="pin to these CPUs (e.g. 0)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--calibration", type=int, default=12, help="overhead-fit networks")
    parser.add_argument("--sample", type=int, default=None, help="measure only N stitches")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device-type", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batch-sizes", default="1", help="comma-separated, e.g. 1,64")
    args = parser.parse_args(argv)
    args.batches = sorted({int(b) for b in args.batch_sizes.split(",")} | {1})
    if args.quick:
        args.rounds, args.calibration = 4, 4
        args.sample = args.sample or 24
    section = "latency_table" if args.device_type == "cpu" else "latency_table_cuda"
    if args.out == Path("-"):  # each device type keeps its own results
        args.out = RESULTS / f"{section}.json"
    res = run(args)
    return publish(section, res, markdown(res), args, argv, script="latency_table")


if __name__ == "__main__":
    sys.exit(main())
