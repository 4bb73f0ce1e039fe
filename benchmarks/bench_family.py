"""The family (rung 2) on the default study: what joint training adds, against an honest baseline.

Runs the README's main command twice, with and without the family (``--no-family``), to
measure what the family step adds to it, then trains variants of the family in-process on
the lower rungs of the first run (the code a Ray Train worker runs,
:func:`search.execution.train_family_here`), and compares:

- the family's front (its members' validation accuracy against MACs) with (a) the front of
  the lower rungs (least squares and stitch-only fine-tuning), (b) the anchors alone trained
  with the same steps, data and distillation (members: the family's anchors only), so that
  the gain due to stitching is separated from the gain due to more training, and (c) each
  member at its lower rung;
- hypervolume (:class:`benchmarks.lib.Hypervolume`'s convention over the lower rungs'
  candidates), the stitches strictly between the anchors' MACs on each front, each device's
  pick and the time;
- a sweep of epochs (1, 2, 4, 5, 10; 4 and 5 with a second seed of the batch order and the
  member sampling, to show the noise), frozen against trainable anchors, the anchors' share
  of the steps and the member policy (spread over both orders, against the accuracy front),
  to choose the defaults.

Usage: ``python -m benchmarks.bench_family`` (about 45 minutes on 2 cores).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from benchmarks.lib import (
    ROOT,
    Hypervolume,
    bench_parser,
    load_plan,
    machine_info,
    md_table,
    pareto_mask,
    publish,
    run_storage,
    write_json,
)
from search.core import (
    Attr,
    accuracy_macs_front,
    candidate_of,
    evaluated_trials,
    ranked_for_device,
    select_per_device,
)
from search.execution import family_settings, family_teacher, train_family_here
from search.inputs import Plan
from search.strategy import (
    best_of_rungs,
    family_anchors,
    family_members,
    family_study_name,
    family_trials,
    rung1_study_name,
    rung1_trials,
)
from space import member_name

#: The variants trained in-process: the study's family settings overridden (``members``:
#: ``anchors`` trains the family's anchors alone, ``front`` takes the devices' picks, the
#: accuracy front and the devices' next best instead of the spread).
VARIANTS: dict[str, dict[str, Any]] = {
    "anchors alone (baseline)": {"members": "anchors"},
    "epochs 1": {"epochs": 1},
    "epochs 2": {"epochs": 2},
    "epochs 4": {"epochs": 4},
    "epochs 4 (seed 1)": {"epochs": 4, "seed": 1},
    "epochs 5 (default)": {},
    "epochs 5 (seed 1)": {"seed": 1},
    "epochs 10": {"epochs": 10},
    "frozen anchors": {"anchor_lr": None},
    "anchor share 0.1": {"anchor_share": 0.1},
    "members from the front": {"members": "front"},
}
#: The rows of the summary of the real run.
RUN = "run (Ray Train)"
BASELINE = "anchors alone (baseline)"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; see the module docstring."""
    parser = bench_parser(__doc__, "family", ground_truth=False)
    parser.add_argument(
        "--runs", type=Path, default=ROOT / "runs" / "bench-family", help="the runs' folder"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the variants")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated variants to train"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start over: remove the runs' folder (default: reuse the runs and the variants "
        "already trained there with the same members and settings)",
    )
    args = parser.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.runs, ignore_errors=True)
    info = machine_info()
    runs = {
        "with the family": _run(args, args.runs / "family", []),
        "without it (--no-family)": _run(args, args.runs / "lower", ["--no-family"]),
    }
    plan = load_plan(args.study, args.budget_table)
    study, lower, trained = _studies(plan, args.runs / "family")
    results = {RUN: _from_run(lower, trained)}
    for name in [v for v in args.variants.split(",") if v]:
        results[name] = _variant(plan, study, lower, VARIANTS[name], args.threads, args.runs)
        print(f"{name}: {results[name]['seconds']:.0f} s", file=sys.stderr, flush=True)
    res = {"machine": info, "runs": runs, "analysis": analyse(plan, lower, results)}
    return publish("family", res, markdown(res), args, argv)


def _run(args: Any, out: Path, extra: list[str]) -> dict[str, Any]:
    """The README's main command into ``out``: its wall time and summary (kept, reused)."""
    kept = out.with_suffix(".json")
    if kept.is_file() and out.is_dir():
        return json.loads(kept.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "search.run", "--budget-table", str(args.budget_table)]
    cmd += ["--study", str(args.study), "--out", str(out), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    res = {"command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1), "summary": proc.stdout}
    write_json(kept, res)
    return res


def _studies(
    plan: Plan, out: Path
) -> tuple[optuna.Study, list[optuna.trial.FrozenTrial], list[optuna.trial.FrozenTrial]]:
    """The run's rung-0 study, its candidates at their best lower rung, its family's trials."""
    storage = run_storage(out)
    name = plan.study.name
    study = optuna.load_study(study_name=name, storage=storage)
    rung1 = optuna.load_study(study_name=rung1_study_name(name), storage=storage)
    family = optuna.load_study(study_name=family_study_name(name), storage=storage)
    lower = best_of_rungs(evaluated_trials(study), rung1_trials(rung1))
    ids = {t.user_attrs.get(Attr.FAMILY_ID) for t in family.get_trials(deepcopy=False)}
    trained = family_trials(family, sorted(i for i in ids if i)[-1]) if ids - {None} else []
    return study, lower, trained


def _from_run(
    lower: list[optuna.trial.FrozenTrial], trained: list[optuna.trial.FrozenTrial]
) -> dict[str, Any]:
    """The real run's family: its members' accuracies, and the family step's seconds."""
    points = [_point(t, t.user_attrs[Attr.VAL_ACC]) for t in trained]
    seconds = trained[0].user_attrs.get(Attr.FAMILY_SECONDS) if trained else None
    return {"points": points, "seconds": seconds, "settings": {}}


def _variant(
    plan: Plan,
    study: optuna.Study,
    lower: list[optuna.trial.FrozenTrial],
    overrides: Mapping[str, Any],
    threads: int,
    runs: Path,
) -> dict[str, Any]:
    """Trains one variant of the family in this process; its members' accuracies and time.

    The result is kept under ``runs/variants/`` and reused while its members and settings
    are the same.
    """
    changes = {k: v for k, v in overrides.items() if k != "members"}
    settings = dataclasses.replace(family_settings(plan), **changes)
    members = _members(plan, lower, overrides.get("members", "auto"))
    identity = {
        "settings": settings.to_dict(),
        "members": [t.user_attrs[Attr.KEY] for t in members],
        "threads": threads,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    kept = runs / "variants" / f"{digest}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    _, measured, seconds = train_family_here(
        plan, study, members, settings, teacher=family_teacher(plan, study), threads=threads
    )
    points = [_point(t, measured[member_name(candidate_of(t))]["accuracy"]) for t in members]
    res = {"points": points, "seconds": round(seconds, 1), "settings": settings.to_dict()}
    write_json(kept, res)
    return res


def _members(
    plan: Plan, lower: list[optuna.trial.FrozenTrial], policy: str
) -> list[optuna.trial.FrozenTrial]:
    """The members of a variant: the study's policy, its anchors alone, or the front's."""
    limit = plan.study.family.max_members
    if policy == "auto":
        return family_members(lower, plan.budgets, max_members=limit)
    keep = family_anchors(lower, plan.budgets)
    if policy == "anchors":
        return family_members(lower, plan.budgets, max_members=limit, names=sorted(keep))
    pool = [t for t in lower if {candidate_of(t).front, candidate_of(t).back} <= keep]
    per = [ranked_for_device(pool, b) for b in plan.budgets]
    order = [p[0] for p in per if p] + accuracy_macs_front(pool)
    for rank in range(1, max((len(p) for p in per), default=0)):
        order += [p[rank] for p in per if rank < len(p)]
    names = [member_name(candidate_of(t)) for t in order]
    return family_members(lower, plan.budgets, max_members=limit, names=names)


def _point(t: optuna.trial.FrozenTrial, acc: float) -> dict[str, Any]:
    c = candidate_of(t)
    return {
        "name": member_name(c),
        "anchor": c.is_anchor,
        "macs": float(t.user_attrs[Attr.MACS]),
        "params": t.user_attrs.get(Attr.PARAMS),
        "latency_ms": t.user_attrs.get(Attr.LATENCY_MS),
        "lower_acc": float(t.user_attrs.get(Attr.LOWER_VAL_ACC, t.user_attrs[Attr.VAL_ACC])),
        "acc": float(acc),
        "key": t.user_attrs[Attr.KEY],
    }


# --------------------------------------------------------------------------- analysis
def analyse(
    plan: Plan, lower: list[optuna.trial.FrozenTrial], results: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Fronts, hypervolume, stitches between the anchors, device picks, per variant."""
    base = [_point(t, t.user_attrs[Attr.VAL_ACC]) for t in lower]
    every = base + [p for r in results.values() for p in r["points"]]
    acc = np.array([p["acc"] for p in every])  # the convention spans every rung's points
    macs = np.array([p["macs"] for p in every])
    hv = Hypervolume.for_space(acc, macs, plan.data.num_classes)
    out: dict[str, Any] = {
        "hypervolume_convention": hv.to_dict(),
        "lower": _front_stats(hv, base, plan),
        "variants": {},
    }
    alone = results.get(BASELINE)
    best_alone = max(alone["points"], key=lambda p: p["acc"]) if alone else None
    for name, r in results.items():
        stats = _front_stats(hv, r["points"], plan)
        stats["seconds"] = r["seconds"]
        stats["points"] = r["points"]
        stats["settings"] = r["settings"]
        if best_alone is not None and name != BASELINE:
            stats["beats_best_anchor_alone"] = [
                p["name"]
                for p in r["points"]
                if not p["anchor"]
                and p["macs"] < best_alone["macs"]
                and p["acc"] > best_alone["acc"]
            ]
        stats["picks"] = _picks(plan, lower, r["points"], name == BASELINE)
        out["variants"][name] = stats
    out["picks_lower"] = _picks(plan, lower, [], False)
    return out


def _front_stats(hv: Hypervolume, points: list[dict[str, Any]], plan: Plan) -> dict[str, Any]:
    """A set of points' front, its hypervolume and its stitches between the anchors' MACs."""
    if not points:
        return {"front": [], "hypervolume": 0.0, "between": []}
    acc = np.array([p["acc"] for p in points])
    macs = np.array([p["macs"] for p in points])
    mask = pareto_mask(acc, macs)
    front = sorted((p for p, m in zip(points, mask, strict=True) if m), key=lambda p: p["macs"])
    anchors = [p["macs"] for p in points if p["anchor"]]
    lo, hi = (min(anchors), max(anchors)) if anchors else (0.0, 0.0)
    between = [p["name"] for p in front if not p["anchor"] and lo < p["macs"] < hi]
    return {
        "front": [p["name"] for p in front],
        "hypervolume": hv(acc, macs),
        "between": between,
    }


def _picks(
    plan: Plan,
    lower: list[optuna.trial.FrozenTrial],
    points: list[dict[str, Any]],
    anchors_only: bool,
) -> dict[str, Any]:
    """Each device's pick when a variant's points replace the lower rungs' accuracies.

    For the baseline only its anchors count: the lower rungs' stitches were fitted to the
    anchors before they were retrained.
    """
    by_key = {p["key"]: p["acc"] for p in points}
    trials = []
    for t in lower:
        if anchors_only and t.user_attrs.get(Attr.KIND) == "stitch":
            continue
        if t.user_attrs[Attr.KEY] in by_key:
            t = copy.copy(t)
            t.user_attrs = {**t.user_attrs, Attr.VAL_ACC: by_key[t.user_attrs[Attr.KEY]]}
        trials.append(t)
    chosen = select_per_device(trials, plan.budgets)
    return {
        d: None
        if t is None
        else {"name": member_name(candidate_of(t)), "acc": t.user_attrs[Attr.VAL_ACC]}
        for d, t in chosen.items()
    }


# --------------------------------------------------------------------------- markdown
def markdown(res: Mapping[str, Any]) -> str:
    """The section: the run's time, the family against its baselines, the sweep."""
    a = res["analysis"]
    parts = [_runs_md(res["runs"], a), _members_md(a), _variants_md(a), _picks_md(a)]
    return "\n\n".join(parts)


def _runs_md(runs: Mapping[str, Any], a: Mapping[str, Any]) -> str:
    rows = [[name, f"{r['wall_seconds']:.0f} s"] for name, r in runs.items()]
    seconds = a["variants"][RUN]["seconds"]
    note = (
        f"The family step itself (Ray Train, from its start to the trained family) took "
        f"{seconds:.0f} s in the first run."
        if seconds is not None
        else "The first run trained no family."
    )
    return "### The README's main command\n\n" + md_table(["run", "wall"], rows) + "\n\n" + note


def _members_md(a: Mapping[str, Any]) -> str:
    run = a["variants"][RUN]
    alone = {p["name"]: p["acc"] for p in a["variants"].get(BASELINE, {}).get("points", [])}
    rows = []
    for p in sorted(run["points"], key=lambda p: p["macs"]):
        rows.append(
            [
                p["name"],
                f"{p['macs'] / 1e6:.2f}M",
                f"{p['lower_acc']:.2f}",
                f"{p['acc']:.2f}",
                f"{alone[p['name']]:.2f}" if p["name"] in alone else "",
                "yes" if p["name"] in run["front"] else "",
            ]
        )
    head = ["member", "MACs", "lower rung", "family", "anchors alone", "on the family front"]
    return "### The family of the run, member by member (validation accuracy, %)\n\n" + md_table(
        head, rows
    )


def _variants_md(a: Mapping[str, Any]) -> str:
    rows = [
        [
            "lower rungs (rung 0 and 1, every candidate)",
            f"{a['lower']['hypervolume']:.4f}",
            str(len(a["lower"]["between"])),
            "",
            "",
        ]
    ]
    for name, v in a["variants"].items():
        rows.append(
            [
                name,
                f"{v['hypervolume']:.4f}",
                str(len(v["between"])),
                ", ".join(v.get("beats_best_anchor_alone", [])) or "-",
                "" if v["seconds"] is None else f"{v['seconds']:.0f} s",
            ]
        )
    head = [
        "front of",
        "hypervolume",
        "stitches between the anchors",
        "beat the best anchor alone",
        "time",
    ]
    return "### Fronts and time\n\n" + md_table(head, rows)


def _picks_md(a: Mapping[str, Any]) -> str:
    devices = list(a["picks_lower"])
    head = ["device", "lower rungs", *a["variants"]]
    rows = []
    for d in devices:
        row = [d, _pick(a["picks_lower"][d])]
        row += [_pick(v["picks"][d]) for v in a["variants"].values()]
        rows.append(row)
    return "### Each device's pick (validation accuracy, %)\n\n" + md_table(head, rows)


def _pick(p: Mapping[str, Any] | None) -> str:
    return "-" if p is None else f"{p['name']} {p['acc']:.2f}"


if __name__ == "__main__":
    sys.exit(main())
