"""What a Ray worker runs for one trial: evaluate one candidate and report its metrics."""

from __future__ import annotations

import json
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from evaluators import DataSplits, evaluate_candidate
from search.space import Candidate
from space import Anchor, load_anchor


@dataclass
class TrialContext:
    """Everything a worker needs besides the candidate (shipped once via the object store).

    Attributes:
        anchors: Anchor name -> keyword arguments for :func:`space.load_anchor`.
        data: The data splits.
        fit_steps: Stitch fine-tuning steps after least squares.
        fit_lr: Fine-tuning learning rate.
        latency_batch: Batch size of the extra latency measurement.
        threads: Torch threads per trial (the trial's CPU share).
        use_gpu: Evaluate on the GPU when the worker has one.
    """

    anchors: dict[str, dict[str, Any]]
    data: DataSplits
    fit_steps: int = 0
    fit_lr: float = 1e-3
    latency_batch: int = 1
    threads: int = 1
    use_gpu: bool = False
    _cache_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self._cache_key = json.dumps(self.anchors, sort_keys=True, default=str)


_ANCHORS: dict[str, dict[str, Anchor]] = {}


def load_anchors(specs: dict[str, dict[str, Any]]) -> dict[str, Anchor]:
    """Loads every anchor of a study (by name, with its load kwargs)."""
    out = {}
    for name, kwargs in specs.items():
        out[name] = load_anchor(name, **kwargs)
    return out


def _anchors(ctx: TrialContext) -> dict[str, Anchor]:
    """The study's anchors, loaded once per worker process."""
    if ctx._cache_key not in _ANCHORS:
        _ANCHORS.clear()
        _ANCHORS[ctx._cache_key] = load_anchors(ctx.anchors)
    return _ANCHORS[ctx._cache_key]


def candidate_from_json(text: str) -> Candidate:
    """Inverse of ``json.dumps(Candidate.to_dict())``."""
    d = json.loads(text)
    if d["kind"] == "anchor":
        return Candidate(d["anchor"], d["anchor"])
    return Candidate(d["front"], d["back"], int(d["front_block"]), int(d["back_block"]))


def run_candidate(config: dict[str, Any], ctx: TrialContext) -> dict[str, Any]:
    """Evaluates one candidate; never raises (errors are returned as ``{"error": ...}``)."""
    start = time.perf_counter()
    try:
        torch.set_num_threads(max(1, ctx.threads))
        device = "cuda" if ctx.use_gpu and torch.cuda.is_available() else "cpu"
        candidate = candidate_from_json(config["candidate"])
        result = evaluate_candidate(
            candidate.config,
            _anchors(ctx),
            ctx.data,
            fit_steps=ctx.fit_steps,
            fit_lr=ctx.fit_lr,
            cka=config.get("cka"),
            latency_batch=ctx.latency_batch,
            device=device,
            threads=ctx.threads,
        )
        out = result.to_dict()
        out = {
            k: v for k, v in out.items() if not isinstance(v, dict | list) or k == "fit_residual"
        }
        if isinstance(out.get("fit_residual"), dict):
            out["fit_residual"] = {k: float(v) for k, v in out["fit_residual"].items()}
    except Exception as e:  # a failed trial is recorded, the search goes on
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        out = {"error": f"{type(e).__name__}: {e}{where}"}
    out["trial_seconds"] = round(time.perf_counter() - start, 3)
    out["host"] = socket.gethostname()
    return out


def trainable(config: dict[str, Any], ctx: TrialContext) -> None:
    """Ray Tune function trainable: one report per trial."""
    from ray import tune

    tune.report(run_candidate(config, ctx))
