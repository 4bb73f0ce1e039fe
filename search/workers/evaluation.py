"""The evaluation process: a child of a Ray worker that evaluates candidates on request.

It loads the study's anchors and data once (:class:`TrialContext`, pickled by the driver),
then answers each request with :func:`run_candidate`'s metrics. Started by
:class:`search.workers.EvaluationProcess` as ``python -m search.workers.evaluation FD``; it
is the only process of a worker that imports torch and the evaluators.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from evaluators import (
    CandidateResult,
    DataSplits,
    FinetuneSettings,
    evaluate_candidate,
    evaluate_member,
)
from search.core import Attr, finetune_attrs, macs_uncounted_text
from space import Anchor, Candidate, StitchedFamily, load_anchor, load_family, member_name


@dataclass
class TrialContext:
    """Everything a worker needs besides the candidate (shipped once via the object store).

    Attributes:
        anchors: Anchor id -> keyword arguments for :func:`space.load_anchor` (its timm or
            zoo ``name`` among them; the id when they have none).
        data: The data splits.
        fit_steps: Stitch fine-tuning steps after least squares.
        fit_lr: Fine-tuning learning rate.
        latency_batch: Batch size of the extra latency measurement.
        threads: Torch threads per trial (the trial's CPU share).
        use_gpu: The worker was assigned a GPU: evaluate there (a trial fails when CUDA is
            not usable, see :func:`trial_device`).
        finetune: Rung 1's stitch-only fine-tuning settings (``data.train`` holds its
            training images), or None when the study has no rung 1.
        teacher: The anchor distilled from at rung 1 (``finetune.distill > 0``).
        family: The trained family's JSON (:func:`space.save_family`): its members are
            evaluated as they are at rung 2; None when there is none.
        macs_allow: Operators fvcore cannot count that may count as zero MACs (the study's
            ``macs.allow_unsupported``).
    """

    anchors: dict[str, dict[str, Any]]
    data: DataSplits
    fit_steps: int = 0
    fit_lr: float = 1e-3
    latency_batch: int = 1
    threads: int = 1
    use_gpu: bool = False
    finetune: FinetuneSettings | None = None
    teacher: str | None = None
    family: str | None = None
    macs_allow: tuple[str, ...] = ()
    _cache_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self._cache_key = json.dumps(self.anchors, sort_keys=True, default=str)

    def evaluate(
        self,
        candidate: Candidate,
        anchors: Mapping[str, Anchor],
        *,
        cka: float | None = None,
        device: str = "cpu",
        test: bool = False,
        measure_latency: bool = True,
        rung: int = 0,
    ) -> CandidateResult:
        """Evaluates ``candidate`` with this context's data and fitting settings.

        Rung 0 fits the stitching layer by least squares; rung 1 then fine-tunes it on the
        training images (``result.finetune``); both use ``anchors`` as they are. Rung 2
        measures the candidate as a member of the trained family (its anchors trained with
        it), fitting nothing. The candidate's resolution (if any) is the size both anchors
        run at.
        """
        if rung >= 2:
            if self.family is None:
                raise ValueError("rung 2 needs the trained family (TrialContext.family)")
            return evaluate_member(
                trained_family(self.family),
                member_name(candidate),
                self.data,
                test=test,
                device=device,
                threads=self.threads,
                measure_latency=measure_latency,
                latency_batch=self.latency_batch,
                macs_allow=self.macs_allow,
            )
        tune = self.finetune if rung >= 1 and not candidate.is_anchor else None
        if rung >= 1 and self.finetune is None:
            raise ValueError("rung 1 needs the study's finetune settings")
        teacher = None
        if tune is not None and tune.distill > 0 and self.teacher is not None:
            teacher = anchors[self.teacher].model
        return evaluate_candidate(
            candidate.config,
            anchors,
            self.data,
            fit_steps=self.fit_steps,
            fit_lr=self.fit_lr,
            cka=cka,
            latency_batch=self.latency_batch,
            measure_latency=measure_latency,
            test=test,
            device=device,
            threads=self.threads,
            finetune=tune,
            teacher=teacher,
            resolution=candidate.resolution,
            macs_allow=self.macs_allow,
        )


_ANCHORS: dict[str, dict[str, Anchor]] = {}
_FAMILIES: dict[str, StitchedFamily] = {}


def trained_family(path: str) -> StitchedFamily:
    """The family saved at ``path``, loaded (and verified) once per process."""
    if path not in _FAMILIES:
        _FAMILIES.clear()
        _FAMILIES[path] = load_family(path)
    return _FAMILIES[path]


def anchors_from_specs(specs: dict[str, dict[str, Any]]) -> dict[str, Anchor]:
    """Loads every anchor of a study (by id, with its load kwargs; ``name`` defaults to the id)."""
    out = {}
    for anchor_id, kwargs in specs.items():
        out[anchor_id] = load_anchor(**{"name": anchor_id, **kwargs})
    return out


def _anchors(ctx: TrialContext) -> dict[str, Anchor]:
    """The study's anchors, loaded once per process."""
    if ctx._cache_key not in _ANCHORS:
        _ANCHORS.clear()
        _ANCHORS[ctx._cache_key] = anchors_from_specs(ctx.anchors)
    return _ANCHORS[ctx._cache_key]


def trial_device(use_gpu: bool) -> str:
    """Where a trial evaluates: ``"cuda"`` when its worker was assigned a GPU, else ``"cpu"``.

    Raises:
        RuntimeError: A GPU was assigned but CUDA is not usable in this process; the trial
            fails with that reason rather than being measured on the CPU unnoticed.
    """
    if not use_gpu:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    raise RuntimeError(
        f"this trial's worker was assigned a GPU, but CUDA is not usable in its evaluation "
        f"process (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); it is not "
        "measured on the CPU instead: fix the worker's CUDA set-up, or run without GPUs"
    )


def run_candidate(
    config: dict[str, Any], ctx: TrialContext, *, fault: str | None = None
) -> dict[str, Any]:
    """Evaluates one candidate; never raises (errors are returned as ``{"error": ...}``).

    Args:
        config: The trial's configuration (``candidate`` JSON, ``cka``).
        ctx: The run's context.
        fault: Test-only fault to inject (``raise``, ``nan``, ``sleep:N``, ``crash``).
    """
    start = time.perf_counter()
    try:
        torch.set_num_threads(max(1, ctx.threads))
        device = trial_device(ctx.use_gpu)
        candidate = Candidate.from_json(config["candidate"])
        _inject(fault)
        rung = int(config.get("rung", 0))
        result = ctx.evaluate(
            candidate,
            _anchors(ctx),
            cka=config.get("cka"),
            device=device,
            rung=rung,
            measure_latency=rung == 0,  # rung 1 keeps rung 0's costs (same architecture)
        )
        out = result.to_dict()
        out = {
            k: v for k, v in out.items() if not isinstance(v, dict | list) or k == "fit_residual"
        }
        out.update(finetune_attrs(result.finetune))
        if result.macs_uncounted:
            out[Attr.MACS_UNCOUNTED] = macs_uncounted_text(result.macs_uncounted)
        if isinstance(out.get("fit_residual"), dict):
            out["fit_residual"] = {k: float(v) for k, v in out["fit_residual"].items()}
        if fault == "nan":
            out[Attr.VAL_ACC] = math.nan
    except Exception as e:  # a failed trial is recorded, the search goes on
        tb = traceback.extract_tb(e.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        out = {"error": f"{type(e).__name__}: {e}{where}"}
    out[Attr.TRIAL_SECONDS] = round(time.perf_counter() - start, 3)
    out[Attr.HOST] = socket.gethostname()
    out[Attr.EVAL_PID] = os.getpid()
    return out


def _inject(fault: str | None) -> None:
    if not fault or fault == "none":
        return
    if fault == "raise":
        raise RuntimeError("injected test fault (STITCHSEARCH_TEST_FAULT=raise)")
    if fault and fault.startswith("sleep:"):
        time.sleep(float(fault.split(":", 1)[1]))
    if fault == "crash":
        os.kill(os.getpid(), signal.SIGKILL)


def serve(fd: int) -> None:
    """The evaluation process: load the context once, then evaluate candidates on request.

    Protocol on the socket ``fd``: the parent sends the pickled :class:`TrialContext` (bytes),
    the child answers ``("ready", None)`` or ``("error", message)``; then each request
    ``(config, fault)`` is answered by ``("result", dict)``.
    """
    conn = Connection(fd)
    parent = os.getppid()
    # Ctrl-C reaches the whole process group; the worker decides what happens to us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch_parent() -> None:  # the worker was killed: nobody wants our results
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch_parent, name="watch-parent", daemon=True).start()
    try:
        ctx = pickle.loads(conn.recv_bytes())
        _anchors(ctx)
    except EOFError:
        os._exit(0)
    except Exception as e:
        conn.send(("error", f"the evaluation process could not start: {type(e).__name__}: {e}"))
        os._exit(1)
    conn.send(("ready", None))
    while True:
        try:
            config, fault = conn.recv()
        except EOFError:
            os._exit(0)
        conn.send(("result", run_candidate(config, ctx, fault=fault)))


if __name__ == "__main__":
    # Serve from the importable module, not __main__: the pickled context names it.
    from search.workers.evaluation import serve as _serve_importable

    _serve_importable(int(sys.argv[1]))
