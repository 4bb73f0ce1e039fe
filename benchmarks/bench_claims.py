"""The stitching papers' claims, checked on the study's zoo.

(a) **Stitches fill the gap between anchors** (SN-Net): true-front points strictly between
    the smallest and the largest anchor's MACs, and their accuracy against the straight line
    joining those two anchors (accuracy linear in MACs); the same for each anchor pair's own
    space (its two anchors and the stitches of both orders).
(b) **CKA chooses good stitch points** (ReStNet): within each ordered pair, stitch points are
    grouped by MACs (a group spans at most ``--macs-tol`` relative MACs); in each group of two
    or more, the point with the highest CKA is compared with a random point of the group
    (its expected accuracy is the group mean) and with the group's best.
(c) **Stitching order** (SN-Net: small->large; ReStNet: large->small): for each anchor pair,
    every stitch point of one order is matched with the points of the other order within
    ``--macs-tol`` of its MACs, and accuracies compared (large->small minus small->large,
    against the best match); and each order's own hypervolume.
(d) **Initialisation** (SN-Net: least squares beats random; ReStNet: stitch-only
    fine-tuning): a seeded sample of stitch points evaluated with the stitching layer at
    PyTorch's default (random) initialisation, least squares, least squares plus
    ``--ft-steps`` fine-tuning steps, and random initialisation plus the same fine-tuning
    (AdamW, the study's ``fit.lr``, cross-entropy on the calibration images).

(a) to (c) read the ground truth only; (d) evaluates ``--sample`` stitch points four ways.

    python -m benchmarks.bench_claims
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks.lib import (
    GroundTruth,
    bench_parser,
    cka_accuracy_correlation,
    load_plan,
    machine_info,
    md_table,
    pareto_mask,
    plan_with_calibration,
    publish,
    sample_stitches,
)
from evaluators import accuracy, finetune_stitch, fit_stitch
from search.execution import trial_data
from search.inputs import Plan
from space import build_stitched


# --------------------------------------------------------------------------- (a)
def _gap(gt: GroundTruth, keys: list[str], anchors: list[str]) -> dict[str, Any]:
    """Front points between the smallest and largest of ``anchors`` and the straight line."""
    pts = {a: gt.records[f"anchor|{a}"] for a in anchors}
    small = min(anchors, key=lambda a: pts[a]["macs"])
    large = max(anchors, key=lambda a: pts[a]["macs"])
    ms, mL = pts[small]["macs"], pts[large]["macs"]
    accs, accL = pts[small]["val_acc"], pts[large]["val_acc"]
    front = gt.front_keys(keys)
    inside = [k for k in front if ms < gt.records[k]["macs"] < mL]
    between = [k for k in inside if gt.records[k]["kind"] == "stitch"]
    deltas = []
    for k in between:
        r = gt.records[k]
        line = accs + (accL - accs) * (r["macs"] - ms) / (mL - ms)
        deltas.append(r["val_acc"] - line)
    below = [k for k in front if gt.records[k]["macs"] < ms]
    return {
        "small": small,
        "large": large,
        "front_size": len(front),
        "between": len(between),
        "above_line": int(sum(d > 0 for d in deltas)),
        "delta_mean": float(np.mean(deltas)) if deltas else None,
        "delta_min": float(np.min(deltas)) if deltas else None,
        "delta_max": float(np.max(deltas)) if deltas else None,
        "anchors_between": len(inside) - len(between),
        "small_acc": accs,
        "large_acc": accL,
        "below_smallest": len(below),
        "between_keys": between,
    }


def claim_a(gt: GroundTruth) -> dict[str, Any]:
    """Gap filling over the whole zoo and per anchor pair."""
    names = gt.anchor_names()
    out = {"zoo": _gap(gt, gt.ok_keys(), names), "pairs": {}}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            keys = [
                k for k in gt.ok_keys() if {gt.records[k]["front"], gt.records[k]["back"]} <= {a, b}
            ]
            out["pairs"][f"{a}+{b}"] = _gap(gt, keys, [a, b])
    return out


# --------------------------------------------------------------------------- (b)
def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def macs_groups(recs: list[dict[str, Any]], tol: float) -> list[list[dict[str, Any]]]:
    """Greedy groups by MACs: each spans ``[m, m * (1 + tol)]`` from its smallest member."""
    recs = sorted(recs, key=lambda r: r["macs"])
    groups, cur = [], []
    for r in recs:
        if cur and r["macs"] > cur[0]["macs"] * (1 + tol):
            groups.append(cur)
            cur = []
        cur.append(r)
    if cur:
        groups.append(cur)
    return groups


def claim_b(gt: GroundTruth, tol: float) -> dict[str, Any]:
    """CKA-chosen against random stitch points at matched MACs."""
    rows = []
    for a, b in gt.space.pairs():
        recs = [
            r
            for r in gt.records.values()
            if r["kind"] == "stitch" and r["front"] == a and r["back"] == b and "error" not in r
        ]
        for g in macs_groups(recs, tol):
            if len(g) < 2:
                continue
            pick = max(g, key=lambda r: r["cka"])
            accs = [r["val_acc"] for r in g]
            rows.append(
                {
                    "pair": f"{a}->{b}",
                    "size": len(g),
                    "cka_acc": pick["val_acc"],
                    "random_acc": float(np.mean(accs)),
                    "best_acc": float(np.max(accs)),
                    "cka_is_best": pick["val_acc"] == max(accs),
                }
            )
    d = [r["cka_acc"] - r["random_acc"] for r in rows]
    return {
        "groups": len(rows),
        "points": int(sum(r["size"] for r in rows)),
        "delta_mean": float(np.mean(d)) if d else None,
        "delta_median": float(np.median(d)) if d else None,
        "wins": int(sum(x > 0 for x in d)),
        "losses": int(sum(x < 0 for x in d)),
        "cka_is_best": int(sum(r["cka_is_best"] for r in rows)),
        "regret_cka": _mean([r["best_acc"] - r["cka_acc"] for r in rows]),
        "regret_random": _mean([r["best_acc"] - r["random_acc"] for r in rows]),
        "rows": rows,
    }


# --------------------------------------------------------------------------- (c)
def claim_c(gt: GroundTruth, tol: float) -> dict[str, Any]:
    """Large->small against small->large stitching at matched MACs, per anchor pair."""
    hv = gt.hypervolume()
    names = gt.anchor_names()
    pairs = {}
    all_d: list[float] = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ma, mb = gt.records[f"anchor|{a}"]["macs"], gt.records[f"anchor|{b}"]["macs"]
            small, large = (a, b) if ma <= mb else (b, a)

            def stitches(f: str, bk: str) -> list[dict[str, Any]]:
                return [
                    r
                    for r in gt.records.values()
                    if r["kind"] == "stitch"
                    and r["front"] == f
                    and r["back"] == bk
                    and "error" not in r
                ]

            ls, sl = stitches(large, small), stitches(small, large)
            deltas = []
            for x in ls:
                match = [y for y in sl if abs(y["macs"] / x["macs"] - 1) <= tol]
                if match:
                    deltas.append(x["val_acc"] - max(y["val_acc"] for y in match))
            for y in sl:
                match = [x for x in ls if abs(x["macs"] / y["macs"] - 1) <= tol]
                if match:
                    deltas.append(max(x["val_acc"] for x in match) - y["val_acc"])

            def order_hv(rs: list[dict[str, Any]]) -> float:
                if not rs:
                    return 0.0
                acc = np.array([r["val_acc"] for r in rs])
                macs = np.array([r["macs"] for r in rs])
                return hv(acc, macs)

            def front_in_pair(rs_a, rs_b) -> tuple[int, int]:
                both = rs_a + rs_b
                mask = pareto_mask([r["val_acc"] for r in both], [r["macs"] for r in both])
                return int(mask[: len(rs_a)].sum()), int(mask[len(rs_a) :].sum())

            f_ls, f_sl = front_in_pair(ls, sl)
            all_d += deltas
            pairs[f"{small}+{large}"] = {
                "small": small,
                "large": large,
                "matched": len(deltas),
                "delta_mean": float(np.mean(deltas)) if deltas else None,
                "ls_wins": int(sum(d > 0 for d in deltas)),
                "sl_wins": int(sum(d < 0 for d in deltas)),
                "hv_large_small": order_hv(ls),
                "hv_small_large": order_hv(sl),
                "front_large_small": f_ls,
                "front_small_large": f_sl,
            }
    return {
        "pairs": pairs,
        "matched": len(all_d),
        "delta_mean": float(np.mean(all_d)) if all_d else None,
        "ls_wins": int(sum(d > 0 for d in all_d)),
        "sl_wins": int(sum(d < 0 for d in all_d)),
    }


# --------------------------------------------------------------------------- (d)
def claim_d(args: argparse.Namespace, gt: GroundTruth, plan: Plan) -> dict[str, Any]:
    """Random init, least squares, least squares + fine-tuning, random + fine-tuning.

    On ``--sample`` stitch points of ``gt``'s space, with ``plan``'s anchors, data and lr.
    """
    data = trial_data(plan)
    lr = plan.study.fit.lr
    space = gt.space
    cands = sample_stitches(space, args.sample, args.seed)
    rows = []
    for i, c in enumerate(cands, 1):
        front, back = plan.anchors[c.front], plan.anchors[c.back]
        row: dict[str, Any] = {"key": c.key, "label": c.label}
        for setting in ("random", "ls", "ls_ft", "random_ft"):
            torch.manual_seed(args.seed * 1000 + i)
            net = build_stitched(front, back, c.config)
            t0 = time.perf_counter()
            try:
                if setting in ("ls", "ls_ft"):
                    steps = args.ft_steps if setting == "ls_ft" else 0
                    fit_stitch(net, data.calibration, steps=steps, lr=lr)
                elif setting == "random_ft":
                    finetune_stitch(
                        net,
                        data.calibration,
                        cached=False,
                        steps=args.ft_steps,
                        lr=lr,
                        weight_decay=0.0,
                        device=torch.device("cpu"),
                    )
                fit_s = time.perf_counter() - t0
                acc = accuracy(net, data.validation, input_size=net.input_size).top1
            except ValueError as e:  # non-finite logits or a diverged fine-tuning
                fit_s, acc = time.perf_counter() - t0, None
                row[f"{setting}_error"] = str(e)
            row[setting] = acc
            row[f"{setting}_fit_seconds"] = fit_s
        rows.append(row)
        print(f"\r  (d) {i}/{len(cands)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    settings = ("random", "ls", "ls_ft", "random_ft")

    def col(s: str) -> list[float]:
        return [r[s] if r[s] is not None else 100.0 / gt.num_classes for r in rows]

    out: dict[str, Any] = {"sample": len(rows), "ft_steps": args.ft_steps, "lr": lr, "rows": rows}
    for s in settings:
        out[f"{s}_mean"] = float(np.mean(col(s)))
        out[f"{s}_fit_seconds_mean"] = float(np.mean([r[f"{s}_fit_seconds"] for r in rows]))
        out[f"{s}_failed"] = int(sum(r[s] is None for r in rows))
    ls = np.array(col("ls"))
    out["ls_beats_random"] = int((ls > np.array(col("random"))).sum())
    out["ls_ft_beats_ls"] = int((np.array(col("ls_ft")) > ls).sum())
    out["ls_ft_beats_random_ft"] = int((np.array(col("ls_ft")) > np.array(col("random_ft"))).sum())
    return out


def claim_d_front(args: argparse.Namespace, gt: GroundTruth, base: Plan) -> dict[str, Any]:
    """What fine-tuning does to the best stitches: the stitch-only front, refitted.

    Each point of the ground truth's stitch-only front is fitted with least squares alone and
    with ``--ft-steps`` fine-tuning steps, on the study's calibration images and on
    ``--ft-calibration`` images, and validated as the search validates. ``base`` is the
    study's plan.
    """
    cands = {c.key: c for c in gt.space.all_candidates()}
    keys = sorted(gt.front_keys(gt.stitch_keys()), key=lambda k: gt.records[k]["macs"])
    plans = {base.study.data.calibration: base}
    if args.ft_calibration not in plans:
        plans[args.ft_calibration] = plan_with_calibration(
            args.study, args.budget_table, args.ft_calibration
        )
    sizes = list(plans)
    rows = []
    for k in keys:
        c = cands[k]
        row: dict[str, Any] = {"key": k, "label": c.label, "macs": gt.records[k]["macs"]}
        row["ground_truth"] = gt.records[k]["val_acc"]
        for n, plan in plans.items():
            data = trial_data(plan)
            for steps in (0, args.ft_steps):
                torch.manual_seed(args.seed)
                net = build_stitched(plan.anchors[c.front], plan.anchors[c.back], c.config)
                t0 = time.perf_counter()
                fit_stitch(net, data.calibration, steps=steps, lr=plan.study.fit.lr)
                fit_s = time.perf_counter() - t0
                acc = accuracy(net, data.validation, input_size=net.input_size).top1
                row[f"cal{n}_steps{steps}"] = acc
                row[f"cal{n}_steps{steps}_seconds"] = fit_s
        rows.append(row)
        print(f"\r  (d, front) {len(rows)}/{len(keys)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    others = gt.ok_keys()
    acc_all, macs_all = gt.points(others)
    summary = {}
    for n in sizes:
        for steps in (0, args.ft_steps):
            col = f"cal{n}_steps{steps}"
            deltas = [r[col] - r["ground_truth"] for r in rows]
            # would the refitted point be on the true front (every other point as measured)?
            on_front = 0
            for r in rows:
                i = others.index(r["key"])
                acc = acc_all.copy()
                acc[i] = r[col]
                on_front += bool(pareto_mask(acc, macs_all)[i])
            summary[col] = {
                "delta_mean": float(np.mean(deltas)) if deltas else None,
                "delta_min": float(np.min(deltas)) if deltas else None,
                "delta_max": float(np.max(deltas)) if deltas else None,
                "on_true_front": on_front,
                "seconds_mean": float(np.mean([r[f"{col}_seconds"] for r in rows]))
                if rows
                else None,
            }
    return {
        "calibration_sizes": sizes,
        "ft_steps": args.ft_steps,
        "rows": rows,
        "summary": summary,
        "true_front_stitches": sum(gt.records[k]["kind"] == "stitch" for k in gt.front_keys()),
    }


# --------------------------------------------------------------------------- output
def _pp(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f} pp"


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    lines = [*_markdown_a(res), "", *_markdown_b(res), "", *_markdown_c(res)]
    if "d" in res:
        lines += ["", *_markdown_d(res["d"])]
    if "d_front" in res:
        lines += ["", *_markdown_d_front(res["d_front"])]
    return "\n".join(lines)


def _markdown_a(res: dict[str, Any]) -> list[str]:
    """(a): the gap between the anchors, over the zoo and per pair."""
    a = res["a"]
    z = a["zoo"]
    return [
        "**(a) Stitches fill the gap between anchors.** Over the whole zoo, the true front has "
        f"{z['front_size']} points; **{z['between']} stitched network(s) lie strictly "
        f"between** the smallest anchor ({z['small']}, {z['small_acc']:.2f}%) and the largest "
        f"({z['large']}, {z['large_acc']:.2f}%) in MACs (and {z['anchors_between']} anchor(s)), "
        f"{z['above_line']} of them above the straight line joining those two anchors "
        f"(accuracy minus the line: mean {_pp(z['delta_mean'])}, range {_pp(z['delta_min'])} "
        f"to {_pp(z['delta_max'])}); {z['below_smallest']} front point(s) are smaller than the "
        "smallest anchor. Per anchor pair (its two anchors and the stitches of both orders; "
        "stitched front points only):",
        "",
        md_table(
            [
                "pair (small+large)",
                "anchor acc small / large",
                "front pts",
                "stitches strictly between",
                "above the line",
                "mean vs line",
                "smaller than small",
            ],
            [
                (
                    f"{g['small']}+{g['large']}",
                    f"{g['small_acc']:.2f}% / {g['large_acc']:.2f}%",
                    g["front_size"],
                    g["between"],
                    g["above_line"],
                    _pp(g["delta_mean"]),
                    g["below_smallest"],
                )
                for g in a["pairs"].values()
            ],
        ),
    ]


def _markdown_b(res: dict[str, Any]) -> list[str]:
    """(b): CKA-chosen against random stitch points."""
    b, tol = res["b"], res["macs_tol"]
    return [
        f"**(b) CKA-chosen against random stitch points at matched MACs.** {b['groups']} groups "
        f"({b['points']} stitch points) of one ordered pair within {tol:.0%} MACs of each other. "
        f"The highest-CKA point's accuracy minus a random point's (the group mean): mean "
        f"{_pp(b['delta_mean'])}, median {_pp(b['delta_median'])}; CKA better in {b['wins']} "
        f"groups, worse in {b['losses']}; it is the group's best in {b['cka_is_best']}. Mean "
        f"regret against the group's best: CKA {_pp(b['regret_cka'])}, random "
        f"{_pp(b['regret_random'])}. Spearman correlation of CKA with accuracy: "
        f"{res['correlation']['all']:.3f} overall, {res['correlation']['per_pair_mean']:.3f} "
        "within ordered pairs (mean).",
    ]


def _markdown_c(res: dict[str, Any]) -> list[str]:
    """(c): stitching order at matched MACs."""
    c, tol = res["c"], res["macs_tol"]
    return [
        f"**(c) Stitching order at matched MACs.** Each stitch point is compared with the best "
        f"point of the other order within {tol:.0%} of its MACs (large->small minus "
        f"small->large); HV: each order's own normalised hypervolume; front: the pair's "
        "stitch-only front points by order.",
        "",
        md_table(
            [
                "pair (small+large)",
                "matched",
                "mean L->S minus S->L",
                "L->S better / worse",
                "HV L->S / S->L",
                "front pts L->S / S->L",
            ],
            [
                (
                    p,
                    g["matched"],
                    _pp(g["delta_mean"]),
                    f"{g['ls_wins']} / {g['sl_wins']}",
                    f"{g['hv_large_small']:.3f} / {g['hv_small_large']:.3f}",
                    f"{g['front_large_small']} / {g['front_small_large']}",
                )
                for p, g in c["pairs"].items()
            ]
            + [
                (
                    "**all**",
                    c["matched"],
                    _pp(c["delta_mean"]),
                    f"{c['ls_wins']} / {c['sl_wins']}",
                    "",
                    "",
                )
            ],
        ),
    ]


def _markdown_d(d: dict[str, Any]) -> list[str]:
    """(d): initialisation of the stitching layer on a sample of stitch points."""
    return [
        f"**(d) Initialisation of the stitching layer.** {d['sample']} stitch points spread "
        f"over the ordered pairs; validation accuracy (mean), fitting time (mean); "
        f"fine-tuning: {d['ft_steps']} AdamW steps at lr {d['lr']:g} on the calibration "
        "images, stitching layer only.",
        "",
        md_table(
            ["initialisation", "val acc (mean)", "fit time (mean)", "failed"],
            [
                (
                    name,
                    f"{d[f'{s}_mean']:.2f}%",
                    f"{d[f'{s}_fit_seconds_mean']:.2f} s",
                    d[f"{s}_failed"],
                )
                for s, name in (
                    ("random", "random (PyTorch default)"),
                    ("ls", "least squares (the search's default)"),
                    ("ls_ft", f"least squares + {d['ft_steps']} fine-tuning steps"),
                    ("random_ft", f"random + {d['ft_steps']} fine-tuning steps"),
                )
            ],
        ),
        "",
        f"Least squares beats random initialisation on {d['ls_beats_random']} of "
        f"{d['sample']} points; fine-tuning improves least squares on {d['ls_ft_beats_ls']}"
        f"; least squares + fine-tuning beats random + fine-tuning on "
        f"{d['ls_ft_beats_random_ft']}.",
    ]


def _markdown_d_front(f: dict[str, Any]) -> list[str]:
    """(d) on the best stitches: the stitch-only front refitted with and without fine-tuning."""
    sizes, steps = f["calibration_sizes"], f["ft_steps"]
    cols = [(n, s) for n in sizes for s in (0, steps)]

    def name(n: int, s: int) -> str:
        return f"LS, {n} cal" if s == 0 else f"LS + {s} steps, {n} cal"

    summ = f["summary"]
    return [
        "**(d) on the best stitches.** The mean above is carried by poor stitch points. Each "
        f"point of the ground truth's stitch-only front ({len(f['rows'])} points) refitted "
        f"with least squares alone and with {steps} fine-tuning steps, on "
        + " and on ".join(f"{n}" for n in sizes)
        + " calibration images (validation accuracy; `ground truth` is the search's own "
        "setting as measured in section 1):",
        "",
        md_table(
            ["stitch point", "MACs", "ground truth", *(name(n, s) for n, s in cols)],
            [
                (
                    f"`{r['label']}`",
                    f"{r['macs'] / 1e6:.2f}M",
                    f"{r['ground_truth']:.2f}%",
                    *(f"{r[f'cal{n}_steps{s}']:.2f}%" for n, s in cols),
                )
                for r in f["rows"]
            ]
            + [
                (
                    "**mean change**",
                    "",
                    "",
                    *(_pp(summ[f"cal{n}_steps{s}"]["delta_mean"]) for n, s in cols),
                ),
                (
                    "**on the true front**",
                    "",
                    str(f["true_front_stitches"]),
                    *(str(summ[f"cal{n}_steps{s}"]["on_true_front"]) for n, s in cols),
                ),
                (
                    "**fit time (mean)**",
                    "",
                    "",
                    *(f"{summ[f'cal{n}_steps{s}']['seconds_mean']:.2f} s" for n, s in cols),
                ),
            ],
        ),
        "",
        "`on the true front`: refitted points that no measured candidate of the space would "
        "dominate (every other candidate as in the ground truth).",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All four claims."""
    gt = GroundTruth.load(args.ground_truth)
    res: dict[str, Any] = {
        "machine": machine_info(),
        "ground_truth": str(args.ground_truth),
        "macs_tol": args.macs_tol,
        "a": claim_a(gt),
        "b": claim_b(gt, args.macs_tol),
        "c": claim_c(gt, args.macs_tol),
        "correlation": cka_accuracy_correlation(gt),
    }
    if args.sample > 0 or args.ft_calibration > 0:
        torch.set_num_threads(args.threads)
        plan = load_plan(args.study, args.budget_table)
        if args.sample > 0:
            res["d"] = claim_d(args, gt, plan)
        if args.ft_calibration > 0:
            res["d_front"] = claim_d_front(args, gt, plan)
    return res


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "claims")
    parser.add_argument("--macs-tol", type=float, default=0.1, help="relative MACs match")
    parser.add_argument("--sample", type=int, default=24, help="stitch points for (d); 0 skips")
    parser.add_argument("--ft-steps", type=int, default=100, help="fine-tuning steps for (d)")
    parser.add_argument(
        "--ft-calibration",
        type=int,
        default=2048,
        help="calibration images of (d)'s second front refit (0 skips the front refit)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for (d)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    res = run(args)
    return publish("claims", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
