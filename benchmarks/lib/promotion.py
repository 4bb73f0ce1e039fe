"""The rung-1 promotion replayed against the rung-1 ground truth, and scored.

The default rung-0 search is replayed (:func:`benchmarks.lib.replay.replay_all`), its
trials recorded as the search records them (:func:`record_rung0`), the promoted stitches
given their rung-1 accuracy from the table (:func:`finetuned_trials`), and each promotion
(the study's :func:`search.strategy.promotion_order`, random, an oracle, none) scored with
every candidate at its highest rung (:func:`assess` against :class:`Truth`). A grid of other
promotion settings is scored on the same replays (:func:`promotion_grid`).
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from benchmarks.lib.metrics import Hypervolume
from benchmarks.lib.replay import replay_all, result_of
from benchmarks.lib.rung1 import Rung1Table
from benchmarks.lib.study import rule_spec, study_signals
from search.core import OBJECTIVES, Attr, DeviceBudget, budget_metrics, evaluated_trials
from search.delivery import select_per_device
from search.inputs import Plan
from search.strategy import Recorder, best_rung, objective_values, promotion_order
from space import Candidate

#: The promotion rules compared (id, description).
PROMOTIONS = (
    ("default", "the study's rule (`promotion_order`)"),
    ("random", "random, as many rung-0 stitches"),
    ("oracle", "oracle: as many, the most accurate at rung 1"),
    ("none", "no promotion (rung 0 only)"),
)


def record_rung0(
    t: Rung1Table, order: Sequence[str], budgets: Sequence[DeviceBudget], objectives: Sequence[str]
) -> optuna.Study:
    """A replay's rung-0 evaluations stored as the search stores them (an in-memory study).

    Each trial is annotated and completed (or failed) by :class:`search.strategy.Recorder`, so
    its user attributes, budget constraint and objective values are the search's own.
    """
    study = optuna.create_study(
        storage=optuna.storages.InMemoryStorage(),
        directions=[OBJECTIVES[o].direction for o in objectives],
    )
    recorder = Recorder(study, driver_id="replay", budgets=budgets, cka=t.gt.cka)
    space = t.gt.space
    for key in order:
        rec = t.gt.records[key]
        c = Candidate(rec["front"], rec["back"], rec["front_block"], rec["back_block"])
        study.enqueue_trial(space.encode(c))
        trial = study.ask(space.distributions())
        recorder.annotate(trial, c)
        result = result_of(rec)
        values, reason = objective_values(result, objectives)
        if reason is None:
            recorder.complete(trial, result, values)
        else:
            recorder.fail(trial, reason, result)
    return study


def finetuned_trials(
    t: Rung1Table,
    trials: Sequence[FrozenTrial],
    promoted: Sequence[str],
    objectives: Sequence[str],
) -> list[FrozenTrial]:
    """Rung-1 trials of the promoted stitches: rung-0 attributes, the rung-1 accuracy.

    A stitch whose rung-1 evaluation failed has none (it stays at rung 0, as in the search).
    """
    by_key = {tr.user_attrs[Attr.KEY]: tr for tr in trials}
    acc_index = [OBJECTIVES[o].metric for o in objectives].index(Attr.VAL_ACC)
    out = []
    for key in promoted:
        if "error" in t.records[key]:
            continue
        source = by_key[key]
        acc = t.acc(key, 1)
        values = list(source.values)
        values[acc_index] = acc
        attrs = {
            **source.user_attrs,
            Attr.VAL_ACC: acc,
            Attr.RUNG: 1,
            Attr.RUNG0_VAL_ACC: source.user_attrs[Attr.VAL_ACC],
        }
        out.append(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE,
                values=values,
                params=source.params,
                distributions=source.distributions,
                user_attrs=attrs,
            )
        )
    return out


@dataclass
class Truth:
    """What the promotions are scored against: the rung-1 world (stitches fine-tuned).

    Attributes:
        hv: The hypervolume convention (:meth:`Rung1Table.hv_convention`).
        full: Hypervolume of the rung-1 true front.
        front: Keys of the rung-1 true front.
        between: Its stitches strictly between the smallest and the largest anchor in MACs.
        best: Per device: the most accurate candidate that fits at rung 1, and the best
            fitting anchor and stitch.
    """

    hv: Hypervolume
    full: float
    front: set[str]
    between: set[str]
    best: dict[str, dict[str, Any] | None]

    @classmethod
    def of(cls, t: Rung1Table, budgets: Sequence[DeviceBudget]) -> Truth:
        """The truth of a rung-1 table for the devices."""
        hv = t.hv_convention()
        front = t.true_front(1)
        best: dict[str, dict[str, Any] | None] = {}

        def label(key: str | None) -> str | None:
            return None if key is None else t.gt.records[key]["label"]

        for b in budgets:
            fits = [k for k in t.candidates() if b.fits(budget_metrics(t.gt.records[k]))]
            anchors = [k for k in fits if k.startswith("anchor|")]
            stitches = [k for k in fits if k.startswith("stitch|")]
            top = max(fits, key=lambda k: (t.acc(k, 1), -t.macs(k)), default=None)
            best[b.device] = {
                "key": top,
                "label": label(top),
                "val_acc": None if top is None else t.acc(top, 1),
                "best_anchor": label(max(anchors, key=lambda k: t.acc(k, 0), default=None)),
                "best_anchor_acc": max((t.acc(k, 0) for k in anchors), default=None),
                "best_stitch": label(
                    max(stitches, key=lambda k: (t.acc(k, 1), -t.macs(k)), default=None)
                ),
                "best_stitch_acc": max((t.acc(k, 1) for k in stitches), default=None),
                "beaters": [
                    k
                    for k in stitches
                    if anchors and t.acc(k, 1) > max(t.acc(a, 0) for a in anchors)
                ],
                "max_macs": b.max_macs,
            }
        acc = np.array([t.acc(k, 1) for k in front])
        full = hv(acc, np.array([t.macs(k) for k in front]))
        return cls(hv, full, set(front), set(t.between_anchors(front)), best)


def _pick(t: Rung1Table, pick: FrozenTrial, best: dict[str, Any]) -> dict[str, Any]:
    """A device's pick against the best that fits it at rung 1."""
    key = pick.user_attrs[Attr.KEY]
    acc_pick = float(pick.user_attrs[Attr.VAL_ACC])
    return {
        "key": key,
        "label": t.gt.records[key]["label"],
        "rung": int(pick.user_attrs.get(Attr.RUNG, 0)),
        "val_acc": acc_pick,
        "regret": None if best["val_acc"] is None else best["val_acc"] - acc_pick,
        "stitch_beats_anchors": key.startswith("stitch|")
        and best["best_anchor_acc"] is not None
        and acc_pick > best["best_anchor_acc"],
    }


def assess(
    t: Rung1Table,
    truth: Truth,
    trials: Sequence[FrozenTrial],
    promoted: Sequence[str],
    budgets: Sequence[DeviceBudget],
    objectives: Sequence[str],
) -> dict[str, Any]:
    """Scores one promotion of one replay: every candidate at its highest rung."""
    rung1 = finetuned_trials(t, trials, promoted, objectives)
    candidates = best_rung(trials, rung1)
    keys = [c.user_attrs[Attr.KEY] for c in candidates]
    acc = np.array([c.user_attrs[Attr.VAL_ACC] for c in candidates], dtype=float)
    macs = np.array([t.macs(k) for k in keys])
    at_rung1 = {tr.user_attrs[Attr.KEY] for tr in rung1}
    known = {k for k in keys if k.startswith("anchor|")} | at_rung1
    evaluated = set(keys)
    picks = {
        device: None if pick is None else _pick(t, pick, truth.best[device])
        for device, pick in select_per_device(candidates, budgets).items()
    }
    beaters = {
        device: {
            "evaluated": len(set(best["beaters"]) & evaluated),
            "promoted": len(set(best["beaters"]) & at_rung1),
        }
        for device, best in truth.best.items()
    }
    return {
        "promoted": list(promoted),
        "rung1_evaluations": len(promoted),
        "beaters": beaters,
        "hv_fraction": truth.hv(acc, macs) / truth.full if len(keys) else 0.0,
        "front_found": len(truth.front & known),
        "between_found": len(truth.between & at_rung1),
        "between_evaluated": len(truth.between & evaluated),
        "picks": picks,
    }


def _promotions(
    t: Rung1Table,
    trials: Sequence[FrozenTrial],
    default: list[str],
    seed: int,
) -> dict[str, list[str]]:
    """Each rule's promoted stitches: the study's, random and oracle (as many), none."""
    stitches = [
        tr.user_attrs[Attr.KEY] for tr in trials if tr.user_attrs.get(Attr.KIND) == "stitch"
    ]
    rng = random.Random(seed)
    n = len(default)
    rand = rng.sample(stitches, min(n, len(stitches)))
    tuned = [k for k in stitches if t.ok(k)]
    oracle = sorted(tuned, key=lambda k: (-t.acc(k, 1), t.macs(k)))[:n]
    return {"default": default, "random": rand, "oracle": oracle, "none": []}


def replay_promotion(
    t: Rung1Table,
    plan: Plan,
    budgets: Sequence[DeviceBudget],
    *,
    ground_truth: Path,
    budget_table: Path,
    seeds: int,
    processes: int,
    grid_trials: Sequence[int] = (),
    grid_per_device: Sequence[int] = (),
    grid_max_trials: Sequence[int] = (),
    holdout_seeds: int = 0,
) -> dict[str, Any]:
    """The default rung-0 search replayed, then each promotion rule scored per seed.

    Args:
        t: The two tables.
        plan: The study's plan.
        budgets: The devices.
        ground_truth: The rung-0 table (replayed against; the signal cache goes beside it).
        budget_table: The devices CSV.
        seeds: Replay seeds.
        processes: Replay processes.
        grid_trials: Rung-0 trials of the promotion grid (besides the study's).
        grid_per_device: Its ``per_device`` values (besides the study's).
        grid_max_trials: Its ``max_trials`` values (besides the study's).
        holdout_seeds: Replays with the next seeds (``seeds`` .. ``seeds + holdout_seeds -
            1``), scored at the grid's rung-0 budgets with the study's promotion only: data
            that choices made on the first seeds (the study's ``trials``) did not see.
    """
    study_def = plan.study
    ft = study_def.finetune
    rule = rule_spec(study_def)
    signals = study_signals(plan=plan, cka=t.gt.cka, cache_root=Path(ground_truth).parent)
    all_trials = sorted({study_def.trials, *grid_trials})
    replay = functools.partial(
        replay_all,
        ground_truth,
        budget_table,
        ["default"],
        total=max(all_trials),
        concurrency=study_def.workers,
        study_sampler=study_def.sampler,
        study_rule=rule,
        processes=processes,
        signals=signals,
    )
    t0 = time.perf_counter()
    _, _, runs = replay(seeds=seeds)
    replay_seconds = time.perf_counter() - t0
    truth = Truth.of(t, budgets)
    grid = promotion_grid(
        t, truth, runs, plan, budgets, all_trials, grid_per_device, grid_max_trials
    )
    holdout = None
    if holdout_seeds:
        t1 = time.perf_counter()
        _, _, held = replay(seeds=holdout_seeds, first_seed=seeds)
        holdout = {
            "first_seed": seeds,
            "seeds": holdout_seeds,
            "replay_seconds": round(time.perf_counter() - t1, 1),
            "grid": promotion_grid(t, truth, held, plan, budgets, all_trials),
        }
    return {
        "seeds": [_score_seed(t, truth, run, plan, budgets) for run in runs],
        "truth": {
            "front": sorted(truth.front),
            "between": sorted(truth.between),
            "hypervolume": truth.full,
            "best_per_device": truth.best,
        },
        "max_trials": ft.max_trials,
        "per_device": ft.promote.per_device,
        "promote_front": ft.promote.front,
        "trials": study_def.trials,
        "workers": study_def.workers,
        "sampler": study_def.sampler,
        "rule": rule,
        "pruned": int(np.mean([r["pruned"] for r in runs])) if runs else 0,
        "replay_seconds": round(replay_seconds, 1),
        "grid": grid,
        "holdout": holdout,
    }


def _score_seed(
    t: Rung1Table,
    truth: Truth,
    run: dict[str, Any],
    plan: Plan,
    budgets: Sequence[DeviceBudget],
) -> dict[str, Any]:
    """One replay's rung-0 trials (the study's count) and each promotion rule's score."""
    study_def = plan.study
    ft = study_def.finetune
    objectives = list(study_def.objectives)
    study = record_rung0(t, run["order"][: study_def.trials], budgets, objectives)
    trials = evaluated_trials(study)
    order = promotion_order(
        trials,
        budgets,
        per_device=ft.promote.per_device,
        front=study.best_trials if ft.promote.front else (),
    )
    default = [tr.user_attrs[Attr.KEY] for tr in order][: ft.max_trials]
    promotions = _promotions(t, trials, default, run["seed"])
    return {
        "seed": run["seed"],
        "rung0_evaluations": len(run["order"][: study_def.trials]),
        "rung0_stitches": sum(tr.user_attrs.get(Attr.KIND) == "stitch" for tr in trials),
        "promotion_order_length": len(order),
        **{
            name: assess(t, truth, trials, keys, budgets, objectives)
            for name, keys in promotions.items()
        },
    }


def _grid_cell(
    cell: tuple[int, int, int],
    study: tuple[int, int, int],
    scores: list[dict[str, Any]],
    budgets: Sequence[DeviceBudget],
) -> dict[str, Any]:
    """One cell of the grid: its settings and its scores averaged over seeds."""
    trials, pd, mt = cell

    def picks(device: str) -> list[dict[str, Any]]:
        return [s["picks"][device] for s in scores if s["picks"].get(device)]

    return {
        "trials": trials,
        "per_device": pd,
        "max_trials": mt,
        "study": cell == study,
        "seeds": len(scores),
        "rung1_evaluations": float(np.mean([s["rung1_evaluations"] for s in scores])),
        "between_found": float(np.mean([s["between_found"] for s in scores])),
        "front_found": float(np.mean([s["front_found"] for s in scores])),
        "hv_fraction": float(np.mean([s["hv_fraction"] for s in scores])),
        "wins": {
            b.device: sum(1 for p in picks(b.device) if p["stitch_beats_anchors"]) for b in budgets
        },
        "pick_acc": {
            b.device: float(np.mean([p["val_acc"] for p in picks(b.device)]))
            if picks(b.device)
            else None
            for b in budgets
        },
    }


def promotion_grid(
    t: Rung1Table,
    truth: Truth,
    runs: list[dict[str, Any]],
    plan: Plan,
    budgets: Sequence[DeviceBudget],
    grid_trials: Sequence[int],
    grid_per_device: Sequence[int] = (),
    grid_max_trials: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Alternatives to the study's promotion settings scored on the same replays.

    Each cell (rung-0 ``trials``, ``per_device``, ``max_trials``; rung-0 front promoted as the
    study says) is scored per seed as the default promotion is: rung-1 evaluations, rung-1
    true-front stitches between the anchors fine-tuned, hypervolume, and per device the seeds
    whose pick is a stitch beating every anchor that fits. The first ``T`` evaluations of a
    replay are exactly a replay with ``trials`` ``T``, so only the longest is run.
    """
    ft = plan.study.finetune
    objectives = list(plan.study.objectives)
    per_devices = sorted({ft.promote.per_device, *grid_per_device})
    max_trials = sorted({ft.max_trials, *grid_max_trials})
    cells: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
    for trials in grid_trials:
        for run in runs:
            study = record_rung0(t, run["order"][:trials], budgets, objectives)
            rung0 = evaluated_trials(study)
            front = study.best_trials if ft.promote.front else ()
            for pd in per_devices:
                order = [
                    tr.user_attrs[Attr.KEY]
                    for tr in promotion_order(rung0, budgets, per_device=pd, front=front)
                ]
                for mt in max_trials:
                    a = assess(t, truth, rung0, order[:mt], budgets, objectives)
                    cells.setdefault((trials, pd, mt), []).append(a)
    study_cell = (plan.study.trials, ft.promote.per_device, ft.max_trials)
    return [_grid_cell(cell, study_cell, scores, budgets) for cell, scores in sorted(cells.items())]
