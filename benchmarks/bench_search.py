"""Search efficiency: the real searcher replayed against the ground truth, per sampler.

Each run drives :class:`search.strategy.StitchSearcher` exactly as Ray Tune does
(``suggest(trial_id)`` / ``on_trial_complete(trial_id, result)``) on an in-memory Optuna
study with the study's directions, the anchors enqueued first, the study's pruning rule
(``pruning`` in the YAML, e.g. ``kl`` depth 3, its signal matrices computed as ``search.run``
computes them and cached under ``benchmarks/results/cache/signals``; or the old ``cka`` form)
and budgets, and a sampler built as ``search.run`` builds it; only the evaluation is
replaced by a lookup in the ground-truth table, so the sampler, the proposal filter, the
fallback and the pruning are the shipped code. ``--concurrency`` trials are in flight at
once (default: the study's ``workers``), completed in order of dispatch.

Reported per sampler and budget (a fraction of the whole space), over ``--seeds`` seeds:
the hypervolume of everything evaluated as a fraction of the exhaustive front's
(convention: :mod:`benchmarks.lib.metrics`) and how many true-front points were evaluated.
Because the sampler does not know the budget, the first ``B`` evaluations of one run with
the largest budget are exactly a run with budget ``B``.

Variants (``--samplers``; a suffix ``@none`` runs without pruning, ``@t0.5``, ``@k3`` or
``@t0.5k3`` with that CKA threshold and/or top-k rule instead of the study's):

- ``default``: the study's ``sampler`` as ``search.strategy.make_sampler`` builds it;
- ``tpe``, ``nsga2``, ``random``: ``search.strategy.make_sampler`` with that name;
- ``tpe-independent``: TPE without ``multivariate`` (10 startup trials);
- ``tpe-startupN``: multivariate TPE with ``N`` startup trials;
- ``nsga2-popN``: NSGA-II with population ``N``;
- ``uniform``: no sampler: the anchors, then unexplored unpruned candidates uniformly;
- ``<variant>+nearest``: a proposed change to :class:`search.strategy.FilteredSampler`: when
  the sampler's draws (``max_tries``) are all explored or pruned, take the unexplored
  candidate nearest to its last draw (same anchors first, then the closest cuts) instead of
  a uniformly random one (:func:`benchmarks.lib.replay.nearest_fallback`).

    python -m benchmarks.bench_search
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib import (
    GroundTruth,
    Scorer,
    bench_parser,
    machine_info,
    md_table,
    mean_std,
    publish,
    replay_all,
    rule_spec,
    rule_text,
    score_runs,
    study_signals,
)
from search.inputs import load_study

DEFAULT_SAMPLERS = "default,default@none,default@k4,nsga2,nsga2@none,random,random@none,uniform"


def budget_counts(values: list[float], n: int) -> list[int]:
    """Budgets as evaluations: values up to 1 are shares of the space, larger ones counts."""
    return [max(1, round(v * n)) if v <= 1 else int(v) for v in values]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All replays and their scores."""
    gt = GroundTruth.load(args.ground_truth)
    study = load_study(args.study)
    study_rule = rule_spec(study)
    signals = study_signals(
        args.study, args.budget_table, cka=gt.cka, cache_root=Path(args.ground_truth).parent
    )
    concurrency = args.concurrency or study.workers
    n = len(gt.space)
    budgets = budget_counts(args.budgets, n)
    t0 = time.perf_counter()
    variants, resolved, runs = replay_all(
        args.ground_truth,
        args.budget_table,
        [v.strip() for v in args.samplers.split(",") if v.strip()],
        seeds=args.seeds,
        total=max(budgets),
        concurrency=concurrency,
        study_sampler=study.sampler,
        study_rule=study_rule,
        processes=args.processes,
        signals=signals,
    )
    labels = [str(b) for b in args.budgets]
    scorer = Scorer(gt)
    return {
        "machine": machine_info(),
        "ground_truth": str(args.ground_truth),
        "space_size": n,
        "front_size": len(scorer.front),
        "stitch_front_size": len(scorer.stitch_front),
        "anchors_hv_fraction": scorer.anchors / scorer.full,
        "study_sampler": study.sampler,
        "study_rule": study_rule,
        "concurrency": concurrency,
        "seeds": args.seeds,
        "budget_fractions": list(args.budgets),
        "budgets": budgets,
        "variants": variants,
        "resolved": resolved,
        "summary": score_runs(gt, variants, runs, budgets, labels),
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _label(v: str, res: dict[str, Any]) -> str:
    name = res["resolved"][v]["sampler"]
    name, _, mod = name.partition("+")
    if name == "default":
        name = f"{res['study_sampler']} (study default)"
    if mod == "nearest":
        name += " + nearest fallback"
    return f"{name}, {rule_text(res['resolved'][v]['rule'])}"


def _budget_head(frac: float, b: int) -> str:
    return f"{frac:.0%} ({b})" if frac <= 1 else f"{b}"


def _table(res: dict[str, Any], measures: tuple[tuple[str, str, str], ...]) -> str:
    heads = ["sampler"]
    for frac, b in zip(res["budget_fractions"], res["budgets"], strict=True):
        heads += [f"{title} @{_budget_head(frac, b)}" for _, title, _ in measures]
    rows = []
    for v in res["variants"]:
        s = res["summary"][v]
        row = [_label(v, res)]
        for frac in res["budget_fractions"]:
            pb = s["per_budget"][str(frac)]
            evals = pb["evaluations"]
            note = "" if min(evals) == pb["budget"] else f" ({min(evals)}-{max(evals)} evals)"
            row += [mean_std(pb[m], fmt) + note for m, _, fmt in measures]
        rows.append(row)
    return md_table(heads, rows)


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    fallbacks = ", ".join(
        f"{_label(v, res)}: {np.mean(res['summary'][v]['fallbacks']):.0f}"
        for v in res["variants"]
        if v.split("@")[0] != "uniform"
    )
    tries = sorted({n for v in res["variants"] for n in res["summary"][v].get("max_tries", [])})
    draws = " or ".join(str(n) for n in tries) or "its"
    suggest = ", ".join(
        f"{_label(v, res)}: {np.mean(res['summary'][v]['suggest_seconds_mean']) * 1e3:.0f} ms"
        for v in res["variants"]
        if v.split("@")[0] != "uniform"
    )
    return "\n".join(
        [
            "Replay of the real searcher (`StitchSearcher` + `FilteredSampler` + the sampler) "
            f"against the ground truth: {res['space_size']} candidates; {res['seeds']} seeds "
            f"(0..{res['seeds'] - 1}); {res['concurrency']} trial(s) in flight (the study's "
            "workers); anchors enqueued first; the study's budgets and pruning rule "
            f"({rule_text(res['study_rule'])}) unless the row says otherwise; mean ± std over "
            "seeds; budgets as a share of the space (evaluations in brackets).",
            "",
            f"The issue's measures: hypervolume of everything evaluated over the exhaustive "
            f"front's, and true-front points evaluated (of {res['front_size']}). The anchors "
            f"alone, evaluated first by every search, hold {res['anchors_hv_fraction']:.3f} "
            "of the hypervolume on this zoo, so this measure separates the samplers little.",
            "",
            _table(res, (("hv_fraction", "HV", "{:.3f}"), ("front_found", "front", "{:.1f}"))),
            "",
            "Sharper measures: `gain`, the share of the hypervolume beyond the anchors' that "
            "was found (0: nothing beyond the anchors; 1: the whole front); `stitch HV`, the "
            "hypervolume of the stitch points evaluated over that of the stitch-only front "
            f"(the best stitched networks, {res['stitch_front_size']} points); `stitch front`, "
            "its points evaluated.",
            "",
            _table(
                res,
                (
                    ("gain", "gain", "{:.2f}"),
                    ("stitch_hv_fraction", "stitch HV", "{:.3f}"),
                    ("stitch_front_found", "stitch front", "{:.1f}"),
                ),
            ),
            "",
            "Fallbacks per run at the largest budget (proposals the sampler could not make: "
            f"{draws} draws all explored or pruned, replaced by the filter): " + fallbacks + ".",
            f"Suggest time per trial (driver, mean): {suggest}. Replay wall time "
            f"{res['seconds'] / 60:.1f} min.",
            "",
            *verdict(res),
        ]
    )


def _mean(res: dict[str, Any], variant: str, frac: float, measure: str) -> float:
    return float(np.mean(res["summary"][variant]["per_budget"][str(frac)][measure]))


def verdict(
    res: dict[str, Any], *, target_hv: float = 0.98, target_share: float = 0.2
) -> list[str]:
    """The issue's target for the study's sampler, and the best variant per budget and measure.

    Args:
        res: The results of :func:`run`.
        target_hv: Hypervolume fraction to reach.
        target_share: Largest share of the space the target allows.
    """
    lines = ["**Verdict** (computed from the tables above):", ""]
    fracs = [f for f in res["budget_fractions"] if f <= target_share]
    if "default" in res["variants"] and fracs:
        frac = max(fracs)
        hv = _mean(res, "default", frac, "hv_fraction")
        met = "meets" if hv >= target_hv else "misses"
        line = (
            f"- Target (>= {target_hv} of the exhaustive hypervolume with <= "
            f"{target_share:.0%} of the evaluations): the study's sampler "
            f"({res['study_sampler']}) reaches {hv:.3f} at {frac:.0%}, so it **{met}** it."
        )
        if "random" in res["variants"]:
            parts = []
            for m, name, fmt in _MEASURES_SHOWN:
                d, r = _mean(res, "default", frac, m), _mean(res, "random", frac, m)
                word = "above" if d > r else ("equal to" if d == r else "below")
                parts.append(f"{name} {fmt.format(d)} vs {fmt.format(r)} ({word})")
            line += " Against random search at the same budget and rule: " + "; ".join(parts) + "."
        lines.append(line)
    for frac, b in zip(res["budget_fractions"], res["budgets"], strict=True):
        best = []
        for m, name, _ in _MEASURES_SHOWN[1:]:
            v = max(res["variants"], key=lambda v, m=m: _mean(res, v, frac, m))
            best.append(f"{name}: {_label(v, res)}")
        lines.append(f"- Best at {_budget_head(frac, b)}: " + "; ".join(best) + ".")
    return lines


#: (measure, name, format) of the verdict.
_MEASURES_SHOWN = (
    ("hv_fraction", "HV", "{:.3f}"),
    ("gain", "gain", "{:.2f}"),
    ("stitch_hv_fraction", "stitch HV", "{:.3f}"),
    ("stitch_front_found", "stitch-front points", "{:.1f}"),
)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "search")
    parser.add_argument("--samplers", default=DEFAULT_SAMPLERS, help="comma-separated variants")
    parser.add_argument(
        "--budgets",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.1, 0.2, 0.4],
        help="budgets: shares of the space (<= 1) or evaluation counts (> 1)",
    )
    parser.add_argument("--seeds", type=int, default=10, help="seeds per variant")
    parser.add_argument("--concurrency", type=int, default=None, help="trials in flight")
    parser.add_argument("--processes", type=int, default=2, help="replay processes")
    args = parser.parse_args(argv)
    res = run(args)
    return publish("search", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
