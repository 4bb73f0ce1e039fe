"""The exhaustive ground truth: every candidate of a study's space evaluated once.

Its format (a JSON table: ``version``, ``meta``, the CKA matrices, and ``entries`` keyed by
:func:`entry_key`: the candidate, both anchors' weights and a tag of the data and settings),
the reader every analysis starts from (:class:`GroundTruth`), and the cached, resumable
builder (:func:`build_ground_truth`) behind ``python -m benchmarks.bench_ground_truth``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.lib.environment import machine_info
from benchmarks.lib.metrics import Hypervolume, pareto_mask, spearman
from benchmarks.lib.output import write_json
from benchmarks.lib.study import load_plan, study_cka, study_space
from benchmarks.lib.tables import Job, TableBuild, build_table, candidate_job
from evaluators import anchor_identity, evaluate_candidate
from search.core import SearchSpace
from search.execution import trial_data
from search.inputs import Plan
from space import Candidate

GROUND_TRUTH_VERSION = 1

#: Fields of :class:`evaluators.CandidateResult` kept in the table.
KEEP = (
    "val_acc",
    "val_top5",
    "macs",
    "params",
    "stitch_params",
    "latency_ms",
    "memory_mb",
    "fit_residual",
    "fit_seconds",
    "eval_seconds",
    "val_images",
    "threads",
)

_STATE: dict[str, Any] = {}


def data_tag(plan: Plan) -> str:
    """Identifies the data and evaluation settings a ground-truth entry was measured with."""
    s = plan.study
    text = (
        f"{plan.data.identity}|cal={s.data.calibration}|val={s.data.validation}|"
        f"batch={s.data.batch_size}|fit={s.fit.steps},{s.fit.lr}|lat={s.latency_batch}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def anchor_identities(plan: Plan) -> dict[str, str]:
    """Anchor name -> identity (name and weights SHA-256)."""
    return {n: anchor_identity(a) for n, a in plan.anchors.items()}


def entry_key(candidate: Candidate, identities: Mapping[str, str], tag: str) -> str:
    """Cache key of one candidate: its key, both anchors' weights and the data tag."""
    ids = identities[candidate.front].rsplit("@", 1)[-1][:16]
    if not candidate.is_anchor:
        ids += "/" + identities[candidate.back].rsplit("@", 1)[-1][:16]
    return f"{candidate.key}@{ids}@{tag}"


@dataclass
class GroundTruth:
    """The exhaustive table: every candidate of a study's space evaluated once.

    Attributes:
        meta: Study, anchors, data and settings the table was measured with.
        depths: Anchor name -> stitchable blocks (defines the space).
        records: Candidate key -> measured metrics (``val_acc``, ``macs``, ...).
        cka: CKA matrix per ordered pair ``(front, back)``.
        num_classes: Classes of the data.
        raw: The whole JSON object.
    """

    meta: dict[str, Any]
    depths: dict[str, int]
    records: dict[str, dict[str, Any]]
    cka: dict[tuple[str, str], np.ndarray]
    num_classes: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: Path | str) -> GroundTruth:
        """Reads a table written by :func:`build_ground_truth`; only current entries count.

        Raises:
            SystemExit: The file is missing or incomplete (says how to build it).
        """
        path = Path(path)
        if not path.is_file():
            raise SystemExit(
                f"error: no ground truth at {path}; build it with "
                "python -m benchmarks.bench_ground_truth"
            )
        raw = json.loads(path.read_text())
        meta = raw["meta"]
        space = SearchSpace(meta["depths"])
        records = {}
        for c in space.all_candidates():
            rec = raw["entries"].get(entry_key(c, meta["anchors"], meta["data_tag"]))
            if rec is not None:
                records[c.key] = rec
        missing = len(space) - len(records)
        if missing:
            raise SystemExit(
                f"error: the ground truth at {path} lacks {missing} of {len(space)} candidates; "
                "finish it with python -m benchmarks.bench_ground_truth"
            )
        cka = {tuple(k.split("|", 1)): np.asarray(v, dtype=float) for k, v in raw["cka"].items()}
        return cls(
            meta=meta,
            depths=dict(meta["depths"]),
            records=records,
            cka=cka,
            num_classes=int(meta["num_classes"]),
            raw=raw,
        )

    @property
    def space(self) -> SearchSpace:
        """The search space the table covers."""
        return SearchSpace(self.depths)

    def ok_keys(self) -> list[str]:
        """Keys of the candidates that evaluated without error."""
        return [k for k, r in self.records.items() if "error" not in r]

    def stitch_keys(self) -> list[str]:
        """Keys of the stitch points that evaluated without error (anchors excluded)."""
        return [k for k in self.ok_keys() if self.records[k]["kind"] == "stitch"]

    def anchor_keys(self) -> list[str]:
        """Keys of the anchors."""
        return [f"anchor|{a}" for a in self.depths]

    def points(self, keys: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(accuracy, macs)`` arrays of the given candidate keys (default: all that ran)."""
        keys = self.ok_keys() if keys is None else list(keys)
        acc = np.array([self.records[k]["val_acc"] for k in keys], dtype=float)
        macs = np.array([self.records[k]["macs"] for k in keys], dtype=float)
        return acc, macs

    def front_keys(self, keys: Iterable[str] | None = None) -> list[str]:
        """Keys of the non-dominated candidates among ``keys`` (default: all that ran)."""
        if keys is None:
            keys = self.ok_keys()
        else:
            keys = [k for k in keys if "error" not in self.records[k]]
        if not keys:
            return []
        acc, macs = self.points(keys)
        mask = pareto_mask(acc, macs)
        return [k for k, m in zip(keys, mask, strict=True) if m]

    def hypervolume(self) -> Hypervolume:
        """The normalised hypervolume over this space (see :mod:`benchmarks.lib.metrics`)."""
        acc, macs = self.points()
        return Hypervolume.for_space(acc, macs, self.num_classes)

    def anchor_names(self) -> list[str]:
        """Anchor names in study order."""
        return list(self.depths)


def cka_accuracy_correlation(gt: GroundTruth) -> dict[str, float]:
    """Spearman rank correlation of CKA and accuracy over all stitches and within pairs."""
    stitches = [r for r in gt.records.values() if r["kind"] == "stitch" and "error" not in r]
    rho_all = spearman([r["cka"] for r in stitches], [r["val_acc"] for r in stitches])
    per_pair = []
    for a, b in gt.space.pairs():
        rs = [r for r in stitches if r["front"] == a and r["back"] == b]
        if len(rs) > 2:
            per_pair.append(spearman([r["cka"] for r in rs], [r["val_acc"] for r in rs]))
    finite = [p for p in per_pair if np.isfinite(p)]
    return {"all": rho_all, "per_pair_mean": float(np.mean(finite)) if finite else float("nan")}


# --------------------------------------------------------------------------- the builder
def _init(study: str, budgets: str, threads: int) -> None:
    """Per-process set-up: load the plan (anchors and data) once."""
    torch.set_num_threads(threads)
    plan = load_plan(study, budgets)
    _STATE["plan"] = plan
    _STATE["data"] = trial_data(plan)


def _evaluate(item: Job) -> dict[str, Any]:
    """Evaluates one candidate in a worker process; failures are recorded, not raised."""
    cand_dict, cka = item
    c = Candidate(**cand_dict)
    plan = _STATE["plan"]
    study = plan.study
    t0 = time.perf_counter()
    rec: dict[str, Any] = {
        "key": c.key,
        "label": c.label,
        "kind": "anchor" if c.is_anchor else "stitch",
        **cand_dict,
        "cka": cka,
    }
    try:
        r = evaluate_candidate(
            c.config,
            plan.anchors,
            _STATE["data"],
            fit_steps=study.fit.steps,
            fit_lr=study.fit.lr,
            cka=cka,
            latency_batch=study.latency_batch,
        )
        d = r.to_dict()
        rec.update({k: d[k] for k in KEEP})
    except Exception as e:  # recorded as a failed candidate, as the search would
        rec["error"] = f"{type(e).__name__}: {e}"
    rec["seconds"] = round(time.perf_counter() - t0, 4)
    return rec


def _meta(plan: Plan, space: SearchSpace, study: Path, build: TableBuild) -> dict[str, Any]:
    """What a table is measured with: the study, its anchors, data and settings."""
    return {
        "study": plan.study.name,
        "study_file": str(Path(study)),
        "depths": dict(space.depths),
        "anchors": anchor_identities(plan),
        "data_identity": plan.data.identity,
        "data_tag": data_tag(plan),
        "num_classes": plan.data.num_classes,
        "settings": {
            "calibration": plan.study.data.calibration,
            "validation": plan.study.data.validation,
            "batch_size": plan.study.data.batch_size,
            "cka_images": plan.study.cka.images,
            "fit_steps": plan.study.fit.steps,
            "fit_lr": plan.study.fit.lr,
            "latency_batch": plan.study.latency_batch,
            "threads_per_process": build.threads,
            "processes": build.processes,
        },
    }


def build_ground_truth(
    study: Path, budget_table: Path, out: Path, build: TableBuild
) -> dict[str, Any]:
    """Builds or finishes the table at ``out``; returns the raw JSON object.

    Every candidate goes through :func:`evaluators.evaluate_candidate` with the study's data
    and settings, ``build.threads`` torch threads per process; a complete table gets its
    ``summary`` (:func:`summarise_ground_truth`).

    Args:
        study: The study YAML.
        budget_table: Its devices CSV.
        out: The table (read, then written); the CKA cache goes beside it.
        build: Processes and threads, and whether to ignore the cached entries or evaluate
            only a few.
    """
    torch.set_num_threads(build.threads)
    t_start = time.perf_counter()
    plan = load_plan(study, budget_table)
    space = study_space(plan)
    t0 = time.perf_counter()
    cka = study_cka(plan, space, out.parent)
    cka_seconds = time.perf_counter() - t0
    meta = _meta(plan, space, study, build)
    wanted = {entry_key(c, meta["anchors"], meta["data_tag"]): c for c in space.all_candidates()}
    raw = {
        "version": GROUND_TRUTH_VERSION,
        "meta": meta,
        "cka": {f"{a}|{b}": m.tolist() for (a, b), m in cka.items()},
        "cka_seconds": round(cka_seconds, 2),
        "entries": {},
        "build_seconds": 0.0,
        "machine": machine_info(),
    }

    def report(done: int, todo: int, rec: dict[str, Any], seconds: float, _entries) -> None:
        end = "\n" if done == todo else ""
        print(f"\r  {done}/{todo} evaluated ({seconds:.0f}s)", end=end, file=sys.stderr)

    raw = build_table(  # a complete cached table comes back as read: its build's machine
        out,
        raw,
        wanted,
        build,
        job=candidate_job(cka),
        evaluate=_evaluate,
        initializer=_init,
        initargs=(str(study), str(budget_table), build.threads),
        report=report,
        name="ground truth",
    )
    raw["session_seconds"] = round(time.perf_counter() - t_start, 2)
    if len(raw["entries"]) == len(wanted):
        raw["summary"] = summarise_ground_truth(out, raw)
    write_json(out, raw)
    return raw


def summarise_ground_truth(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The front, hypervolume and timing of a complete table (written to ``path`` first)."""
    write_json(path, raw)
    gt = GroundTruth.load(path)
    ok = [k for k, r in gt.records.items() if "error" not in r]
    front = gt.front_keys(ok)
    hv = gt.hypervolume()
    acc, macs = gt.points(front)
    seconds = [r["seconds"] for r in gt.records.values()]
    front_rows = sorted((gt.records[k] for k in front), key=lambda r: r["macs"])
    return {
        "candidates": len(gt.records),
        "anchors": len(gt.depths),
        "stitches": len(gt.records) - len(gt.depths),
        "failed": len(gt.records) - len(ok),
        "front_size": len(front),
        "front": [
            {
                k: r.get(k)
                for k in ("key", "label", "val_acc", "macs", "params", "cka", "latency_ms")
            }
            for r in front_rows
        ],
        "hypervolume": hv(acc, macs),
        "hv_convention": hv.to_dict(),
        "candidate_seconds_total": round(sum(seconds), 1),
        "candidate_seconds_mean": round(sum(seconds) / len(seconds), 3),
        "anchor_points": {
            a: {
                "val_acc": gt.records[f"anchor|{a}"]["val_acc"],
                "macs": gt.records[f"anchor|{a}"]["macs"],
                "params": gt.records[f"anchor|{a}"]["params"],
            }
            for a in gt.depths
        },
    }
