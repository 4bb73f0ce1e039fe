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
  (:func:`benchmarks.bench_search.replay_all`, the study's sampler, trials, workers and
  pruning rule, e.g. ``kl`` depth 3 with its signals as ``search.run`` computes them), its
  rung-0 trials recorded as the search records them, :func:`search.strategy.promotion_order`
  with the study's rule and ``finetune.max_trials``, rung-1 values looked up in the table;
  against random promotion of as many rung-0 stitches of the same replay, an oracle
  (the same number, best at rung 1 among those the replay evaluated) and no promotion.
  Per seed: hypervolume of every candidate at its highest rung (:func:`search.strategy.promotion.
  best_rung`) over the rung-1 true front's (convention: :mod:`benchmarks.common`, over
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
import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS,
    GroundTruth,
    Hypervolume,
    anchor_identities,
    bench_parser,
    build_table,
    candidate_job,
    data_tag,
    entry_key,
    load_plan,
    machine_info,
    md_table,
    mean_std,
    pareto_mask,
    publish,
    rule_spec,
    rule_text,
    spearman,
    study_signals,
)
from search.execution import finetune_settings, trial_data

DEFAULT_RUNG1 = RESULTS / "rung1_ground_truth.json"
RUNG1_VERSION = 1
_STATE: dict[str, Any] = {}


# --------------------------------------------------------------------------- the table
def finetune_tag(plan) -> str:
    """Identifies the data, rung-0 and fine-tuning settings a rung-1 entry was measured with."""
    ft = plan.study.finetune
    settings = json.dumps(finetune_settings(plan).to_dict(), sort_keys=True)
    text = f"{data_tag(plan)}|train={ft.train_images}|teacher={ft.teacher}|finetune={settings}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def teacher_name(plan, gt: GroundTruth) -> str | None:
    """The anchor rung 1 distils from, as the search picks it (None without distillation).

    The study's ``finetune.teacher``, else the anchor most accurate at rung 0.
    """
    ft = plan.study.finetune
    if ft.distill <= 0:
        return None
    if ft.teacher is not None:
        return ft.teacher
    return max(gt.anchor_names(), key=lambda a: gt.records[f"anchor|{a}"]["val_acc"])


def _init(study: str, budgets: str, threads: int, teacher: str | None) -> None:
    """Per-process set-up: the plan (anchors, data with the training images) once."""
    import torch

    torch.set_num_threads(threads)
    plan = load_plan(study, budgets)
    _STATE["plan"] = plan
    _STATE["data"] = trial_data(plan)
    _STATE["settings"] = finetune_settings(plan)
    _STATE["threads"] = threads
    _STATE["teacher"] = None if teacher is None else plan.anchors[teacher].model


def _evaluate(item: tuple[dict[str, Any], float | None]) -> dict[str, Any]:
    """Fine-tunes one stitch in a worker process; failures are recorded, not raised."""
    from evaluators import evaluate_candidate
    from space import Candidate

    cand_dict, cka = item
    c = Candidate(**cand_dict)
    plan = _STATE["plan"]
    t0, c0 = time.perf_counter(), time.process_time()
    rec: dict[str, Any] = {"key": c.key, "label": c.label, "cka": cka}
    try:
        r = evaluate_candidate(
            c.config,
            plan.anchors,
            _STATE["data"],
            fit_steps=plan.study.fit.steps,
            fit_lr=plan.study.fit.lr,
            cka=cka,
            latency_batch=plan.study.latency_batch,
            measure_latency=False,  # the search keeps rung 0's costs at rung 1
            threads=_STATE["threads"],
            finetune=_STATE["settings"],
            teacher=_STATE["teacher"],
        )
        ft = r.finetune or {}
        rec.update(
            {
                "val_acc": r.val_acc,
                "val_top5": r.val_top5,
                "macs": r.macs,
                "fit_seconds": round(r.fit_seconds, 4),
                "finetune_seconds": round(float(ft.get("seconds", 0.0)), 4),
                "eval_seconds": round(r.eval_seconds, 4),
                "steps": ft.get("steps"),
                "images_seen": ft.get("images_seen"),
                "loss_first": ft.get("loss_first"),
                "loss_last": ft.get("loss_last"),
                "loss_min": ft.get("loss_min"),
                "threads": r.threads,
            }
        )
    except Exception as e:  # recorded as a failed candidate, as the search would
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    rec["cpu_seconds"] = round(time.process_time() - c0, 4)
    return rec


def rung0_table(plan, args: argparse.Namespace) -> GroundTruth:
    """The rung-0 table, checked against the study's anchors and data.

    Raises:
        SystemExit: It was measured with other anchors or data (says how to rebuild it).
    """
    gt = GroundTruth.load(args.ground_truth)
    if gt.meta["anchors"] != anchor_identities(plan) or gt.meta["data_tag"] != data_tag(plan):
        raise SystemExit(
            f"error: the rung-0 table {args.ground_truth} was measured with other anchors or "
            f"data than {args.study}; rebuild it with python -m benchmarks.bench_ground_truth"
        )
    return gt


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Builds or finishes the rung-1 table; returns the raw JSON object.

    Raises:
        SystemExit: The study has no rung 1, or the rung-0 table was measured with other
            anchors or data.
    """
    import torch

    torch.set_num_threads(args.threads)
    plan = load_plan(args.study, args.budget_table)
    if not plan.study.finetune.enabled:
        raise SystemExit(
            f"error: {args.study}: field 'finetune.enabled' is false; rung 1 needs it true"
        )
    gt = rung0_table(plan, args)
    ids = anchor_identities(plan)
    tag = finetune_tag(plan)
    teacher = teacher_name(plan, gt)
    stitches = [c for c in gt.space.all_candidates() if not c.is_anchor]
    wanted = {entry_key(c, ids, tag): c for c in stitches}
    ft = plan.study.finetune
    raw = {
        "version": RUNG1_VERSION,
        "meta": {
            "study": plan.study.name,
            "study_file": str(Path(args.study)),
            "ground_truth": str(args.ground_truth),
            "depths": dict(gt.depths),
            "anchors": ids,
            "data_identity": plan.data.identity,
            "data_tag": data_tag(plan),
            "rung1_tag": tag,
            "num_classes": plan.data.num_classes,
            "finetune": finetune_settings(plan).to_dict(),
            "train_images": min(ft.train_images, plan.data.train.num_images),
            "teacher": teacher,
            "threads_per_process": args.threads,
            "processes": args.processes,
        },
        "entries": {},
        "build_seconds": 0.0,
        "machine": machine_info(),
    }

    def on_record(rec: dict[str, Any]) -> None:
        rec["rung0_val_acc"] = gt.records[rec["key"]].get("val_acc")

    def report(done: int, todo: int, rec: dict[str, Any], seconds: float, entries) -> None:
        eta = seconds / done * (todo - done)
        result = rec.get("error") or f"{rec['rung0_val_acc']:.2f}% -> {rec['val_acc']:.2f}%"
        print(
            f"  {done}/{todo} ({len(entries)}/{len(wanted)} in the table) "
            f"{seconds:.0f}s, ETA {eta / 60:.1f} min: {rec['label']}: {result} "
            f"({rec['seconds']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )

    return build_table(
        args.rung1,
        raw,
        wanted,
        job=candidate_job(gt.cka),
        evaluate=_evaluate,
        processes=args.processes,
        initializer=_init,
        initargs=(str(args.study), str(args.budget_table), args.threads, teacher),
        rebuild=args.rebuild,
        limit=args.limit,
        # Largest first (fine-tuning runs the back part), so the last jobs are short.
        order=lambda c: -gt.records[c.key].get("macs", 0),
        on_record=on_record,
        report=report,
        name="rung-1 table",
    )


@dataclass
class Rung1Table:
    """The rung-1 table joined with the rung-0 one.

    Attributes:
        gt: The rung-0 ground truth (anchors and stitches).
        records: Stitch key -> rung-1 record (``val_acc``, ``seconds``, losses, ...).
        meta: What the rung-1 table was measured with.
        raw: The rung-1 JSON.
    """

    gt: GroundTruth
    records: dict[str, dict[str, Any]]
    meta: dict[str, Any]
    raw: dict[str, Any]

    @classmethod
    def load(cls, path: Path | str, gt: GroundTruth, *, tag: str | None = None) -> Rung1Table:
        """Reads a complete table written by :func:`build` for ``gt``'s space.

        Args:
            path: The rung-1 table.
            gt: The rung-0 table.
            tag: :func:`finetune_tag` of the study the table must have been measured for.

        Raises:
            SystemExit: Missing, of another version, anchors, data or fine-tuning settings,
                or incomplete (says how to finish it).
        """
        path = Path(path)
        hint = "build it with python -m benchmarks.bench_rung1 --build"
        if not path.is_file():
            raise SystemExit(f"error: no rung-1 table at {path}; {hint}")
        raw = json.loads(path.read_text())
        if raw.get("version") != RUNG1_VERSION:
            raise SystemExit(f"error: {path} has version {raw.get('version')!r}; {hint}")
        meta = raw["meta"]
        if meta["anchors"] != gt.meta["anchors"] or meta["data_tag"] != gt.meta["data_tag"]:
            raise SystemExit(
                f"error: {path} was measured with other anchors or data than the rung-0 table; "
                f"{hint} --rebuild"
            )
        if tag is not None and meta["rung1_tag"] != tag:
            raise SystemExit(
                f"error: {path} was measured with other fine-tuning settings or data than the "
                f"study (finetune {meta['finetune']}, {meta['train_images']} training images); "
                f"{hint}"
            )
        records = {}
        for c in gt.space.all_candidates():
            if c.is_anchor:
                continue
            rec = raw["entries"].get(entry_key(c, meta["anchors"], meta["rung1_tag"]))
            if rec is not None:
                records[c.key] = rec
        missing = sum(1 for c in gt.space.all_candidates() if not c.is_anchor) - len(records)
        if missing:
            raise SystemExit(
                f"error: the rung-1 table at {path} lacks {missing} stitches; finish it with "
                "python -m benchmarks.bench_rung1 --build"
            )
        return cls(gt=gt, records=records, meta=meta, raw=raw)

    def ok(self, key: str, rung: int = 1) -> bool:
        """Whether a candidate evaluated without error up to ``rung``."""
        if "error" in self.gt.records[key]:
            return False
        return rung == 0 or key.startswith("anchor|") or "error" not in self.records[key]

    def acc(self, key: str, rung: int) -> float:
        """Validation accuracy of a candidate at a rung (anchors: the same at every rung)."""
        if rung == 0 or key.startswith("anchor|"):
            return float(self.gt.records[key]["val_acc"])
        return float(self.records[key]["val_acc"])

    def macs(self, key: str) -> float:
        """MACs (the same at every rung)."""
        return float(self.gt.records[key]["macs"])

    def candidates(self, rung: int = 1) -> list[str]:
        """Every candidate that evaluated without error up to ``rung`` (anchors first)."""
        anchors = [k for k in self.gt.anchor_keys() if self.ok(k, rung)]
        return anchors + [k for k in self.gt.stitch_keys() if self.ok(k, rung)]


# --------------------------------------------------------------------------- analyses
def hv_convention(t: Rung1Table) -> Hypervolume:
    """The project's convention over every value of both rungs (anchors once)."""
    keys0 = t.candidates(0)
    keys1 = [k for k in t.candidates(1) if k.startswith("stitch|")]
    acc = [t.acc(k, 0) for k in keys0] + [t.acc(k, 1) for k in keys1]
    macs = [t.macs(k) for k in keys0] + [t.macs(k) for k in keys1]
    return Hypervolume.for_space(np.array(acc), np.array(macs), t.gt.num_classes)


def anchor_span(t: Rung1Table) -> tuple[float, float]:
    """MACs of the smallest and of the largest anchor."""
    macs = [t.macs(k) for k in t.gt.anchor_keys()]
    return min(macs), max(macs)


def true_front(t: Rung1Table, rung: int) -> list[str]:
    """Keys of the true front at a rung (anchors are the same at every rung), by MACs."""
    keys = t.candidates(rung)
    acc = np.array([t.acc(k, rung) for k in keys])
    macs = np.array([t.macs(k) for k in keys])
    front = [k for k, m in zip(keys, pareto_mask(acc, macs), strict=True) if m]
    return sorted(front, key=lambda k: (t.macs(k), -t.acc(k, rung)))


def between_anchors(t: Rung1Table, keys: Sequence[str]) -> list[str]:
    """The stitches among ``keys`` strictly between the smallest and largest anchor's MACs."""
    lo, hi = anchor_span(t)
    return [k for k in keys if k.startswith("stitch|") and lo < t.macs(k) < hi]


def front_summary(t: Rung1Table, rung: int, hv: Hypervolume) -> dict[str, Any]:
    """One rung's true front: its points, hypervolume and stitches between the anchors."""
    front = true_front(t, rung)
    acc = [t.acc(k, rung) for k in front]
    between = between_anchors(t, front)
    return {
        "rung": rung,
        "size": len(front),
        "hypervolume": hv(np.array(acc), np.array([t.macs(k) for k in front])),
        "keys": front,
        "between": between,
        "rows": [
            {
                "key": k,
                "label": t.gt.records[k]["label"],
                "kind": t.gt.records[k]["kind"],
                "val_acc": t.acc(k, rung),
                "rung0_val_acc": t.acc(k, 0),
                "rung1_val_acc": t.acc(k, 1),
                "macs": t.macs(k),
                "params": t.gt.records[k]["params"],
                "between": k in between,
            }
            for k in front
        ],
    }


def correlation(t: Rung1Table, top: int) -> dict[str, Any]:
    """How well rung 0 ranks the stitches for rung 1."""
    keys = [k for k in t.candidates() if k.startswith("stitch|")]
    r0 = np.array([t.acc(k, 0) for k in keys])
    r1 = np.array([t.acc(k, 1) for k in keys])
    pairs: dict[tuple[str, str], list[int]] = {}
    for i, k in enumerate(keys):
        rec = t.gt.records[k]
        pairs.setdefault((rec["front"], rec["back"]), []).append(i)
    per_pair = {f"{a} -> {b}": spearman(r0[ix], r1[ix]) for (a, b), ix in pairs.items()}
    finite = [v for v in per_pair.values() if np.isfinite(v)]
    n = min(top, len(keys))
    best0 = {keys[i] for i in np.argsort(-r0, kind="stable")[:n]}
    best1 = {keys[i] for i in np.argsort(-r1, kind="stable")[:n]}
    gain = r1 - r0
    return {
        "stitches": len(keys),
        "spearman": spearman(r0, r1),
        "spearman_per_pair": per_pair,
        "spearman_pair_mean": float(np.mean(finite)) if finite else float("nan"),
        "top": n,
        "top_overlap": len(best0 & best1),
        "gain_mean": float(gain.mean()),
        "gain_median": float(np.median(gain)),
        "worse": int((gain < 0).sum()),
        "rung0_mean": float(r0.mean()),
        "rung1_mean": float(r1.mean()),
    }


def cost(t: Rung1Table) -> dict[str, Any]:
    """Seconds per rung-1 evaluation (one torch thread), with rung 0's for comparison."""
    recs = [r for r in t.records.values() if "error" not in r]

    def stats(values: Sequence[float]) -> dict[str, float]:
        v = np.asarray(values, dtype=float)
        return {
            "median": float(np.median(v)),
            "p90": float(np.percentile(v, 90)),
            "mean": float(v.mean()),
            "total": float(v.sum()),
        }

    return {
        "evaluations": len(recs),
        "failed": len(t.records) - len(recs),
        "wall": stats([r["seconds"] for r in recs]),
        "cpu": stats([r.get("cpu_seconds", r["seconds"]) for r in recs]),
        "finetune": stats([r["finetune_seconds"] for r in recs]),
        "rung0_wall": stats([t.gt.records[k]["seconds"] for k in t.gt.stitch_keys()]),
        "build_seconds": t.raw.get("build_seconds"),
        "threads": t.meta["threads_per_process"],
        "processes": t.meta["processes"],
    }


def record_rung0(t: Rung1Table, order: Sequence[str], budgets, objectives: Sequence[str]):
    """A replay's rung-0 evaluations stored as the search stores them (an in-memory study).

    Each trial is annotated and completed (or failed) by :class:`search.strategy.Recorder`, so
    its user attributes, budget constraint and objective values are the search's own.
    """
    import optuna

    from benchmarks.bench_search import result_of
    from search.core import OBJECTIVES
    from search.strategy import Recorder, objective_values
    from space import Candidate

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


def finetuned_trials(t: Rung1Table, trials, promoted: Sequence[str], objectives: Sequence[str]):
    """Rung-1 trials of the promoted stitches: rung-0 attributes, the rung-1 accuracy.

    A stitch whose rung-1 evaluation failed has none (it stays at rung 0, as in the search).
    """
    import optuna
    from optuna.trial import TrialState

    from search.core import OBJECTIVES, Attr

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
        hv: The hypervolume convention (:func:`hv_convention`).
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
    def of(cls, t: Rung1Table, budgets) -> Truth:
        from search.core import budget_metrics

        hv = hv_convention(t)
        front = true_front(t, 1)
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
        return cls(hv, full, set(front), set(between_anchors(t, front)), best)


def assess(
    t: Rung1Table,
    truth: Truth,
    trials,
    promoted: Sequence[str],
    budgets,
    objectives: Sequence[str],
) -> dict[str, Any]:
    """Scores one promotion of one replay: every candidate at its highest rung."""
    from search.core import Attr
    from search.delivery import select_per_device
    from search.strategy import best_rung

    rung1 = finetuned_trials(t, trials, promoted, objectives)
    candidates = best_rung(trials, rung1)
    keys = [c.user_attrs[Attr.KEY] for c in candidates]
    acc = np.array([c.user_attrs[Attr.VAL_ACC] for c in candidates], dtype=float)
    macs = np.array([t.macs(k) for k in keys])
    at_rung1 = {tr.user_attrs[Attr.KEY] for tr in rung1}
    known = {k for k in keys if k.startswith("anchor|")} | at_rung1
    evaluated = set(keys)
    picks = {}
    for device, pick in select_per_device(candidates, budgets).items():
        best = truth.best[device]
        if pick is None:
            picks[device] = None
            continue
        key = pick.user_attrs[Attr.KEY]
        acc_pick = float(pick.user_attrs[Attr.VAL_ACC])
        picks[device] = {
            "key": key,
            "label": t.gt.records[key]["label"],
            "rung": int(pick.user_attrs.get(Attr.RUNG, 0)),
            "val_acc": acc_pick,
            "regret": None if best["val_acc"] is None else best["val_acc"] - acc_pick,
            "stitch_beats_anchors": key.startswith("stitch|")
            and best["best_anchor_acc"] is not None
            and acc_pick > best["best_anchor_acc"],
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


#: The promotion rules compared (id, description).
RULES = (
    ("default", "the study's rule (`promotion_order`)"),
    ("random", "random, as many rung-0 stitches"),
    ("oracle", "oracle: as many, the most accurate at rung 1"),
    ("none", "no promotion (rung 0 only)"),
)


def replay_promotion(args: argparse.Namespace, t: Rung1Table, plan, budgets):
    """The default rung-0 search replayed, then each promotion rule scored per seed.

    Args:
        args: ``ground_truth``, ``budget_table``, ``seeds``, ``replay_processes`` and the
            ``grid_*`` lists.
        t: The two tables.
        plan: The study's plan.
        budgets: The devices.
    """
    from benchmarks.bench_search import replay_all
    from search.core import Attr, evaluated_trials
    from search.strategy import promotion_order

    study_def = plan.study
    ft = study_def.finetune
    objectives = list(study_def.objectives)
    rule = rule_spec(study_def)
    signals = study_signals(plan=plan, cka=t.gt.cka, cache_root=Path(args.ground_truth).parent)
    grid_trials = sorted({study_def.trials, *(args.grid_trials or ())})
    t0 = time.perf_counter()
    _, _, runs = replay_all(
        args.ground_truth,
        args.budget_table,
        ["default"],
        seeds=args.seeds,
        total=max(grid_trials),
        concurrency=study_def.workers,
        study_sampler=study_def.sampler,
        study_rule=rule,
        processes=args.replay_processes,
        signals=signals,
    )
    replay_seconds = time.perf_counter() - t0
    truth = Truth.of(t, budgets)
    grid = promotion_grid(args, t, truth, runs, plan, budgets, grid_trials)
    seeds = []
    for run in runs:
        study = record_rung0(t, run["order"][: study_def.trials], budgets, objectives)
        trials = evaluated_trials(study)
        order = promotion_order(
            trials,
            budgets,
            per_device=ft.promote.per_device,
            front=study.best_trials if ft.promote.front else (),
        )
        default = [tr.user_attrs[Attr.KEY] for tr in order][: ft.max_trials]
        stitches = [
            tr.user_attrs[Attr.KEY] for tr in trials if tr.user_attrs.get(Attr.KIND) == "stitch"
        ]
        rng = random.Random(run["seed"])
        n = len(default)
        rand = rng.sample(stitches, min(n, len(stitches)))
        tuned = [k for k in stitches if t.ok(k)]
        oracle = sorted(tuned, key=lambda k: (-t.acc(k, 1), t.macs(k)))[:n]
        promotions = {"default": default, "random": rand, "oracle": oracle, "none": []}
        seeds.append(
            {
                "seed": run["seed"],
                "rung0_evaluations": len(run["order"][: study_def.trials]),
                "rung0_stitches": len(stitches),
                "promotion_order_length": len(order),
                **{
                    rule: assess(t, truth, trials, keys, budgets, objectives)
                    for rule, keys in promotions.items()
                },
            }
        )
    return {
        "seeds": seeds,
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
    }


def promotion_grid(args, t: Rung1Table, truth: Truth, runs, plan, budgets, grid_trials):
    """Alternatives to the study's promotion settings scored on the same replays.

    Each cell (rung-0 ``trials``, ``per_device``, ``max_trials``; rung-0 front promoted as the
    study says) is scored per seed as the default promotion is: rung-1 evaluations, rung-1
    true-front stitches between the anchors fine-tuned, hypervolume, and per device the seeds
    whose pick is a stitch beating every anchor that fits.
    """
    from search.core import Attr, evaluated_trials
    from search.strategy import promotion_order

    ft = plan.study.finetune
    objectives = list(plan.study.objectives)
    per_devices = sorted({ft.promote.per_device, *(args.grid_per_device or ())})
    max_trials = sorted({ft.max_trials, *(args.grid_max_trials or ())})
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
    out = []
    for (trials, pd, mt), scores in sorted(cells.items()):
        out.append(
            {
                "trials": trials,
                "per_device": pd,
                "max_trials": mt,
                "study": (trials, pd, mt)
                == (plan.study.trials, ft.promote.per_device, ft.max_trials),
                "seeds": len(scores),
                "rung1_evaluations": float(np.mean([s["rung1_evaluations"] for s in scores])),
                "between_found": float(np.mean([s["between_found"] for s in scores])),
                "front_found": float(np.mean([s["front_found"] for s in scores])),
                "hv_fraction": float(np.mean([s["hv_fraction"] for s in scores])),
                "wins": {
                    b.device: sum(
                        1
                        for s in scores
                        if s["picks"].get(b.device) and s["picks"][b.device]["stitch_beats_anchors"]
                    )
                    for b in budgets
                },
                "pick_acc": {
                    b.device: float(
                        np.mean(
                            [
                                s["picks"][b.device]["val_acc"]
                                for s in scores
                                if s["picks"].get(b.device)
                            ]
                        )
                    )
                    if any(s["picks"].get(b.device) for s in scores)
                    else None
                    for b in budgets
                },
            }
        )
    return out


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
    gt = rung0_table(plan, args)
    t = Rung1Table.load(args.rung1, gt, tag=finetune_tag(plan))
    study, budgets = plan.study, list(plan.budgets)
    hv = hv_convention(t)
    res: dict[str, Any] = {
        "machine": machine_info(),
        "ground_truth": str(args.ground_truth),
        "rung1_table": str(args.rung1),
        "meta": t.meta,
        "build_machine": t.raw.get("machine"),
        "hv_convention": hv.to_dict(),
        "anchor_span": list(anchor_span(t)),
        "anchors": {
            a: {"val_acc": t.acc(f"anchor|{a}", 0), "macs": t.macs(f"anchor|{a}")}
            for a in gt.anchor_names()
        },
        "fronts": {str(r): front_summary(t, r, hv) for r in (0, 1)},
        "correlation": correlation(t, study.finetune.max_trials),
        "cost": cost(t),
        "replay": replay_promotion(args, t, plan, budgets),
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
    meta, rep, cor, c = res["meta"], res["replay"], res["correlation"], res["cost"]
    f0, f1 = res["fronts"]["0"], res["fronts"]["1"]
    ft = meta["finetune"]
    lo, hi = res["anchor_span"]
    seeds = rep["seeds"]
    n_front, n_between = len(rep["truth"]["front"]), len(rep["truth"]["between"])
    build_machine = res.get("build_machine") or {}
    lines = [
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
        "",
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
                for rule, desc in RULES
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
        "",
        *_grid_lines(res),
        *_target_lines(res),
    ]
    return "\n".join(lines)


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
    parser.add_argument("--seeds", type=int, default=10, help="replay seeds")
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
        raw = build(args)
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
