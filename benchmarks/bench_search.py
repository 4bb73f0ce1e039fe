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
(convention: :mod:`benchmarks.common`) and how many true-front points were evaluated.
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
  the sampler's 64 draws are all explored or pruned, take the unexplored candidate nearest
  to its last draw (same anchors first, then the closest cuts) instead of a uniformly
  random one (:func:`nearest_fallback`).

    python -m benchmarks.bench_search
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    NO_PRUNING,
    GroundTruth,
    bench_parser,
    machine_info,
    md_table,
    mean_std,
    parallel_map,
    publish,
    rule_needs_signals,
    rule_spec,
    rule_text,
    study_signals,
)

DEFAULT_SAMPLERS = "default,default@none,default@k4,nsga2,nsga2@none,random,random@none,uniform"
_STATE: dict[str, Any] = {}


def nearest_fallback(filtered, unexplored: Callable[[], list], seed: int):
    """A copy of a :class:`search.strategy.FilteredSampler` with the nearest-candidate fallback.

    Args:
        filtered: The searcher's filtered sampler.
        unexplored: Returns the unexplored, unpruned candidates.
        seed: Seed of the tie-break between equally near candidates.
    """
    from search.strategy import FilteredSampler

    rng = random.Random(seed)

    class NearestFallbackSampler(FilteredSampler):
        def sample_relative(self, study, trial, search_space):
            if not search_space:
                return {}
            params: dict[str, Any] = {}
            for _ in range(self.max_tries):
                params = self._propose(study, trial)
                if self.accept(self.space.decode(params)):
                    return params
            options = unexplored()
            if not options:
                return params
            self.fallbacks += 1
            best = min(options, key=lambda c: (_distance(self.space, params, c), rng.random()))
            return self.space.encode(best)

    return NearestFallbackSampler(
        filtered.inner,
        filtered.space,
        filtered.accept,
        filtered.fallback,
        max_tries=filtered.max_tries,
    )


def _distance(space, params: dict[str, Any], c) -> float:
    """Distance of a proposal to a candidate: other anchors first, then the cuts."""
    enc = space.encode(c)
    other = (params["front"] != enc["front"]) + (params["back"] != enc["back"])
    cuts = abs(float(params["front_cut"]) - enc["front_cut"])
    cuts += abs(float(params["back_cut"]) - enc["back_cut"])
    return 10.0 * other + cuts


def variant_sampler(name: str, seed: int, study_sampler: str, n_objectives: int):
    """The Optuna sampler of a variant name (``None`` for ``uniform``)."""
    import optuna

    from search.strategy import make_sampler

    if name == "default":
        name = study_sampler
    if name in ("tpe", "nsga2", "random"):
        return make_sampler(name, seed, n_objectives)
    if name == "tpe-independent":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)
    if name.startswith("tpe-startup"):
        n = int(name.removeprefix("tpe-startup"))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n, multivariate=True)
    if name.startswith("nsga2-pop"):
        n = int(name.removeprefix("nsga2-pop"))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=n)
    if name == "uniform":
        return None
    raise SystemExit(f"error: unknown sampler variant {name!r}")


def result_of(rec: dict[str, Any]) -> dict[str, Any]:
    """What a Ray worker would have reported for a ground-truth record."""
    if "error" in rec:
        return {"error": rec["error"]}
    keys = ("val_acc", "val_top5", "macs", "params", "stitch_params", "latency_ms", "memory_mb")
    out = {k: rec.get(k) for k in keys}
    out["cka"] = rec.get("cka")
    out["fit_seconds"] = rec.get("fit_seconds")
    out["eval_seconds"] = rec.get("eval_seconds")
    out["trial_seconds"] = rec.get("seconds")
    return out


def _init(gt_path: str, budget_table: str, signals=None) -> None:
    import logging
    import warnings

    import optuna

    from search.inputs import load_budget_table

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    logging.getLogger("ray").setLevel(logging.ERROR)
    _STATE["gt"] = GroundTruth.load(gt_path)
    _STATE["budgets"] = load_budget_table(budget_table)
    _STATE["signals"] = signals


def replay(job: dict[str, Any]) -> dict[str, Any]:
    """One search run against the ground truth; returns the evaluation order."""
    import optuna

    from search.core import PruningRule
    from search.store import Heartbeat
    from search.strategy import SearcherSettings, StitchSearcher, pruned_reasons
    from space import Candidate

    gt: GroundTruth = _STATE["gt"]
    space = gt.space
    rule = PruningRule(**job["rule"])
    signals = _STATE["signals"] if rule_needs_signals(job["rule"]) else None
    if rule_needs_signals(job["rule"]) and signals is None:
        raise RuntimeError(f"rule {job['rule']} needs its signal matrices; none were given")
    seed, total = job["seed"], job["total"]
    t0 = time.perf_counter()
    if job["sampler"] == "uniform":
        rng = random.Random(seed)
        pruned = pruned_reasons(space, gt.cka, rule, signals)
        stitches = [c for c in space.all_candidates() if not c.is_anchor and c.key not in pruned]
        rng.shuffle(stitches)
        order = [c.key for c in space.anchors() + stitches][:total]
        return {
            **job,
            "order": order,
            "seconds": time.perf_counter() - t0,
            "fallbacks": 0,
            "pruned": len(pruned),
        }
    base, _, mod = job["sampler"].partition("+")
    sampler = variant_sampler(base, seed, job["study_sampler"], 2)
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(), directions=["maximize", "minimize"]
    )
    for c in space.anchors():
        study.enqueue_trial(space.encode(c), user_attrs={"seeded": "anchor"})
    settings = SearcherSettings(
        objectives=["accuracy", "macs"],
        budgets=_STATE["budgets"],
        rule=rule,
        total=total,
        driver_id="replay",
        seed=seed,
    )
    searcher = StitchSearcher(study, space, settings, sampler=sampler, cka=gt.cka, signals=signals)
    if mod == "nearest":
        study.sampler = nearest_fallback(study.sampler, searcher.ledger.unexplored, seed)
    elif mod:
        raise SystemExit(f"error: unknown sampler modifier {mod!r} in {job['sampler']!r}")
    searcher.record_pruned()
    live: deque[tuple[str, dict[str, Any]]] = deque()
    order: list[str] = []
    suggest_seconds: list[float] = []
    i = 0
    # The driver's heartbeat, as in search.run: without it the searcher's sweep for trials
    # of dead drivers would fail the trials in flight.
    with Heartbeat(study, "replay"):
        while True:
            while len(live) < job["concurrency"]:
                ts = time.perf_counter()
                cfg = searcher.suggest(f"t{i}")
                suggest_seconds.append(time.perf_counter() - ts)
                if not isinstance(cfg, dict):
                    break
                live.append((f"t{i}", cfg))
                i += 1
            if not live:
                break
            tid, cfg = live.popleft()
            c = Candidate.from_json(cfg["candidate"])
            searcher.on_trial_complete(tid, result_of(gt.records[c.key]))
            order.append(c.key)
    if searcher.failed or len(order) != len(set(order)):
        raise RuntimeError(
            f"replay {job['variant']} seed {seed}: {searcher.failed} failed trials, "
            f"{len(order) - len(set(order))} repeated evaluations; the searcher misbehaved"
        )
    return {
        **job,
        "order": order,
        "seconds": time.perf_counter() - t0,
        "suggest_seconds_mean": float(np.mean(suggest_seconds)) if suggest_seconds else 0.0,
        "fallbacks": study.sampler.fallbacks,
        "pruned": searcher.pruned,
    }


class Scorer:
    """Scores a prefix of a search's evaluations against the ground truth.

    Five measures: the hypervolume of everything evaluated over the exhaustive front's
    (``hv_fraction``); the share of the hypervolume *beyond the anchors'* that was found
    (``gain``: 0 = nothing beyond the anchors, which every search evaluates first; 1 = the
    whole front); true-front points evaluated; and the same two for stitch points alone
    (``stitch_hv_fraction`` over the stitch-only front, ``stitch_front_found``).
    """

    def __init__(self, gt: GroundTruth) -> None:
        self.gt = gt
        self.hv = gt.hypervolume()
        self.front = set(gt.front_keys())
        self.stitch_front = set(gt.front_keys(gt.stitch_keys()))
        self.full = self.hv(*gt.points(list(self.front)))
        self.anchors = self.hv(*gt.points(gt.anchor_keys()))
        self.stitch_full = self.hv(*gt.points(list(self.stitch_front)))

    def __call__(self, order: list[str], budget: int) -> dict[str, Any]:
        gt = self.gt
        keys = [k for k in order[:budget] if "error" not in gt.records[k]]
        st = [k for k in keys if gt.records[k]["kind"] == "stitch"]
        found = self.hv(*gt.points(keys)) if keys else 0.0
        gain_room = self.full - self.anchors
        return {
            "evaluations": min(budget, len(order)),
            "hv_fraction": found / self.full,
            "gain": (found - self.anchors) / gain_room if gain_room > 0 else 1.0,
            "front_found": len(self.front & set(keys)),
            "stitch_hv_fraction": self.hv(*gt.points(st)) / self.stitch_full if st else 0.0,
            "stitch_front_found": len(self.stitch_front & set(st)),
        }


MEASURES = ("hv_fraction", "gain", "front_found", "stitch_hv_fraction", "stitch_front_found")


def parse_rule(suffix: str, study_rule: dict[str, Any]) -> dict[str, Any]:
    """The rule of a variant suffix: ``""`` the study's, ``none``, ``t0.5``, ``k3``, ``t0.3k3``.

    Rules are :func:`benchmarks.common.rule_spec` dicts; the suffixes other than ``""`` are
    CKA rules.
    """
    if suffix == "":
        return {**NO_PRUNING, **study_rule}
    if suffix == "none":
        return dict(NO_PRUNING)
    m = re.fullmatch(r"(?:t([0-9.]+))?(?:k([0-9]+))?", suffix)
    if not m or not any(m.groups()):
        raise SystemExit(f"error: bad rule suffix {suffix!r}; use none, t0.5, k3 or t0.5k3")
    return {
        **NO_PRUNING,
        "threshold": float(m.group(1) or 0.0),
        "top_k": int(m.group(2)) if m.group(2) else None,
    }


def replay_all(
    gt_path: Path,
    budget_table: Path,
    variants: list[str],
    *,
    seeds: int,
    total: int,
    concurrency: int,
    study_sampler: str,
    study_rule: dict[str, Any],
    processes: int,
    signals=None,
) -> tuple[list[str], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Runs every variant with every seed.

    Args:
        signals: The study rule's :class:`search.strategy.PruningSignals`
            (:func:`benchmarks.common.study_signals`), when the rule reads more than CKA.

    Returns:
        The variants (duplicates of one sampler and rule dropped), each variant's resolved
        sampler and rule, and the runs.
    """
    resolved: dict[str, dict[str, Any]] = {}
    seen = set()
    for v in variants:
        name, _, suffix = v.partition("@")
        rule = parse_rule(suffix, study_rule)
        key = (name, *sorted(rule.items()))
        if key in seen:
            continue
        seen.add(key)
        resolved[v] = {"sampler": name, "rule": rule}
    jobs = [
        {
            "variant": v,
            "sampler": r["sampler"],
            "rule": r["rule"],
            "seed": seed,
            "total": total,
            "concurrency": concurrency,
            "study_sampler": study_sampler,
        }
        for v, r in resolved.items()
        for seed in range(seeds)
    ]
    t0 = time.perf_counter()
    runs = []
    for r in parallel_map(
        replay,
        jobs,
        processes=processes,
        initializer=_init,
        initargs=(str(gt_path), str(budget_table), signals),
    ):
        runs.append(r)
        print(
            f"\r  {len(runs)}/{len(jobs)} runs ({time.perf_counter() - t0:.0f}s)",
            end="",
            file=sys.stderr,
            flush=True,
        )
    print(file=sys.stderr)
    order = list(resolved)
    runs.sort(key=lambda r: (order.index(r["variant"]), r["seed"]))
    return order, resolved, [{k: v for k, v in r.items() if k != "study_sampler"} for r in runs]


def summarise(
    gt: GroundTruth,
    variants: list[str],
    runs: list[dict[str, Any]],
    budgets: list[int],
    labels: list[str],
) -> dict[str, Any]:
    """Scores per variant and budget (lists over seeds)."""
    scorer = Scorer(gt)
    summary: dict[str, Any] = {}
    for v in variants:
        mine = [r for r in runs if r["variant"] == v]
        per_budget = {}
        for label, b in zip(labels, budgets, strict=True):
            scores = [scorer(r["order"], b) for r in mine]
            per_budget[label] = {
                "budget": b,
                **{m: [s[m] for s in scores] for m in (*MEASURES, "evaluations")},
            }
        summary[v] = {
            "per_budget": per_budget,
            "fallbacks": [r["fallbacks"] for r in mine],
            "seconds": [r["seconds"] for r in mine],
            "suggest_seconds_mean": [r.get("suggest_seconds_mean", 0.0) for r in mine],
        }
    return summary


def budget_counts(values: list[float], n: int) -> list[int]:
    """Budgets as evaluations: values up to 1 are shares of the space, larger ones counts."""
    return [max(1, round(v * n)) if v <= 1 else int(v) for v in values]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """All replays and their scores."""
    from search.inputs import load_study

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
        "summary": summarise(gt, variants, runs, budgets, labels),
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
            "64 draws all explored or pruned, replaced by the filter): " + fallbacks + ".",
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
