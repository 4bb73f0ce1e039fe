"""CKA pruning: how much of the space each rule removes and how much front it costs.

For every rule of a sweep (a CKA ``threshold``, keeping the ``top_k`` back cuts per front
cut, and both combined) this applies :class:`search.core.PruningRule` to the ground truth
(the CKA matrices the search computes) and reports the share of stitch points removed and
what survives: the hypervolume of the front of the kept candidates (anchors are never
pruned) against the exhaustive front's, the share of the hypervolume beyond the anchors'
that survives, the same loss for the stitch-only front, and the front points lost.

The target is the issue's (remove at least ``--min-removed``, lose at most ``--max-loss``
of the front's hypervolume), applied strictly: to the front and to the stitch-only front
(where the anchors dominate the front, the first alone is met by pruning nearly
everything). The chosen rule removes the most among those meeting it; the script says so
when none does. Then the study's sampler and random search are replayed (as in
``bench_search``) at the study's ``trials`` with no pruning, the ``--compare`` rules and the
chosen one, which shows what a rule does to an actual search. The script does not edit
``studies/default.yaml``.

    python -m benchmarks.bench_pruning
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import numpy as np

from benchmarks.lib import (
    MEASURES,
    GroundTruth,
    bench_parser,
    cka_accuracy_correlation,
    machine_info,
    md_table,
    mean_std,
    publish,
    replay_all,
    score_runs,
)
from search.core import PruningRule
from search.inputs import load_study

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))


def evaluate_rule(gt: GroundTruth, threshold: float, top_k: int | None) -> dict[str, Any]:
    """Removed fraction, kept hypervolume fraction and front points lost of one rule."""
    rule = PruningRule(threshold, top_k)
    space = gt.space
    stitches = [c for c in space.all_candidates() if not c.is_anchor]
    kept = rule.kept(space.all_candidates(), gt.cka)
    kept_keys = {c.key for c in kept}
    hv = gt.hypervolume()
    front = gt.front_keys()
    stitch_front = gt.front_keys(gt.stitch_keys())
    full = hv(*gt.points(front))
    anchors = hv(*gt.points(gt.anchor_keys()))
    ok = [k for k in gt.ok_keys() if k in kept_keys]
    kept_hv = hv(*gt.points(gt.front_keys(ok)))
    ok_st = [k for k in gt.stitch_keys() if k in kept_keys]
    kept_st = hv(*gt.points(gt.front_keys(ok_st))) if ok_st else 0.0
    return {
        "threshold": threshold,
        "top_k": top_k,
        "removed": 1 - (len(kept) - len(space.anchors())) / len(stitches),
        "removed_count": len(stitches) - (len(kept) - len(space.anchors())),
        "hv_fraction": kept_hv / full,
        "gain": (kept_hv - anchors) / (full - anchors) if full > anchors else 1.0,
        "stitch_hv_fraction": kept_st / hv(*gt.points(stitch_front)),
        "front_lost": len(set(front) - kept_keys),
        "stitch_front_lost": len(set(stitch_front) - kept_keys),
    }


def sweep(gt: GroundTruth) -> list[dict[str, Any]]:
    """Threshold, top-k and combined rules."""
    max_nb = max(gt.depths.values())
    rules: list[tuple[float, int | None]] = [(t, None) for t in THRESHOLDS]
    rules += [(0.0, k) for k in range(1, max_nb)]
    rules += [(t, k) for t in THRESHOLDS for k in range(1, min(max_nb, 5))]
    return [evaluate_rule(gt, t, k) for t, k in rules]


def meets(r: dict[str, Any], min_removed: float, max_loss: float, *, strict: bool) -> bool:
    """The issue's target (removed share, front hypervolume lost); ``strict`` adds the same
    loss bound on the stitch-only front's hypervolume."""
    ok = r["removed"] >= min_removed and 1 - r["hv_fraction"] <= max_loss + 1e-12
    if strict:
        ok = ok and 1 - r["stitch_hv_fraction"] <= max_loss + 1e-12
    return ok


def choose(
    rows: list[dict[str, Any]], min_removed: float, max_loss: float, *, strict: bool = True
) -> dict | None:
    """The rule removing the most among those meeting the target (ties: more kept)."""
    ok = [r for r in rows if meets(r, min_removed, max_loss, strict=strict)]
    if not ok:
        return None
    return max(
        ok,
        key=lambda r: (round(r["removed"], 6), r["stitch_hv_fraction"], -r["threshold"]),
    )


def _rule_label(r: dict[str, Any]) -> str:
    parts: list[str] = []
    if r["threshold"] > 0:
        parts.append(f"threshold {r['threshold']:g}")
    if r["top_k"] is not None:
        parts.append(f"top_k {r['top_k']}")
    return " + ".join(parts) or "none"


def _row(r: dict[str, Any]) -> list[str]:
    return [
        _rule_label(r),
        f"{r['removed']:.1%} ({r['removed_count']})",
        f"{1 - r['hv_fraction']:.2%}",
        f"{r['gain']:.2f}",
        f"{1 - r['stitch_hv_fraction']:.2%}",
        f"{r['front_lost']} / {r['stitch_front_lost']}",
    ]


HEADS = [
    "rule",
    "stitches removed",
    "front HV lost",
    "gain kept",
    "stitch-front HV lost",
    "front / stitch-front pts lost",
]


def _suffix(r: dict[str, Any]) -> str:
    out = f"t{r['threshold']:g}" if r["threshold"] > 0 else ""
    out += f"k{r['top_k']}" if r["top_k"] is not None else ""
    return out or "none"


def search_with_rules(args: argparse.Namespace, rules: list[dict[str, Any]]) -> dict[str, Any]:
    """Replays the study's sampler and random search under each rule at the study's trials."""
    study = load_study(args.study)
    gt = GroundTruth.load(args.ground_truth)
    variants = [f"{s}@{_suffix(r)}" for r in rules for s in ("default", "random")]
    budget = study.trials
    names, resolved, runs = replay_all(
        args.ground_truth,
        args.budget_table,
        variants,
        seeds=args.search_seeds,
        total=budget,
        concurrency=study.workers,
        study_sampler=study.sampler,
        study_rule={"threshold": 0.0, "top_k": None},
        processes=args.processes,
    )
    summary = score_runs(gt, names, runs, [budget], [str(budget)])
    return {
        "budget": budget,
        "seeds": args.search_seeds,
        "sampler": study.sampler,
        "variants": names,
        "resolved": resolved,
        "measures": list(MEASURES),
        "summary": summary,
    }


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    rows = res["rules"]
    singles = [r for r in rows if r["top_k"] is None or r["threshold"] == 0]
    lines = [
        f"{res['stitches']} stitch points; CKA from {res['cka_images']} images per ordered "
        "pair (pooled features, unbiased minibatch HSIC), computed once per pair "
        f"({res['cka_seconds']:.1f} s for all pairs when not cached). For each rule, applied "
        "to the whole space (anchors are never pruned): `front HV lost`, the hypervolume of "
        "the front of what it keeps against the exhaustive front's (the issue's measure; the "
        f"anchors alone hold {res['anchors_hv_fraction']:.3f} of it on this zoo, so it "
        "moves little); `gain kept`, the share of the hypervolume beyond the anchors' that "
        "survives; `stitch-front HV lost`, the same as `front HV lost` for the stitch-only "
        f"front. Target: remove >= {res['min_removed']:.0%} and lose <= {res['max_loss']:.0%}"
        "; the chosen rule must meet it on both the front and the stitch-only front.",
        "",
        md_table(HEADS, [_row(r) for r in singles]),
        "",
    ]
    combos = [
        r
        for r in rows
        if r["top_k"] is not None
        and r["threshold"] > 0
        and meets(r, res["min_removed"], res["max_loss"], strict=True)
    ]
    combos.sort(key=lambda r: -r["removed"])
    if combos:
        lines += [
            "Combined rules meeting the strict target (most removed first, top 5):",
            "",
            md_table(HEADS, [_row(r) for r in combos[:5]]),
            "",
        ]
    corr = res["correlation"]
    lines.append(
        f"Spearman correlation of CKA with stitched accuracy: {corr['all']:.3f} over all "
        f"stitch points, {corr['per_pair_mean']:.3f} within ordered pairs (mean)."
    )
    lines.append("")
    loose = res["loose_count"]
    chosen = res["chosen"]
    if chosen is None:
        lines.append(
            f"**No rule meets the strict target** ({loose} rules meet the issue's literal "
            "one, which the anchors make easy here)."
        )
    else:
        lines.append(
            f"**Best rule on the strict target: {_rule_label(chosen)}**: removes "
            f"{chosen['removed']:.1%} of the stitch points, loses "
            f"{1 - chosen['hv_fraction']:.2%} of the front's hypervolume and "
            f"{1 - chosen['stitch_hv_fraction']:.2%} of the stitch-only front's "
            f"({loose} rules meet the issue's literal target)."
        )
    if "search" in res:
        lines += _search_lines(res)
    return "\n".join(lines)


def _search_lines(res: dict[str, Any]) -> list[str]:
    """What each rule does to a search of the study's size, and the recommended rule."""
    rows = res["rules"]
    sr = res["search"]
    b = str(sr["budget"])
    srows = []
    for v in sr["variants"]:
        pb = sr["summary"][v]["per_budget"][b]
        rv = sr["resolved"][v]
        srows.append(
            (
                "study sampler" if rv["sampler"] == "default" else rv["sampler"],
                _rule_label(rv["rule"]),
                mean_std(pb["hv_fraction"]),
                mean_std(pb["gain"], "{:.2f}"),
                mean_std(pb["stitch_hv_fraction"]),
                mean_std(pb["stitch_front_found"], "{:.1f}"),
            )
        )
    lines = [
        "",
        f"What the rule does to a search of the study's size ({sr['budget']} evaluations, "
        f"the `{sr['sampler']}` sampler of the study and random search, {sr['seeds']} seeds, "
        "mean ± std; replayed as in section 2):",
        "",
        md_table(
            ["sampler", "rule", "HV", "gain", "stitch HV", "stitch-front pts"],
            srows,
        ),
    ]
    rec = res["recommended"]
    same = [r for r in rows if (r["threshold"], r["top_k"]) == (rec["threshold"], rec["top_k"])]
    stats = same[0] if same else None
    text = (
        f"**Recommended rule: {_rule_label(rec)}**: the study's sampler finds the most "
        f"under it at the study's size (gain {rec['gain']:.2f}, stitch HV "
        f"{rec['stitch_hv_fraction']:.3f}, means over seeds)"
    )
    if stats is not None:
        target = meets(stats, res["min_removed"], res["max_loss"], strict=False)
        text += (
            f"; it removes {stats['removed']:.1%} of the stitch points, loses "
            f"{1 - stats['hv_fraction']:.2%} of the front's hypervolume and "
            f"{stats['front_lost']} / {stats['stitch_front_lost']} front / stitch-front "
            f"points, and {'meets' if target else 'does not meet'} the issue's target"
        )
    lines += ["", text + "."]
    return lines


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The sweep, the choice and the search comparison."""
    gt = GroundTruth.load(args.ground_truth)
    rows = sweep(gt)
    chosen = choose(rows, args.min_removed, args.max_loss, strict=True)
    hv = gt.hypervolume()
    res: dict[str, Any] = {
        "machine": machine_info(),
        "ground_truth": str(args.ground_truth),
        "stitches": len(gt.records) - len(gt.depths),
        "cka_images": gt.meta["settings"]["cka_images"],
        "cka_seconds": gt.raw.get("cka_seconds", float("nan")),
        "min_removed": args.min_removed,
        "max_loss": args.max_loss,
        "anchors_hv_fraction": hv(*gt.points(gt.anchor_keys())) / hv(*gt.points(gt.front_keys())),
        "rules": rows,
        "chosen": chosen,
        "loose_count": sum(meets(r, args.min_removed, args.max_loss, strict=False) for r in rows),
        "correlation": cka_accuracy_correlation(gt),
    }
    if args.search_seeds > 0:
        picks = [{"threshold": 0.0, "top_k": None}]
        for t, k in args.compare:
            picks.append({"threshold": t, "top_k": k})
        if chosen is not None:
            picks.append({"threshold": chosen["threshold"], "top_k": chosen["top_k"]})
        unique = list({(p["threshold"], p["top_k"]): p for p in picks}.values())
        res["search"] = search_with_rules(args, unique)
        res["recommended"] = recommend(res["search"])
    return res


def recommend(search: dict[str, Any]) -> dict[str, Any]:
    """The rule under which the study's sampler does best at the study's size.

    Best: the highest mean ``gain`` (hypervolume found beyond the anchors'), then the highest
    mean stitch-front hypervolume. This, not the removal target, sets the study's default:
    a rule that removes much but takes the best stitch points with it makes the search worse.
    """
    b = str(search["budget"])

    def score(v: str) -> tuple[float, float]:
        pb = search["summary"][v]["per_budget"][b]
        return float(np.mean(pb["gain"])), float(np.mean(pb["stitch_hv_fraction"]))

    mine = [v for v in search["variants"] if search["resolved"][v]["sampler"] == "default"]
    best = max(mine, key=score)
    gain, stitch_hv = score(best)
    return {**search["resolved"][best]["rule"], "gain": gain, "stitch_hv_fraction": stitch_hv}


def _rule_arg(text: str) -> tuple[float, int | None]:
    s = text.strip()
    t = re.search(r"t([0-9.]+)", s)
    k = re.search(r"k([0-9]+)", s)
    if not (t or k):
        raise argparse.ArgumentTypeError(f"a rule is t0.5, k3 or t0.5k3, got {text!r}")
    return float(t.group(1)) if t else 0.0, int(k.group(1)) if k else None


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "pruning")
    parser.add_argument("--min-removed", type=float, default=0.4, help="target: removed share")
    parser.add_argument("--max-loss", type=float, default=0.01, help="target: HV loss at most")
    parser.add_argument(
        "--search-seeds", type=int, default=10, help="seeds of the search comparison (0: skip)"
    )
    parser.add_argument(
        "--compare",
        type=lambda s: [_rule_arg(x) for x in s.split(",") if x.strip()],
        default=[(0.0, 3), (0.0, 4), (0.0, 5), (0.5, None)],
        help="rules the search comparison also runs (t0.5, k3, t0.5k3; comma-separated)",
    )
    parser.add_argument("--processes", type=int, default=2, help="replay processes")
    args = parser.parse_args(argv)
    res = run(args)
    return publish("pruning", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
