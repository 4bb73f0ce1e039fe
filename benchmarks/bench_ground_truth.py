"""Ground truth: evaluate every candidate of a study's space once, cached and resumable.

Every candidate (the anchors and every stitch point of every ordered anchor pair) goes
through :func:`evaluators.evaluate_candidate` with the study's own data and settings (the
splits, calibration size, fine-tuning steps and latency batch ``python -m search.run``
uses), one torch thread per process, ``--processes`` processes. Each result is cached in
``benchmarks/results/ground_truth.json`` under its candidate key, both anchors' weight
hashes and a tag of the data and settings, so an interrupted build resumes and a retrained
anchor only re-evaluates its own candidates. The CKA matrix of every ordered pair (as the
search computes it) is stored alongside.

    python -m benchmarks.bench_ground_truth              # build or finish (default study)
    python -m benchmarks.bench_ground_truth --rebuild    # evaluate everything again

Writes the true Pareto front and its normalised hypervolume (convention:
:mod:`benchmarks.lib.metrics`) to the JSON and to ``BENCHMARKS.md``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.lib import (
    DEFAULT_GROUND_TRUTH,
    TableBuild,
    bench_parser,
    build_ground_truth,
    machine_info,
    md_table,
    publish,
)


def markdown(raw: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    s = raw["summary"]
    meta = raw["meta"]
    st = meta["settings"]
    hv = s["hv_convention"]
    lines = [
        f"Study `{meta['study']}` ({meta['study_file']}): {s['candidates']} candidates = "
        f"{s['anchors']} anchors + {s['stitches']} stitch points of "
        f"{len(meta['depths']) * (len(meta['depths']) - 1)} ordered pairs; "
        f"{s['failed']} failed. Each evaluated once by `evaluators.evaluate_candidate` "
        f"(least squares on {st['calibration']} calibration images, fine-tuning steps "
        f"{st['fit_steps']}, validation on {st['validation']} images, fvcore MACs, "
        f"latency and memory), {st['processes']} process(es) x {st['threads_per_process']} "
        f"thread(s).",
        "",
        md_table(
            ["measurement", "value"],
            [
                ("build wall time (all sessions)", f"{raw['build_seconds'] / 60:.1f} min"),
                ("table built", _built(raw.get("build_machine") or raw.get("machine") or {})),
                (
                    "per candidate (sum / mean, one thread)",
                    f"{s['candidate_seconds_total'] / 60:.1f} min / "
                    f"{s['candidate_seconds_mean']:.2f} s",
                ),
                (
                    f"CKA matrices ({len(raw['cka'])} pairs, {st['cka_images']} images)",
                    f"{raw['cka_seconds']:.1f} s (0 when cached)",
                ),
                ("true Pareto front", f"{s['front_size']} points"),
                ("hypervolume of the true front (normalised)", f"{s['hypervolume']:.4f}"),
            ],
        ),
        "",
        "Hypervolume convention (used by every section): accuracy mapped to "
        f"`(best - acc) / (best - chance)` with best = {hv['acc_best']:.2f}% and chance = "
        f"{hv['acc_chance']:.1f}%, MACs to `(macs - min) / (max - min)` with min = "
        f"{hv['macs_min'] / 1e6:.3f}M and max = {hv['macs_max'] / 1e6:.3f}M (over the whole "
        f"space); reference point {tuple(hv['reference'])}; Optuna's "
        "`optuna._hypervolume.compute_hypervolume` (WFG).",
        "",
        "Anchors:",
        "",
        md_table(
            ["anchor", "blocks", "val acc", "MACs", "params"],
            [
                (
                    a,
                    meta["depths"][a],
                    f"{p['val_acc']:.2f}%",
                    f"{p['macs'] / 1e6:.3f}M",
                    f"{p['params'] / 1e3:.0f}K",
                )
                for a, p in s["anchor_points"].items()
            ],
        ),
        "",
        "True Pareto front (by MACs):",
        "",
        md_table(
            ["candidate", "val acc", "MACs", "params", "CKA"],
            [
                (
                    f"`{r['label']}`",
                    f"{r['val_acc']:.2f}%",
                    f"{r['macs'] / 1e6:.3f}M",
                    f"{r['params'] / 1e3:.0f}K",
                    "-" if r["cka"] is None else f"{r['cka']:.3f}",
                )
                for r in s["front"]
            ],
        ),
    ]
    return "\n".join(lines)


def _built(machine: dict[str, Any]) -> str:
    """When, where and from which commit the table's entries were evaluated."""
    return (
        f"{machine.get('date', '?')} on {machine.get('cpu', '?')}, commit "
        f"{machine.get('commit', '?')}"
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "ground_truth", ground_truth=False, out=DEFAULT_GROUND_TRUTH)
    parser.add_argument("--processes", type=int, default=2, help="evaluation processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached entries")
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate at most N missing candidates (testing)"
    )
    args = parser.parse_args(argv)
    build = TableBuild(args.processes, args.threads, args.rebuild, args.limit)
    raw = build_ground_truth(args.study, args.budget_table, args.out, build)
    if "summary" not in raw:
        print(f"ground truth incomplete: {len(raw['entries'])} entries written to {args.out}")
        return 0
    # The section is stamped with this run; the table keeps (and names) its build's machine.
    res = {**raw, "machine": machine_info(), "build_machine": raw.get("machine") or {}}
    return publish("ground_truth", res, markdown(res), args, argv, write=False)


if __name__ == "__main__":
    raise SystemExit(main())
