"""The rung-1 ground truth: every stitch of the study's space fine-tuned once.

Its builder (:func:`build_rung1_table`) evaluates each stitch point of the rung-0 table
(:mod:`benchmarks.lib.ground_truth`) as the search's rung-1 trials evaluate it, cached and
resumable in ``benchmarks/results/rung1_ground_truth.json`` under its candidate key, both
anchors' weights and a tag of the data and fine-tuning settings (:func:`finetune_tag`);
:class:`Rung1Table` joins it with the rung-0 table and gives each rung's true front; the
analyses summarise a front (:func:`front_summary`), how well rung 0 ranks rung 1
(:func:`correlation`) and what a rung-1 evaluation costs (:func:`cost`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.lib.environment import machine_info
from benchmarks.lib.ground_truth import GroundTruth, anchor_identities, data_tag, entry_key
from benchmarks.lib.metrics import Hypervolume, pareto_mask, spearman
from benchmarks.lib.study import load_plan
from benchmarks.lib.tables import Job, TableBuild, build_table, candidate_job
from evaluators import evaluate_candidate
from search.execution import finetune_settings, trial_data
from search.inputs import Plan
from space import Candidate

RUNG1_VERSION = 1
_STATE: dict[str, Any] = {}


def finetune_tag(plan: Plan) -> str:
    """Identifies the data, rung-0 and fine-tuning settings a rung-1 entry was measured with."""
    ft = plan.study.finetune
    settings = json.dumps(finetune_settings(plan).to_dict(), sort_keys=True)
    text = f"{data_tag(plan)}|train={ft.train_images}|teacher={ft.teacher}|finetune={settings}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def teacher_name(plan: Plan, gt: GroundTruth) -> str | None:
    """The anchor rung 1 distils from, as the search picks it (None without distillation).

    The study's ``finetune.teacher``, else the anchor most accurate at rung 0.
    """
    ft = plan.study.finetune
    if ft.distill <= 0:
        return None
    if ft.teacher is not None:
        return ft.teacher
    return max(gt.anchor_names(), key=lambda a: gt.records[f"anchor|{a}"]["val_acc"])


def rung0_table(plan: Plan, ground_truth: Path, study: Path) -> GroundTruth:
    """The rung-0 table at ``ground_truth``, checked against the study's anchors and data.

    Raises:
        SystemExit: It was measured with other anchors or data (says how to rebuild it).
    """
    gt = GroundTruth.load(ground_truth)
    if gt.meta["anchors"] != anchor_identities(plan) or gt.meta["data_tag"] != data_tag(plan):
        raise SystemExit(
            f"error: the rung-0 table {ground_truth} was measured with other anchors or "
            f"data than {study}; rebuild it with python -m benchmarks.bench_ground_truth"
        )
    return gt


# --------------------------------------------------------------------------- the builder
def _init(study: str, budgets: str, threads: int, teacher: str | None) -> None:
    """Per-process set-up: the plan (anchors, data with the training images) once."""
    torch.set_num_threads(threads)
    plan = load_plan(study, budgets)
    _STATE["plan"] = plan
    _STATE["data"] = trial_data(plan)
    _STATE["settings"] = finetune_settings(plan)
    _STATE["threads"] = threads
    _STATE["teacher"] = None if teacher is None else plan.anchors[teacher].model


def _evaluate(item: Job) -> dict[str, Any]:
    """Fine-tunes one stitch in a worker process; failures are recorded, not raised."""
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


def _report(wanted: int):
    """Prints one progress line per fine-tuned stitch, with the ETA."""

    def report(done: int, todo: int, rec: dict[str, Any], seconds: float, entries) -> None:
        eta = seconds / done * (todo - done)
        result = rec.get("error") or f"{rec['rung0_val_acc']:.2f}% -> {rec['val_acc']:.2f}%"
        print(
            f"  {done}/{todo} ({len(entries)}/{wanted} in the table) "
            f"{seconds:.0f}s, ETA {eta / 60:.1f} min: {rec['label']}: {result} "
            f"({rec['seconds']:.1f}s)",
            file=sys.stderr,
            flush=True,
        )

    return report


def build_rung1_table(
    study: Path, budget_table: Path, ground_truth: Path, out: Path, build: TableBuild
) -> dict[str, Any]:
    """Builds or finishes the rung-1 table at ``out``; returns the raw JSON object.

    Every stitch point of the rung-0 table goes through :func:`evaluators.evaluate_candidate`
    with the study's data (``trial_data(plan)``), least squares, then the study's
    ``finetune`` settings; latency and memory are not re-measured (the architecture is
    rung 0's). Largest stitches first, so that the last jobs are short.

    Args:
        study: The study YAML (``finetune.enabled`` true).
        budget_table: Its devices CSV.
        ground_truth: The rung-0 table of the same anchors and data.
        out: The rung-1 table (read, then written).
        build: Processes and threads, and whether to ignore the cached entries or fine-tune
            only a few.

    Raises:
        SystemExit: The study has no rung 1, or the rung-0 table was measured with other
            anchors or data.
    """
    torch.set_num_threads(build.threads)
    plan = load_plan(study, budget_table)
    if not plan.study.finetune.enabled:
        raise SystemExit(f"error: {study}: field 'finetune.enabled' is false; rung 1 needs it true")
    gt = rung0_table(plan, ground_truth, study)
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
            "study_file": str(Path(study)),
            "ground_truth": str(ground_truth),
            "depths": dict(gt.depths),
            "anchors": ids,
            "data_identity": plan.data.identity,
            "data_tag": data_tag(plan),
            "rung1_tag": tag,
            "num_classes": plan.data.num_classes,
            "finetune": finetune_settings(plan).to_dict(),
            "train_images": min(ft.train_images, plan.data.train.num_images),
            "teacher": teacher,
            "threads_per_process": build.threads,
            "processes": build.processes,
        },
        "entries": {},
        "build_seconds": 0.0,
        "machine": machine_info(),
    }

    def on_record(rec: dict[str, Any]) -> None:
        rec["rung0_val_acc"] = gt.records[rec["key"]].get("val_acc")

    return build_table(
        out,
        raw,
        wanted,
        build,
        job=candidate_job(gt.cka),
        evaluate=_evaluate,
        initializer=_init,
        initargs=(str(study), str(budget_table), build.threads, teacher),
        order=lambda c: -gt.records[c.key].get("macs", 0),
        on_record=on_record,
        report=_report(len(wanted)),
        name="rung-1 table",
    )


# --------------------------------------------------------------------------- the reader
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
        """Reads a complete table written by :func:`build_rung1_table` for ``gt``'s space.

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

    def hv_convention(self) -> Hypervolume:
        """The project's convention over every value of both rungs (anchors once)."""
        keys0 = self.candidates(0)
        keys1 = [k for k in self.candidates(1) if k.startswith("stitch|")]
        acc = [self.acc(k, 0) for k in keys0] + [self.acc(k, 1) for k in keys1]
        macs = [self.macs(k) for k in keys0] + [self.macs(k) for k in keys1]
        return Hypervolume.for_space(np.array(acc), np.array(macs), self.gt.num_classes)

    def anchor_span(self) -> tuple[float, float]:
        """MACs of the smallest and of the largest anchor."""
        macs = [self.macs(k) for k in self.gt.anchor_keys()]
        return min(macs), max(macs)

    def true_front(self, rung: int) -> list[str]:
        """Keys of the true front at a rung (anchors are the same at every rung), by MACs."""
        keys = self.candidates(rung)
        acc = np.array([self.acc(k, rung) for k in keys])
        macs = np.array([self.macs(k) for k in keys])
        front = [k for k, m in zip(keys, pareto_mask(acc, macs), strict=True) if m]
        return sorted(front, key=lambda k: (self.macs(k), -self.acc(k, rung)))

    def between_anchors(self, keys: Sequence[str]) -> list[str]:
        """The stitches among ``keys`` strictly between the smallest and largest anchor's MACs."""
        lo, hi = self.anchor_span()
        return [k for k in keys if k.startswith("stitch|") and lo < self.macs(k) < hi]


# --------------------------------------------------------------------------- analyses
def front_summary(t: Rung1Table, rung: int, hv: Hypervolume) -> dict[str, Any]:
    """One rung's true front: its points, hypervolume and stitches between the anchors."""
    front = t.true_front(rung)
    acc = [t.acc(k, rung) for k in front]
    between = t.between_anchors(front)
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
