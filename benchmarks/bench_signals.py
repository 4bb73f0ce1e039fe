"""Stitch-point signals: which ranks stitched accuracy within a pair, and which pruning rule.

For every stitch point of the default space this computes each signal as the search computes
it before any trial (:mod:`evaluators.signals`; the study's calibration images): pooled CKA
(the ground truth's matrices, 512 images), per-position CKA (``flatten``, 512 images), the
least-squares residual and the KL divergence of the least-squares stitched network's outputs
from the back anchor's. It reports each signal's Spearman rank correlation with rung-0
accuracy (``ground_truth.json``) and rung-1, fine-tuned, accuracy (``rung1_ground_truth.json``)
within each ordered anchor pair (mean, min and per pair) and over all stitch points.

Then it applies pruning rules of each signal to the whole space (``top_k`` back cuts per front
cut, and ``depth``: the first Pareto layers of (signal, MACs) within each pair) and reports
what each removes and what it loses: the rung-1 and rung-0 true-front stitch points (anchors
never pruned), the rung-1 stitch-only front's points, and the rung-1 hypervolume. Target:
remove >= 40% and lose no true-front point at either rung.

    python -m benchmarks.bench_signals
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib import (
    DEFAULT_RUNG1,
    RESULTS,
    GroundTruth,
    Hypervolume,
    bench_parser,
    load_plan,
    machine_info,
    md_table,
    pareto_mask,
    publish,
    spearman,
    study_space,
)
from evaluators import (
    FIT_SIGNALS,
    cka_matrix,
    loader_identity,
    signals_cache_path,
    stitch_macs,
    stitch_signals,
)
from search.core import PruningRule, SearchSpace
from search.inputs import Plan

SIGNAL_NAMES = ("cka", "cka_flatten", "residual", "kl")
#: Signal -> (rule signal, higher is better).
DIRECTION = {"cka": True, "cka_flatten": True, "residual": False, "kl": False}


def compute_signals(
    plan: Plan, space: SearchSpace, gt: GroundTruth, cache: Path
) -> tuple[dict, dict, dict[str, Any]]:
    """Signal name -> pair -> matrix, MACs per pair, and how long the fits took.

    The time is the sum of the seconds each pair's cache entry records (the run that computed
    it), with the number of ordered pairs and how many of them this run computed.
    """
    loader = plan.data.calibration.subset(plan.study.pruning_images)
    cka_loader = plan.data.calibration.subset(plan.study.cka.images)
    out: dict[str, dict[tuple[str, str], np.ndarray]] = {n: {} for n in SIGNAL_NAMES}
    macs: dict[tuple[str, str], np.ndarray] = {}
    seconds = 0.0
    computed = 0
    for a, b in space.pairs():
        front, back = plan.anchors[a], plan.anchors[b]
        # The computing run's time, kept in the cache entry's sidecar.
        side = signals_cache_path(
            front,
            back,
            data_identity=loader_identity(loader),
            signals=FIT_SIGNALS,
            num_images=None,
            batch_size=getattr(loader, "batch_size", None),
            cache_dir=cache,
        ).with_suffix(".json")
        computed += not side.is_file()
        sig = stitch_signals(front, back, loader, cache_dir=cache)
        seconds += float(json.loads(side.read_text())["seconds"]) if side.is_file() else math.nan
        out["residual"][(a, b)], out["kl"][(a, b)] = sig["residual"], sig["kl"]
        out["cka"][(a, b)] = gt.cka[(a, b)]
        out["cka_flatten"][(a, b)] = cka_matrix(
            front, back, cka_loader, mode="flatten", cache_dir=cache
        )
        macs[(a, b)] = stitch_macs(front, back)
    return out, macs, {"seconds": seconds, "pairs": len(macs), "computed_now": computed}


def rung1_accuracy(path: Path, gt: GroundTruth) -> dict[str, float]:
    """Candidate key -> rung-1 validation accuracy (anchors: their rung-0 accuracy)."""
    raw = json.loads(Path(path).read_text())
    acc = {e["key"]: float(e["val_acc"]) for e in raw["entries"].values() if "error" not in e}
    out = {}
    for k, r in gt.records.items():
        out[k] = acc[k] if r["kind"] == "stitch" else float(r["val_acc"])
    return out


def correlations(signals, gt: GroundTruth, acc1: dict[str, float]) -> dict[str, Any]:
    """Spearman of each signal (oriented: higher is better) with rung-0 and rung-1 accuracy."""
    by_pair = defaultdict(list)
    for k in gt.stitch_keys():
        r = gt.records[k]
        by_pair[(r["front"], r["back"])].append(k)
    res: dict[str, Any] = {}
    for name in SIGNAL_NAMES:
        sign = 1.0 if DIRECTION[name] else -1.0

        def value(k: str, name=name, sign=sign) -> float:
            r = gt.records[k]
            return sign * float(
                signals[name][(r["front"], r["back"])][r["front_block"], r["back_block"]]
            )

        row: dict[str, Any] = {"per_pair": {}}
        for rung, acc in (
            ("rung0", {k: gt.records[k]["val_acc"] for k in gt.records}),
            ("rung1", acc1),
        ):
            per = {
                f"{a}|{b}": spearman([value(k) for k in ks], [acc[k] for k in ks])
                for (a, b), ks in by_pair.items()
            }
            vals = [v for v in per.values() if np.isfinite(v)]
            keys = gt.stitch_keys()
            row[rung] = {
                "within_pair_mean": float(np.mean(vals)),
                "within_pair_min": float(np.min(vals)),
                "all": spearman([value(k) for k in keys], [acc[k] for k in keys]),
            }
            row["per_pair"][rung] = per
        res[name] = row
    # MACs alone, for reference: bigger stitched networks fine-tune better within a pair.
    macs_row = {}
    for rung, acc in (
        ("rung0", {k: gt.records[k]["val_acc"] for k in gt.records}),
        ("rung1", acc1),
    ):
        per = [
            spearman([gt.records[k]["macs"] for k in ks], [acc[k] for k in ks])
            for ks in by_pair.values()
        ]
        macs_row[rung] = float(np.nanmean(per))
    res["_macs"] = macs_row
    # Rung-0 accuracy as a signal of rung-1 accuracy (what promotion ranks by).
    per = [
        spearman([gt.records[k]["val_acc"] for k in ks], [acc1[k] for k in ks])
        for ks in by_pair.values()
    ]
    res["_rung0_acc"] = {"rung1": float(np.nanmean(per))}
    return res


def _front(keys: list[str], acc: dict[str, float], gt: GroundTruth) -> set[str]:
    a = np.array([acc[k] for k in keys])
    m = np.array([gt.records[k]["macs"] for k in keys], dtype=float)
    return {k for k, f in zip(keys, pareto_mask(a, m), strict=True) if f}


def evaluate_rules(signals, macs, gt: GroundTruth, acc1: dict[str, float]) -> list[dict]:
    """Every rule of the sweep applied to the space, with what it removes and loses."""
    space = gt.space
    ok = gt.ok_keys()
    stitches = gt.stitch_keys()
    acc0 = {k: gt.records[k]["val_acc"] for k in ok}
    front1 = _front(ok, acc1, gt) & set(stitches)
    front0 = _front(ok, acc0, gt) & set(stitches)
    stitch_front1 = _front(stitches, acc1, gt)
    a1 = np.array([acc1[k] for k in ok])
    m_all = np.array([gt.records[k]["macs"] for k in ok], dtype=float)
    hv = Hypervolume.for_space(a1, m_all, gt.num_classes)
    full_hv = hv(*_points(_front(ok, acc1, gt), acc1, gt))
    rows = []
    for name in SIGNAL_NAMES:
        for rule in sweep(name, max(gt.depths.values())):
            kept = {c.key for c in rule.kept(space.all_candidates(), signals[name], macs)}
            kept_ok = [k for k in ok if k in kept]
            kept_hv = hv(*_points(_front(kept_ok, acc1, gt), acc1, gt))
            rows.append(
                {
                    "signal": name,
                    "top_k": rule.top_k,
                    "depth": rule.depth,
                    "removed": 1 - len(kept & set(stitches)) / len(stitches),
                    "removed_count": len(set(stitches) - kept),
                    "front1_lost": sorted(front1 - kept),
                    "front0_lost": sorted(front0 - kept),
                    "stitch_front1_lost": len(stitch_front1 - kept),
                    "stitch_front1_size": len(stitch_front1),
                    "hv1_lost": 1 - kept_hv / full_hv,
                }
            )
    return rows


def sweep(name: str, max_blocks: int) -> list[PruningRule]:
    """The rules of one signal: ``top_k`` 1 .. max_blocks - 1, then ``depth`` 1 .. 6."""
    rule_signal = "cka" if name.startswith("cka") else name
    threshold = 0.0 if DIRECTION[name] else None
    rules = [PruningRule(threshold, k, signal=rule_signal) for k in range(1, max_blocks)]
    rules += [PruningRule(threshold, None, signal=rule_signal, depth=d) for d in range(1, 7)]
    return rules


def heldout_pairs(
    signals, macs, gt: GroundTruth, acc1: dict[str, float], min_removed: float, study_rule: dict
) -> dict[str, Any]:
    """The rule choice checked on anchor pairs it did not see (leave one pair out).

    For each anchor pair (both orders), a rule is chosen on the other pairs alone: among the
    rules of the sweep that remove at least ``min_removed`` of their stitch points, the one
    losing the fewest points of their pair fronts (each pair's stitches and its two anchors,
    accuracy against MACs, rung 1 and rung 0 counted together), then the most removing. It
    is then applied to the held-out pair; the study's rule is applied to it as well.
    """
    space = gt.space
    by_pair: dict[tuple[str, str], list[str]] = defaultdict(list)
    for k in gt.stitch_keys():
        r = gt.records[k]
        by_pair[tuple(sorted((r["front"], r["back"])))].append(k)
    acc0 = {k: gt.records[k]["val_acc"] for k in gt.ok_keys()}
    fronts = {}
    for pair, ks in by_pair.items():
        keys = [*ks, *(f"anchor|{a}" for a in pair)]
        ok = [k for k in keys if k in acc0]
        fronts[pair] = (_front(ok, acc1, gt) & set(ks), _front(ok, acc0, gt) & set(ks))
    kept: dict[str, set[str]] = {}
    rules: dict[str, dict[str, Any]] = {}
    for name in SIGNAL_NAMES:
        for rule in sweep(name, max(gt.depths.values())):
            row = {"signal": name, "top_k": rule.top_k, "depth": rule.depth}
            label = _label(row)
            rules[label] = row
            kept[label] = {c.key for c in rule.kept(space.all_candidates(), signals[name], macs)}

    def score(label: str, pairs) -> dict[str, Any]:
        ks = [k for p in pairs for k in by_pair[p]]
        lost1 = sum(len(fronts[p][0] - kept[label]) for p in pairs)
        lost0 = sum(len(fronts[p][1] - kept[label]) for p in pairs)
        return {
            "removed": 1 - len(kept[label] & set(ks)) / len(ks),
            "lost1": lost1,
            "lost0": lost0,
            "front1": sum(len(fronts[p][0]) for p in pairs),
            "front0": sum(len(fronts[p][1]) for p in pairs),
        }

    study_label = _label(study_rule) if study_rule["signal"] in SIGNAL_NAMES else None
    if len(by_pair) < 2:  # nothing to choose on
        return {"study_rule": study_label, "folds": []}
    folds = []
    for held in sorted(by_pair):
        train = [p for p in by_pair if p != held]
        scores = {lb: score(lb, train) for lb in rules}
        eligible = [lb for lb, sc in scores.items() if sc["removed"] >= min_removed]
        chosen = min(
            eligible,
            key=lambda lb: (scores[lb]["lost1"] + scores[lb]["lost0"], -scores[lb]["removed"]),
            default=None,
        )
        folds.append(
            {
                "held_out": list(held),
                "chosen": chosen,
                "chosen_train": scores.get(chosen),
                "chosen_held_out": score(chosen, [held]) if chosen else None,
                "study_rule_held_out": score(study_label, [held]) if study_label else None,
            }
        )
    return {"study_rule": study_label, "folds": folds}


def _points(keys, acc, gt: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    keys = list(keys)
    return (
        np.array([acc[k] for k in keys], dtype=float),
        np.array([gt.records[k]["macs"] for k in keys], dtype=float),
    )


def meets(r: dict[str, Any], min_removed: float) -> bool:
    """The target: removes enough and loses no true-front stitch point at either rung."""
    return r["removed"] >= min_removed and not r["front1_lost"] and not r["front0_lost"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Signals, correlations, the rule sweep and the check of the study's rule."""
    plan = load_plan(args.study, args.budget_table)
    space = study_space(plan)
    gt = GroundTruth.load(args.ground_truth)
    acc1 = rung1_accuracy(args.rung1, gt)
    signals, macs, timing = compute_signals(plan, space, gt, args.cache)
    macs_match = all(
        float(macs[(r["front"], r["back"])][r["front_block"], r["back_block"]]) == r["macs"]
        for r in (gt.records[k] for k in gt.stitch_keys())
    )
    residual_diff = max(
        abs(
            float(signals["residual"][(r["front"], r["back"])][r["front_block"], r["back_block"]])
            - r["fit_residual"]["proj"]
        )
        for r in (gt.records[k] for k in gt.stitch_keys())
        if list(r["fit_residual"]) == ["proj"]
    )
    rows = evaluate_rules(signals, macs, gt, acc1)
    rule = plan.study.pruning_rule
    name = rule.signal
    study_row = next(
        (
            r
            for r in rows
            if r["signal"] == name and r["top_k"] == rule.top_k and r["depth"] == rule.depth
        ),
        None,
    )
    return {
        "machine": machine_info(),
        "ground_truth": str(args.ground_truth),
        "rung1": str(args.rung1),
        "stitches": len(gt.stitch_keys()),
        "images": plan.study.pruning_images,
        "cka_images": plan.study.cka.images,
        "signal_seconds": timing["seconds"],
        "signal_pairs": timing["pairs"],
        "signal_pairs_computed_now": timing["computed_now"],
        "macs_match_trials": macs_match,
        "residual_max_diff_to_trials": residual_diff,
        "correlation": correlations(signals, gt, acc1),
        "rules": rows,
        "min_removed": args.min_removed,
        "study_rule": {
            "signal": name,
            "top_k": rule.top_k,
            "depth": rule.depth,
            "threshold": rule.threshold,
        },
        "study_rule_result": study_row,
        "heldout_pairs": heldout_pairs(
            signals,
            macs,
            gt,
            acc1,
            args.min_removed,
            {"signal": name, "top_k": rule.top_k, "depth": rule.depth},
        ),
    }


def _label(r: dict[str, Any]) -> str:
    if r["depth"] is not None:
        return f"{r['signal']}, depth {r['depth']}"
    return f"{r['signal']}, top_k {r['top_k']}"


def _corr_cells(c: dict[str, float]) -> list[str]:
    return [f"{c['within_pair_mean']:.3f} / {c['within_pair_min']:.2f}", f"{c['all']:.3f}"]


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    corr = res["correlation"]
    lines = [
        f"Every stitch point of the default space ({res['stitches']}); signals computed as the "
        f"search computes them before any trial: least squares and KL on the "
        f"{res['images']} calibration images the trials fit on ({_timing(res)}; cached per "
        "pair like CKA), CKA on "
        f"{res['cka_images']}. The pre-search residual equals the trials' own (largest "
        f"difference {res['residual_max_diff_to_trials']:.1e}); the pre-search MACs "
        f"{'equal' if res['macs_match_trials'] else 'differ from'} the trials'. Spearman "
        "correlation with validation accuracy, signals oriented so that higher is better "
        "(`-residual`, `-kl`); rung 0: least squares only (section 1); rung 1: stitching layer "
        "fine-tuned (section 7).",
        "",
        md_table(
            [
                "signal",
                "rung 0: within pair (mean / min)",
                "rung 0: all",
                "rung 1: within pair (mean / min)",
                "rung 1: all",
            ],
            [
                [n, *_corr_cells(corr[n]["rung0"]), *_corr_cells(corr[n]["rung1"])]
                for n in SIGNAL_NAMES
            ],
        ),
        "",
        f"For reference, MACs alone: within-pair Spearman {corr['_macs']['rung0']:.3f} with "
        f"rung-0 and {corr['_macs']['rung1']:.3f} with rung-1 accuracy (bigger stitched "
        "networks fine-tune better); rung-0 accuracy itself ranks rung 1 at "
        f"{corr['_rung0_acc']['rung1']:.3f} within pairs (mean over the ordered pairs).",
        "",
        "Pruning rules of each signal (`depth d`: keep the first d Pareto layers of (signal, "
        "MACs) within each ordered pair; `top_k k`: the k best back cuts per front cut). "
        "`true front lost`: stitch points of the rung-1 / rung-0 true front (accuracy vs MACs, "
        "anchors included) the rule removes; `stitch front lost`: of the rung-1 stitch-only "
        "front; `HV lost`: rung-1 hypervolume of what is kept against the exhaustive.",
        "",
    ]
    heads = [
        "rule",
        "removed",
        "true front lost (rung 1 / rung 0)",
        "stitch front lost (rung 1)",
        "HV lost (rung 1)",
    ]
    body = []
    for r in res["rules"]:
        if r["depth"] is None and r["top_k"] not in (2, 3, 4):
            continue
        body.append(
            [
                _label(r),
                f"{r['removed']:.1%} ({r['removed_count']})",
                f"{len(r['front1_lost'])} / {len(r['front0_lost'])}",
                f"{r['stitch_front1_lost']} of {r['stitch_front1_size']}",
                f"{r['hv1_lost']:.2%}",
            ]
        )
    lines += [md_table(heads, body), ""]
    ok = [r for r in res["rules"] if meets(r, res["min_removed"])]
    best = {}
    for r in ok:
        if r["signal"] not in best or r["removed"] > best[r["signal"]]["removed"]:
            best[r["signal"]] = r
    lines.append(
        f"Rules meeting the target (remove >= {res['min_removed']:.0%}, lose no true-front "
        "point at either rung), the most removing per signal: "
        + ("; ".join(f"{_label(r)} ({r['removed']:.1%})" for r in best.values()) or "none")
        + "."
    )
    sr, srr = res["study_rule"], res["study_rule_result"]
    if srr is not None:
        verdict = "meets" if meets(srr, res["min_removed"]) else "does not meet"
        lines += [
            "",
            f"**The study's default rule, {_label(srr)}**, removes {srr['removed']:.1%} of the "
            f"stitch points, loses {len(srr['front1_lost'])} / {len(srr['front0_lost'])} rung-1 / "
            f"rung-0 true-front points, {srr['stitch_front1_lost']} of the "
            f"{srr['stitch_front1_size']} rung-1 stitch-only front points and "
            f"{srr['hv1_lost']:.2%} of the rung-1 hypervolume: it {verdict} the target.",
        ]
    else:
        lines += ["", f"The study's rule ({sr}) is not in the sweep."]
    lines += ["", *_heldout_lines(res)]
    return "\n".join(lines)


def _timing(res: dict[str, Any]) -> str:
    """How long the signals took, and where that time was measured."""
    n, now = res["signal_pairs"], res["signal_pairs_computed_now"]
    m = res["machine"]
    if now == n:
        where = f"computed in this run, {m['cpu']}, {m['cores']} cores"
    elif now == 0:
        where = "read from the cache: the seconds its entries recorded when computed"
    else:
        where = f"{now} of them computed in this run, the others' seconds from the cache"
    return f"all {n} ordered pairs in {res['signal_seconds']:.0f} s when not cached, {where}"


def _heldout_lines(res: dict[str, Any]) -> list[str]:
    """The leave-one-pair-out check of the rule choice."""
    ho = res.get("heldout_pairs")
    if not ho or not ho["folds"]:
        return []

    def lost(sc: dict[str, Any] | None) -> str:
        if sc is None:
            return "-"
        return f"{sc['lost1']} of {sc['front1']} / {sc['lost0']} of {sc['front0']}"

    rows = []
    for f in ho["folds"]:
        ch, st = f["chosen_held_out"], f["study_rule_held_out"]
        rows.append(
            [
                " + ".join(f["held_out"]),
                f"{f['chosen'] or 'none'}",
                "-" if ch is None else f"{ch['removed']:.1%}",
                lost(ch),
                "-" if st is None else f"{st['removed']:.1%}",
                lost(st),
            ]
        )
    same = sum(f["chosen"] == ho["study_rule"] for f in ho["folds"])
    tot = {
        key: sum(f[key]["lost1"] + f[key]["lost0"] for f in ho["folds"] if f[key])
        for key in ("chosen_held_out", "study_rule_held_out")
    }
    fronts = sum(
        f["study_rule_held_out"]["front1"] + f["study_rule_held_out"]["front0"]
        for f in ho["folds"]
        if f["study_rule_held_out"]
    )
    return [
        "**Held-out pairs.** The rule above was chosen on the same table it is scored on. "
        "Here each anchor pair (both orders) is held out in turn: a rule is chosen on the "
        f"other pairs alone (of the rules removing >= {res['min_removed']:.0%} of their stitch "
        "points, the one losing the fewest points of their pair fronts, rung 1 and rung 0 "
        "together, then the most removing; a pair front is the pair's stitches and its two "
        "anchors, accuracy against MACs) and applied to the held-out pair, beside the study's "
        "rule. `lost`: pair-front stitch points removed, rung 1 / rung 0.",
        "",
        md_table(
            [
                "held-out pair",
                "rule chosen without it",
                "removed",
                "lost",
                f"{ho['study_rule'] or 'study rule'}: removed",
                "lost",
            ],
            rows,
        ),
        "",
        f"The choice made without a pair is the study's rule ({ho['study_rule']}) in {same} "
        f"of {len(ho['folds'])} folds. On the held-out pairs the chosen rules lose "
        f"{tot['chosen_held_out']} pair-front points in all and the study's rule "
        f"{tot['study_rule_held_out']} (of {fronts}, both rungs).",
    ]


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "signals")
    parser.add_argument("--rung1", type=Path, default=DEFAULT_RUNG1, help="rung-1 ground truth")
    parser.add_argument("--min-removed", type=float, default=0.4, help="target: removed share")
    parser.add_argument(
        "--cache", type=Path, default=RESULTS / "cache" / "signals", help="signal cache"
    )
    args = parser.parse_args(argv)
    res = run(args)
    return publish("signals", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
