"""Rung 1 against its own ground truth: every stitch fine-tuned, and what the promotion finds.

**The rung-1 table** (``--build``): every stitch point of the study's space (the candidates
of ``ground_truth.json``; anchors excluded, there is nothing to fine-tune) is evaluated at
rung 1 as the search's rung-1 trials evaluate it: :func:`evaluators.evaluate_candidate` with
the study's data (``trial_data(plan)``: the first ``finetune.train_images`` training images),
least squares on the calibration images, then the study's ``finetune`` settings
(``finetune_settings(plan)``), one torch thread per process, ``--processes`` processes;
latency and memory are not re-measured (the architecture is rung 0's). Each result is cached
in ``benchmarks/results/rung1_ground_truth.json`` under its candidate key, both anchors'
weight hashes and a tag of the data and fine-tuning settings, so an interrupted build resumes.
Rung-0 values come from the rung-0 table (``bench_ground_truth.py``), never re-measured.

**The analyses** (the default; they read the two tables):

- the true front at rung 1 (anchors at rung 0, stitches at rung 1) and at rung 0, and how
  many stitched networks on each lie strictly between the smallest and the largest anchor
  in MACs;
- Spearman correlation of rung-0 with rung-1 accuracy (overall, mean within ordered pair);
- the cost of a rung-1 evaluation;
- the default search at its default budget: the real searcher replayed at rung 0
  (:func:`benchmarks.lib.replay_all`, the study's sampler, trials, workers and
  pruning rule, e.g. ``kl`` depth 3 with its signals as ``search.run`` computes them), its
  rung-0 trials recorded as the search records them, :func:`search.strategy.promotion_order`
  with the study's rule and ``finetune.max_trials``, rung-1 values looked up in the table;
  against random promotion of as many rung-0 stitches of the same replay, an oracle
  (the same number, best at rung 1 among those the replay evaluated) and no promotion.
  Per seed: hypervolume of every candidate at its highest rung (:func:`search.strategy.promotion.
  best_rung`) over the rung-1 true front's (convention: :mod:`benchmarks.lib.metrics`, over
  every value of both rungs), rung-1 true-front points found, rung-1 evaluations spent, and
  per device (:func:`search.delivery.select_per_device`) the pick against the best at rung 1;
- the issue's targets, met or not;
- a grid of cheap alternatives to the study's promotion settings (``--grid-trials``,
  ``--grid-per-device``, ``--grid-max-trials``), scored on the same replays: the first ``T``
  evaluations of a replay are exactly a replay with ``trials`` ``T`` (the sampler does not
  know the budget), so only the longest is run.

    python -m benchmarks.bench_rung1 --build          # build or finish the table, then analyse
    python -m benchmarks.bench_rung1 --build --limit 4
    python -m benchmarks.bench_rung1                  # analyses only (the table complete)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib import (
    DEFAULT_RUNG1,
    PROMOTIONS,
    GroundTruth,
    Rung1Table,
    TableBuild,
    bench_parser,
    build_rung1_table,
    correlation,
    cost,
    finetune_tag,
    front_summary,
    load_plan,
    machine_info,
    md_table,
    mean_std,
    publish,
    replay_promotion,
    rule_text,
    rung0_table,
)


# --------------------------------------------------------------------------- analyses
def targets(res: dict[str, Any], *, device: str = "jetson-nano") -> dict[str, Any]:
    """The issue's targets, from the fronts and the replay."""
    rep = res["replay"]
    between = res["fronts"]["1"]["between"]
    found = [s["default"]["between_found"] for s in rep["seeds"]]
    out: dict[str, Any] = {
        "between_on_front": len(between),
        "between_target": 4,
        "between_met": len(between) >= 4,
        "found_mean": float(np.mean(found)) if found else 0.0,
        "found_target": 3,
        "found_met": bool(found) and float(np.mean(found)) >= 3,
        "device": device,
    }
    best = rep["truth"]["best_per_device"].get(device)
    if best is None:
        out["device_met"] = None
        return out
    picks = [s["default"]["picks"].get(device) for s in rep["seeds"]]
    delivered = sum(1 for p in picks if p and p["stitch_beats_anchors"])
    exists = (
        best["best_stitch_acc"] is not None
        and best["best_anchor_acc"] is not None
        and best["best_stitch_acc"] > best["best_anchor_acc"]
    )
    out.update(
        {
            "device_exists": exists,
            "device_best_stitch": best["best_stitch"],
            "device_best_stitch_acc": best["best_stitch_acc"],
            "device_best_anchor": best["best_anchor"],
            "device_best_anchor_acc": best["best_anchor_acc"],
            "device_delivered": delivered,
            "device_seeds": len(picks),
            "device_pick_acc_mean": float(
                np.mean([p["val_acc"] for p in picks if p]) if any(picks) else float("nan")
            ),
            "device_met": exists and delivered == len(picks),
        }
    )
    return out


def analyse(args: argparse.Namespace) -> dict[str, Any]:
    """Every analysis of the two tables."""
    plan = load_plan(args.study, args.budget_table)
    gt = rung0_table(plan, args.ground_truth, args.study)
    t = Rung1Table.load(args.rung1, gt, tag=finetune_tag(plan))
    study, budgets = plan.study, list(plan.budgets)
    hv = t.hv_convention()
    res: dict[str, Any] = {
        "machine": machine_info(),
        "ground_truth": str(args.ground_truth),
        "rung1_table": str(args.rung1),
        "meta": t.meta,
        "build_machine": t.raw.get("machine"),
        "hv_convention": hv.to_dict(),
        "anchor_span": list(t.anchor_span()),
        "anchors": {
            a: {"val_acc": t.acc(f"anchor|{a}", 0), "macs": t.macs(f"anchor|{a}")}
            for a in gt.anchor_names()
        },
        "fronts": {str(r): front_summary(t, r, hv) for r in (0, 1)},
        "correlation": correlation(t, study.finetune.max_trials),
        "cost": cost(t),
        "replay": replay_promotion(
            t,
            plan,
            budgets,
            ground_truth=args.ground_truth,
            budget_table=args.budget_table,
            seeds=args.seeds,
            processes=args.replay_processes,
            grid_trials=args.grid_trials or (),
            grid_per_device=args.grid_per_device or (),
            grid_max_trials=args.grid_max_trials or (),
            holdout_seeds=args.holdout_seeds,
        ),
        "devices": [b.device for b in budgets],
    }
    res["targets"] = targets(res)
    return res


# --------------------------------------------------------------------------- markdown
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}%"


def _m(v: float) -> str:
    return f"{v / 1e6:.2f}M"


def _front_table(front: dict[str, Any]) -> str:
    return md_table(
        ["candidate", "rung-1 val acc", "rung-0 val acc", "MACs", "params", "between anchors"],
        [
            (
                f"`{r['label']}`",
                _pct(r["rung1_val_acc"]),
                _pct(r["rung0_val_acc"]),
                _m(r["macs"]),
                f"{r['params'] / 1e3:.0f}K",
                "yes" if r["between"] else "",
            )
            for r in front["rows"]
        ],
    )


def _mean(seeds: list[dict[str, Any]], rule: str, measure: str) -> float:
    return float(np.mean([s[rule][measure] for s in seeds]))


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    lines = [
        *_table_lines(res),
        "",
        *_replay_lines(res),
        "",
        *_grid_lines(res),
        *_target_lines(res),
    ]
    return "\n".join(lines)


def _table_lines(res: dict[str, Any]) -> list[str]:
    """The rung-1 table: how it was built, the true fronts, rank correlation and cost."""
    meta, cor, c = res["meta"], res["correlation"], res["cost"]
    f0, f1 = res["fronts"]["0"], res["fronts"]["1"]
    ft = meta["finetune"]
    lo, hi = res["anchor_span"]
    build_machine = res.get("build_machine") or {}
    return [
        f"Every stitch point of study `{meta['study']}` ({cor['stitches']} stitches, the "
        "candidates of the rung-0 ground truth, section 1; anchors are not fine-tuned) "
        "evaluated at rung 1 as the search's rung-1 trials evaluate it: least squares on the "
        "calibration images, then the stitching layer alone fine-tuned on "
        f"{meta['train_images']:,} training images ({ft['steps']} AdamW steps of "
        f"{ft['batch_size']}, peak lr {ft['lr']:g}, {ft['schedule']}, distillation "
        f"{ft['distill']:g}), validation on the same images as rung 0; "
        f"{meta['processes']} process(es) x {meta['threads_per_process']} thread(s). Table "
        f"`{Path(res['rung1_table']).name}` built {build_machine.get('date', '?')} on "
        f"{build_machine.get('cpu', '?')} in {c['build_seconds'] / 60:.0f} min wall (all "
        "sessions); rung-0 values from the rung-0 table. Hypervolumes: the section 1 "
        "convention over every value of both rungs (best "
        f"{res['hv_convention']['acc_best']:.2f}%, chance "
        f"{res['hv_convention']['acc_chance']:.1f}%).",
        "",
        f"**True fronts.** At rung 1 (anchors at rung 0, stitches at rung 1) the front has "
        f"{f1['size']} points, **{len(f1['between'])} stitched network(s) strictly between** the "
        f"smallest anchor ({_m(lo)} MACs) and the largest ({_m(hi)}); at rung 0 it has "
        f"{f0['size']} points, {len(f0['between'])} of them stitched network(s) between the "
        "anchors. "
        f"Hypervolume {f1['hypervolume']:.4f} at rung 1 against {f0['hypervolume']:.4f} at "
        "rung 0.",
        "",
        "Rung-1 true front (by MACs):",
        "",
        _front_table(f1),
        "",
        "Rung-0 true front, for comparison:",
        "",
        _front_table(f0),
        "",
        f"**Rank correlation of rung 0 with rung 1** (stitches): Spearman "
        f"{cor['spearman']:.3f} overall, {cor['spearman_pair_mean']:.3f} within ordered pair "
        f"(mean of {len(cor['spearman_per_pair'])}). Of the {cor['top']} best stitches at rung 1, "
        f"{cor['top_overlap']} are among the {cor['top']} best at rung 0. Fine-tuning moves a "
        f"stitch by {cor['gain_mean']:+.2f} pp on average (median {cor['gain_median']:+.2f} pp; "
        f"mean {cor['rung0_mean']:.2f}% -> {cor['rung1_mean']:.2f}%); {cor['worse']} of "
        f"{cor['stitches']} lose accuracy.",
        "",
        f"**Cost per rung-1 evaluation** ({c['threads']} torch thread, {c['evaluations']} "
        f"evaluations, {c['failed']} failed; {c['processes']} processes on a machine shared "
        "with other jobs, so wall times include waiting for a core; process CPU does not):",
        "",
        md_table(
            ["seconds", "median", "p90", "mean"],
            [
                (name, f"{s['median']:.1f}", f"{s['p90']:.1f}", f"{s['mean']:.1f}")
                for name, s in (
                    ("rung 1, wall (least squares + fine-tuning + validation)", c["wall"]),
                    ("rung 1, process CPU", c["cpu"]),
                    ("rung 1, the fine-tuning loop alone (wall)", c["finetune"]),
                    ("rung 0, wall (section 1; latency and memory included)", c["rung0_wall"]),
                )
            ],
        ),
    ]


def _replay_lines(res: dict[str, Any]) -> list[str]:
    """The default search and its promotion against the rung-1 ground truth."""
    rep = res["replay"]
    seeds = rep["seeds"]
    n_front, n_between = len(rep["truth"]["front"]), len(rep["truth"]["between"])
    return [
        f"**The default search against the rung-1 ground truth.** The rung-0 search replayed "
        f"as in section 2 ({rep['sampler']}, {rep['trials']} evaluations, {rep['workers']} in "
        f"flight, {len(seeds)} seeds; the study's pruning rule, "
        f"{rule_text(rep.get('rule') or {})}, prunes {rep.get('pruned', 0)} stitch points "
        "before the search), its trials recorded as the search records them, then "
        f"promoted with `promotion_order` (per device {rep['per_device']}, rung-0 front "
        f"{'on' if rep['promote_front'] else 'off'}) within `finetune.max_trials` = "
        f"{rep['max_trials']}, and rung-1 values looked up. Compared: random promotion of as "
        "many of the same replay's rung-0 stitches (seeded), an oracle promoting as many, the "
        "best at rung 1 among those the replay evaluated, and no promotion. `HV`: every "
        "candidate at its highest rung over the rung-1 true front's; `front`: rung-1 true-front "
        f"points known at rung 1 (of {n_front}; anchors count); `between`: its stitches between "
        f"the anchors fine-tuned (of {n_between}; in brackets: evaluated at rung 0); "
        "mean ± std over seeds.",
        "",
        md_table(
            ["promotion", "HV", "front", "between", "rung-1 evaluations"],
            [
                (
                    desc,
                    mean_std([s[rule]["hv_fraction"] for s in seeds]),
                    mean_std([s[rule]["front_found"] for s in seeds], "{:.1f}"),
                    mean_std([s[rule]["between_found"] for s in seeds], "{:.1f}")
                    + f" ({_mean(seeds, rule, 'between_evaluated'):.1f})",
                    mean_std([s[rule]["rung1_evaluations"] for s in seeds], "{:.1f}"),
                )
                for rule, desc in PROMOTIONS
            ],
        ),
        "",
        "Per seed (default promotion / random promotion):",
        "",
        md_table(
            ["seed", "HV", "front", "between", "rung-1 evaluations", "promotion queue"],
            [
                (
                    s["seed"],
                    f"{s['default']['hv_fraction']:.3f} / {s['random']['hv_fraction']:.3f}",
                    f"{s['default']['front_found']} / {s['random']['front_found']}",
                    f"{s['default']['between_found']} / {s['random']['between_found']}",
                    f"{s['default']['rung1_evaluations']} / {s['random']['rung1_evaluations']}",
                    s["promotion_order_length"],
                )
                for s in seeds
            ],
        ),
        "",
        "Per device: the pick (highest accuracy within the device's budgets, every candidate "
        "at its highest rung) against the best at rung 1 that fits; mean over seeds, "
        "`stitch > anchors`: seeds whose pick is a stitched network beating every anchor "
        "that fits. `stitches > anchors at rung 1`: the stitches that fit and beat every "
        "fitting anchor once fine-tuned; in brackets, how many of them the replayed rung-0 "
        "search evaluated and how many the default promotion fine-tuned (mean over seeds).",
        "",
        _device_table(res),
    ]


def _grid_lines(res: dict[str, Any], device: str = "jetson-nano") -> list[str]:
    rep, c = res["replay"], res["cost"]
    grid = rep.get("grid") or []
    if not grid or device not in res["devices"]:
        return []
    r0, r1, w = c["rung0_wall"]["median"], c["wall"]["median"], max(1, rep["workers"])

    def minutes(g: dict[str, Any]) -> str:
        return f"{(g['trials'] * r0 + g['rung1_evaluations'] * r1) / w / 60:.1f}"

    study = next(g for g in grid if g["study"])

    def row(g: dict[str, Any]) -> tuple:
        wins = f"{g['wins'][device]}/{g['seeds']}"
        return (
            g["trials"],
            g["per_device"],
            g["max_trials"],
            f"{g['rung1_evaluations']:.1f}",
            minutes(g),
            f"**{wins}**" if g["study"] else wins,
            _pct(g["pick_acc"][device]),
            f"{g['between_found']:.1f}",
            f"{g['front_found']:.1f}",
            f"{g['hv_fraction']:.3f}",
        )

    # The study's promotion at every rung-0 budget, then every promotion at the study's.
    by_trials = [
        g
        for g in grid
        if (g["per_device"], g["max_trials"]) == (study["per_device"], study["max_trials"])
    ]
    by_promotion = [g for g in grid if g["trials"] == study["trials"] and not g["study"]]
    rows = [row(g) for g in by_trials + by_promotion]
    return [
        f"**Promotion settings, alternatives** (same replays and seeds; rung-0 front promoted "
        f"{'on' if rep['promote_front'] else 'off'}; bold: the study's settings; first the "
        "study's promotion at other rung-0 budgets, then other promotions at the study's "
        "budget; the whole grid is in the JSON, `replay.grid`). `compute`: "
        f"rung-0 trials x {r0:.1f} s + rung-1 evaluations x {r1:.1f} s (median wall per "
        f"evaluation above) over {w} workers, an estimate of the search's evaluation time; "
        f"`{device} wins`: seeds whose pick is a stitch beating every anchor that fits "
        "(validation accuracy; the tables hold no test accuracy); means over seeds otherwise.",
        "",
        md_table(
            [
                "trials",
                "per_device",
                "max_trials",
                "rung-1 evaluations",
                "compute (min)",
                f"{device} wins",
                f"{device} pick",
                "between",
                "front",
                "HV",
            ],
            rows,
        ),
        "",
        *_holdout_lines(res, device),
    ]


def _holdout_lines(res: dict[str, Any], device: str) -> list[str]:
    """The study's promotion at each rung-0 budget, on the seeds and on held-out seeds."""
    rep = res["replay"]
    ho = rep.get("holdout")
    if not ho or not ho["grid"]:
        return []
    study = (rep["per_device"], rep["max_trials"])

    def wins(grid: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
        return {g["trials"]: g for g in grid if (g["per_device"], g["max_trials"]) == study}

    first, held = wins(rep["grid"]), wins(ho["grid"])
    n = len(rep["seeds"])
    last = ho["first_seed"] + ho["seeds"] - 1
    rows = [
        (
            f"**{t}**" if t == rep["trials"] else t,
            f"{first[t]['wins'][device]}/{first[t]['seeds']}",
            f"{held[t]['wins'][device]}/{held[t]['seeds']}",
            _pct(held[t]["pick_acc"][device]),
            f"{held[t]['hv_fraction']:.3f}",
        )
        for t in sorted(held)
        if t in first
    ]
    return [
        f"**Held-out seeds.** Rung-0 budgets chosen on the seeds above (0-{n - 1}) are "
        f"checked on replays with seeds {ho['first_seed']}-{last}, which no choice saw; "
        f"the study's promotion (per_device {study[0]}, max_trials {study[1]}); bold: the "
        "study's `trials`.",
        "",
        md_table(
            [
                "trials",
                f"{device} wins, seeds 0-{n - 1}",
                f"{device} wins, seeds {ho['first_seed']}-{last}",
                f"{device} pick, held out",
                "HV, held out",
            ],
            rows,
        ),
        "",
    ]


def _device_table(res: dict[str, Any]) -> str:
    rep = res["replay"]
    seeds = rep["seeds"]
    rows = []
    for device in res["devices"]:
        best = rep["truth"]["best_per_device"][device]
        row = [
            device,
            _m(best["max_macs"]) if best["max_macs"] is not None else "-",
            f"{_pct(best['val_acc'])} `{best['label']}`" if best["key"] else "nothing fits",
            _pct(best["best_anchor_acc"]),
            f"{len(best['beaters'])} ("
            f"{np.mean([s['default']['beaters'][device]['evaluated'] for s in seeds]):.1f} / "
            f"{np.mean([s['default']['beaters'][device]['promoted'] for s in seeds]):.1f})",
        ]
        for rule in ("default", "random", "none"):
            picks = [s[rule]["picks"].get(device) for s in seeds]
            picks = [p for p in picks if p]
            if not picks:
                row.append("-")
                continue
            beats = sum(p["stitch_beats_anchors"] for p in picks)
            row.append(
                f"{np.mean([p['val_acc'] for p in picks]):.2f}% (regret "
                f"{np.mean([p['regret'] for p in picks]):.2f} pp; stitch > anchors "
                f"{beats}/{len(seeds)})"
            )
        rows.append(row)
    return md_table(
        [
            "device",
            "max MACs",
            "best at rung 1",
            "best anchor",
            "stitches > anchors at rung 1 (evaluated / promoted)",
            "pick, default promotion",
            "pick, random promotion",
            "pick, no promotion",
        ],
        rows,
    )


def _target_lines(res: dict[str, Any]) -> list[str]:
    tg = res["targets"]

    def word(ok: bool | None) -> str:
        return "not applicable" if ok is None else ("**met**" if ok else "**not met**")

    lines = ["**The issue's targets** (computed from the tables above):", ""]
    if tg["device_met"] is None:
        lines.append(f"- {tg['device']}: not in the budget table, not applicable.")
    else:
        lines.append(
            f"- {tg['device']} gets a stitched network more accurate than every anchor that "
            f"fits it (such a stitch exists at rung 1, and the default search picks one in "
            f"every seed): {word(tg['device_met'])}. Best fitting stitch at rung 1: "
            f"`{tg['device_best_stitch']}` {_pct(tg['device_best_stitch_acc'])}; best fitting "
            f"anchor `{tg['device_best_anchor']}` {_pct(tg['device_best_anchor_acc'])}; the "
            f"default search's pick is such a stitch in {tg['device_delivered']} of "
            f"{tg['device_seeds']} seeds (mean pick {_pct(tg['device_pick_acc_mean'])})."
        )
    lines.append(
        f"- At least {tg['between_target']} stitched networks strictly between the anchors "
        f"on the rung-1 true front: {word(tg['between_met'])} ({tg['between_on_front']})."
    )
    lines.append(
        f"- The default search finds at least {tg['found_target']} of them (fine-tuned, mean "
        f"over seeds): {word(tg['found_met'])} ({tg['found_mean']:.1f})."
    )
    return lines


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "rung1")
    parser.add_argument(
        "--rung1", type=Path, default=DEFAULT_RUNG1, help="rung-1 table JSON (the cache)"
    )
    parser.add_argument("--build", action="store_true", help="build or finish the rung-1 table")
    parser.add_argument("--rebuild", action="store_true", help="ignore cached rung-1 entries")
    parser.add_argument("--processes", type=int, default=2, help="evaluation processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument(
        "--limit", type=int, default=None, help="fine-tune at most N missing stitches (testing)"
    )
    parser.add_argument("--seeds", type=int, default=20, help="replay seeds (0 .. N - 1)")
    parser.add_argument(
        "--holdout-seeds",
        type=int,
        default=20,
        help="further replay seeds, after --seeds, scored at the grid's rung-0 budgets (0: off)",
    )
    parser.add_argument("--replay-processes", type=int, default=2, help="replay processes")
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    parser.add_argument(
        "--grid-trials",
        type=ints,
        default=[80, 100, 110, 120, 130, 150],
        help="promotion grid: rung-0 trials",
    )
    parser.add_argument(
        "--grid-per-device", type=ints, default=[2, 3, 5], help="promotion grid: per_device"
    )
    parser.add_argument(
        "--grid-max-trials", type=ints, default=[12, 16, 24], help="promotion grid: max_trials"
    )
    args = parser.parse_args(argv)
    if args.build or args.rebuild:
        build = TableBuild(args.processes, args.threads, args.rebuild, args.limit)
        raw = build_rung1_table(args.study, args.budget_table, args.ground_truth, args.rung1, build)
        total = sum(1 for c in GroundTruth.load(args.ground_truth).space.all_candidates())
        stitches = total - len(raw["meta"]["depths"])
        if len(raw["entries"]) < stitches:
            print(
                f"rung-1 table incomplete: {len(raw['entries'])} of {stitches} stitches written "
                f"to {args.rung1}"
            )
            return 0
    res = analyse(args)
    return publish("rung1", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
