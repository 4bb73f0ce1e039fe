"""The real rung-0 searcher replayed against the ground truth, and its runs scored.

Each run drives :class:`search.strategy.StitchSearcher` exactly as Ray Tune does
(``suggest(trial_id)`` / ``on_trial_complete(trial_id, result)``) on an in-memory Optuna
study with the study's directions, the anchors enqueued first, a pruning rule and the
study's budgets; only the evaluation is replaced by a lookup in the ground truth, so the
sampler, the proposal filter, the fallback and the pruning are the shipped code
(:func:`replay_all`). :class:`Scorer` scores a prefix of a run's evaluations: because the
sampler does not know the budget, the first ``B`` evaluations of one run are exactly a run
with budget ``B``.

Sampler variants (:func:`variant_sampler`): ``default`` (the study's sampler), ``tpe``,
``nsga2``, ``random``, ``tpe-independent``, ``tpe-startupN``, ``nsga2-popN``, ``uniform``
(no sampler), and ``<variant>+nearest`` (:func:`nearest_fallback`). A suffix ``@none``,
``@t0.5``, ``@k3`` or ``@t0.5k3`` sets the rule (:func:`parse_rule`).
"""

from __future__ import annotations

import logging
import random
import re
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from benchmarks.lib.ground_truth import GroundTruth
from benchmarks.lib.study import NO_PRUNING, rule_needs_signals
from benchmarks.lib.tables import parallel_map
from search.core import PruningRule, SearchSpace
from search.inputs import load_budget_table
from search.store import Heartbeat
from search.strategy import (
    FilteredSampler,
    PruningSignals,
    SearcherSettings,
    StitchSearcher,
    make_sampler,
    pruned_reasons,
)
from space import Candidate

#: The scores of a replay prefix (:class:`Scorer`).
MEASURES = ("hv_fraction", "gain", "front_found", "stitch_hv_fraction", "stitch_front_found")
_STATE: dict[str, Any] = {}


def nearest_fallback(
    filtered: FilteredSampler, unexplored: Callable[[], list[Candidate]], seed: int
) -> FilteredSampler:
    """A copy of a :class:`search.strategy.FilteredSampler` with the nearest-candidate fallback.

    When the sampler's draws are all explored or pruned, it takes the unexplored candidate
    nearest to its last draw (same anchors first, then the closest cuts) instead of a
    uniformly random one.

    Args:
        filtered: The searcher's filtered sampler.
        unexplored: Returns the unexplored, unpruned candidates.
        seed: Seed of the tie-break between equally near candidates.
    """
    rng = random.Random(seed)

    class NearestFallbackSampler(FilteredSampler):
        """The filtered sampler, falling back to the nearest unexplored candidate."""

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


def _distance(space: SearchSpace, params: dict[str, Any], c: Candidate) -> float:
    """Distance of a proposal to a candidate: other anchors first, then the cuts."""
    enc = space.encode(c)
    other = (params["front"] != enc["front"]) + (params["back"] != enc["back"])
    cuts = abs(float(params["front_cut"]) - enc["front_cut"])
    cuts += abs(float(params["back_cut"]) - enc["back_cut"])
    return 10.0 * other + cuts


def variant_sampler(
    name: str, seed: int, study_sampler: str, n_objectives: int
) -> optuna.samplers.BaseSampler | None:
    """The Optuna sampler of a variant name (``None`` for ``uniform``)."""
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


def parse_rule(suffix: str, study_rule: dict[str, Any]) -> dict[str, Any]:
    """The rule of a variant suffix: ``""`` the study's, ``none``, ``t0.5``, ``k3``, ``t0.3k3``.

    Rules are :func:`benchmarks.lib.study.rule_spec` dicts; the suffixes other than ``""`` are
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


def _init(gt_path: str, budget_table: str, signals: PruningSignals | None = None) -> None:
    """Per-process set-up: the ground truth and the budgets once, Optuna and Ray quiet."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    logging.getLogger("ray").setLevel(logging.ERROR)
    _STATE["gt"] = GroundTruth.load(gt_path)
    _STATE["budgets"] = load_budget_table(budget_table)
    _STATE["signals"] = signals


def _uniform(job: dict[str, Any], rule: PruningRule, signals: PruningSignals | None) -> dict:
    """The ``uniform`` variant: the anchors, then the unpruned stitch points shuffled."""
    gt: GroundTruth = _STATE["gt"]
    t0 = time.perf_counter()
    rng = random.Random(job["seed"])
    pruned = pruned_reasons(gt.space, gt.cka, rule, signals)
    stitches = [c for c in gt.space.all_candidates() if not c.is_anchor and c.key not in pruned]
    rng.shuffle(stitches)
    order = [c.key for c in gt.space.anchors() + stitches][: job["total"]]
    return {
        **job,
        "order": order,
        "seconds": time.perf_counter() - t0,
        "fallbacks": 0,
        "pruned": len(pruned),
    }


def replay(job: dict[str, Any]) -> dict[str, Any]:
    """One search run against the ground truth; returns the evaluation order."""
    gt: GroundTruth = _STATE["gt"]
    space = gt.space
    rule = PruningRule(**job["rule"])
    signals = _STATE["signals"] if rule_needs_signals(job["rule"]) else None
    if rule_needs_signals(job["rule"]) and signals is None:
        raise RuntimeError(f"rule {job['rule']} needs its signal matrices; none were given")
    if job["sampler"] == "uniform":
        return _uniform(job, rule, signals)
    seed = job["seed"]
    t0 = time.perf_counter()
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
        total=job["total"],
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
        "max_tries": study.sampler.max_tries,
        "pruned": searcher.pruned,
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
    signals: PruningSignals | None = None,
    first_seed: int = 0,
) -> tuple[list[str], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Runs every variant with every seed.

    Args:
        gt_path: The ground truth.
        budget_table: The devices CSV.
        variants: Variant names, each with an optional rule suffix.
        seeds: Seeds per variant (``first_seed`` .. ``first_seed + seeds - 1``).
        total: Evaluations per run.
        concurrency: Trials in flight.
        study_sampler: The study's sampler (the ``default`` variant).
        study_rule: The study's rule (variants without a suffix).
        processes: Replay processes.
        signals: The study rule's signals (:func:`benchmarks.lib.study.study_signals`), when
            the rule reads more than CKA.
        first_seed: The first seed.

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
        for seed in range(first_seed, first_seed + seeds)
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


class Scorer:
    """Scores a prefix of a search's evaluations against the ground truth.

    Five measures (:data:`MEASURES`): the hypervolume of everything evaluated over the
    exhaustive front's (``hv_fraction``); the share of the hypervolume *beyond the anchors'*
    that was found (``gain``: 0 = nothing beyond the anchors, which every search evaluates
    first; 1 = the whole front); true-front points evaluated; and the same two for stitch
    points alone (``stitch_hv_fraction`` over the stitch-only front, ``stitch_front_found``).
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
        """The measures of the first ``budget`` evaluations of ``order``."""
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


def score_runs(
    gt: GroundTruth,
    variants: list[str],
    runs: list[dict[str, Any]],
    budgets: list[int],
    labels: list[str],
) -> dict[str, Any]:
    """Scores per variant and budget (lists over seeds), keyed by the budgets' labels."""
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
            "max_tries": sorted({r["max_tries"] for r in mine if r.get("max_tries")}),
            "seconds": [r["seconds"] for r in mine],
            "suggest_seconds_mean": [r.get("suggest_seconds_mean", 0.0) for r in mine],
        }
    return summary
