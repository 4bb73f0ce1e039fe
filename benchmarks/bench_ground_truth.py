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
:mod:`benchmarks.common`) to the JSON and to ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_GROUND_TRUTH,
    GROUND_TRUTH_VERSION,
    GroundTruth,
    anchor_identities,
    bench_parser,
    build_table,
    candidate_job,
    data_tag,
    entry_key,
    load_plan,
    machine_info,
    md_table,
    publish,
    study_cka,
    study_space,
    write_json,
)
from search.execution import trial_data

_STATE: dict[str, Any] = {}

#: Fields of :class:`evaluators.CandidateResult` kept in the table.
KEEP = (
    "val_acc",
    "val_top5",
    "macs",
    "params",
    "stitch_params",
    "latency_ms",
    "memory_mb",
    "fit_residual",
    "fit_seconds",
    "eval_seconds",
    "val_images",
    "threads",
)


def _init(study: str, budgets: str, threads: int) -> None:
    """Per-process set-up: load the plan (anchors and data) once."""
    import torch

    torch.set_num_threads(threads)
    plan = load_plan(study, budgets)
    _STATE["plan"] = plan
    _STATE["data"] = trial_data(plan)


def _evaluate(item: tuple[dict[str, Any], float | None]) -> dict[str, Any]:
    """Evaluates one candidate in a worker process; failures are recorded, not raised."""
    from evaluators import evaluate_candidate
    from space import Candidate

    cand_dict, cka = item
    c = Candidate(**cand_dict)
    plan = _STATE["plan"]
    study = plan.study
    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "key": c.key,
        "label": c.label,
        "kind": "anchor" if c.is_anchor else "stitch",
        "front": c.front,
        "back": c.back,
        "front_block": c.front_block,
        "back_block": c.back_block,
        "cka": cka,
    }
    try:
        r = evaluate_candidate(
            c.config,
            plan.anchors,
            _STATE["data"],
            fit_steps=study.fit.steps,
            fit_lr=study.fit.lr,
            cka=cka,
            latency_batch=study.latency_batch,
        )
        d = r.to_dict()
        rec.update({k: d[k] for k in KEEP})
    except Exception as e:  # recorded as a failed candidate, as the search would
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Builds or finishes the table; returns the raw JSON object."""
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    plan = load_plan(args.study, args.budget_table)
    space = study_space(plan)
    ids = anchor_identities(plan)
    tag = data_tag(plan)
    t0 = time.perf_counter()
    cka = study_cka(plan, space, args.out.parent)
    cka_seconds = time.perf_counter() - t0
    wanted = {entry_key(c, ids, tag): c for c in space.all_candidates()}
    meta = {
        "study": plan.study.name,
        "study_file": str(Path(args.study)),
        "depths": dict(space.depths),
        "anchors": ids,
        "data_identity": plan.data.identity,
        "data_tag": tag,
        "num_classes": plan.data.num_classes,
        "settings": {
            "calibration": plan.study.data.calibration,
            "validation": plan.study.data.validation,
            "batch_size": plan.study.data.batch_size,
            "cka_images": plan.study.cka.images,
            "fit_steps": plan.study.fit.steps,
            "fit_lr": plan.study.fit.lr,
            "latency_batch": plan.study.latency_batch,
            "threads_per_process": args.threads,
            "processes": args.processes,
        },
    }
    raw = {
        "version": GROUND_TRUTH_VERSION,
        "meta": meta,
        "cka": {f"{a}|{b}": m.tolist() for (a, b), m in cka.items()},
        "cka_seconds": round(cka_seconds, 2),
        "entries": {},
        "build_seconds": 0.0,
        "machine": machine_info(),
    }

    def report(done: int, todo: int, rec: dict[str, Any], seconds: float, _entries) -> None:
        end = "\n" if done == todo else ""
        print(f"\r  {done}/{todo} evaluated ({seconds:.0f}s)", end=end, file=sys.stderr)

    build_table(
        args.out,
        raw,
        wanted,
        job=candidate_job(cka),
        evaluate=_evaluate,
        processes=args.processes,
        initializer=_init,
        initargs=(str(args.study), str(args.budget_table), args.threads),
        rebuild=args.rebuild,
        limit=args.limit,
        report=report,
        name="ground truth",
    )
    entries = raw["entries"]
    raw["session_seconds"] = round(time.perf_counter() - t_start, 2)
    if len(entries) == len(wanted):
        raw["summary"] = summarise(args.out, raw)
    write_json(args.out, raw)
    return raw


def summarise(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The front, hypervolume and timing of a complete table."""
    write_json(path, raw)
    gt = GroundTruth.load(path)
    ok = [k for k, r in gt.records.items() if "error" not in r]
    front = gt.front_keys(ok)
    hv = gt.hypervolume()
    acc, macs = gt.points(front)
    seconds = [r["seconds"] for r in gt.records.values()]
    front_rows = sorted((gt.records[k] for k in front), key=lambda r: r["macs"])
    return {
        "candidates": len(gt.records),
        "anchors": len(gt.depths),
        "stitches": len(gt.records) - len(gt.depths),
        "failed": len(gt.records) - len(ok),
        "front_size": len(front),
        "front": [
            {
                k: r.get(k)
                for k in ("key", "label", "val_acc", "macs", "params", "cka", "latency_ms")
            }
            for r in front_rows
        ],
        "hypervolume": hv(acc, macs),
        "hv_convention": hv.to_dict(),
        "candidate_seconds_total": round(sum(seconds), 1),
        "candidate_seconds_mean": round(sum(seconds) / len(seconds), 3),
        "anchor_points": {
            a: {
                "val_acc": gt.records[f"anchor|{a}"]["val_acc"],
                "macs": gt.records[f"anchor|{a}"]["macs"],
                "params": gt.records[f"anchor|{a}"]["params"],
            }
            for a in gt.depths
        },
    }


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


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "ground_truth", ground_truth=False, out=DEFAULT_GROUND_TRUTH)
    parser.add_argument("--processes", type=int, default=2, help="evaluation processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached entries")
    parser.add_argument(
        "--limit", type=int, default=None, help="evaluate at most N missing candidates (testing)"
    )
    args = parser.parse_args(argv)
    raw = build(args)
    if "summary" not in raw:
        print(f"ground truth incomplete: {len(raw['entries'])} entries written to {args.out}")
        return 0
    return publish("ground_truth", raw, markdown(raw), args, argv, write=False)


if __name__ == "__main__":
    raise SystemExit(main())
