"""One candidate, end to end: build, fit, and measure accuracy, cost and CKA.

A candidate is either a :class:`space.StitchConfig` (a stitched network) or a plain anchor
name (the anchor itself). :func:`evaluate_candidate` returns a :class:`CandidateResult`
with everything the search records.

Cost of an evaluation, and how it is kept close to the forward passes it needs: least
squares runs each anchor once per calibration batch (once in total for a self-stitch);
fine-tuning reuses the front activations of that pass; MACs and parameter counts are
cached per configuration and anchor cut (process-wide), so a search counts each once; the
latency measurement is capped (warm-up 3, at most 30 timed calls or ``latency_seconds``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from evaluators.data import DataSplits
from evaluators.finetune import FinetuneSettings, finetune_stitch_layer
from evaluators.fit import FitResult, accuracy, fit_stitch
from evaluators.latency import measure_latency, measure_memory
from evaluators.macs import MacsCount, fvcore_macs
from evaluators.pair_cache import anchor_identity
from evaluators.params import anchor_used_parameters, stitched_param_counts, stitched_parameters
from space import Anchor, StitchConfig, StitchedFamily, StitchedNet, build_stitched


@dataclass
class CandidateResult:
    """Everything measured about one candidate.

    Attributes:
        kind: ``"anchor"`` or ``"stitch"``.
        config: The stitch configuration as a dict, ``None`` for an anchor.
        anchors: Names of the anchors involved (front first).
        val_acc: Validation top-1 in percent (what the search optimises).
        val_top5: Validation top-5 in percent, ``None`` for 5 classes or fewer.
        test_acc: Test top-1 in percent, ``None`` unless asked for.
        test_top5: Test top-5 in percent, ``None`` unless asked for (and > 5 classes).
        macs: Multiply-accumulates of one image (fvcore).
        macs_uncounted: Operators fvcore could not count (counted as zero) that the study
            allowed (``macs_allow``), with their calls; empty for a full count.
        params: Parameters the forward pass uses: the front anchor's stem and blocks
            ``[0, k)``, the stitching layer, the back anchor's blocks ``[j, n)`` and head
            (a tensor shared by both halves of a self-stitch counts once); for an anchor,
            all the parameters its forward pass uses.
        stitch_params: Parameters of the stitching layer (0 for an anchor).
        latency_ms: Median latency at batch 1, ``None`` when not measured.
        latency_spread_ms: Inter-quartile range of that latency.
        latency_batch: The configurable batch size of the second measurement.
        latency_batch_ms: Median latency at ``latency_batch`` (equal to ``latency_ms`` for
            batch 1).
        memory_mb: Peak activation memory at batch 1 plus the used parameters' bytes, in
            MiB; ``None`` when not measured.
        activation_mb: The peak activation part of ``memory_mb``.
        cka: CKA at the stitch point (front cut ``k`` vs back cut ``j``), when given.
        fit_residual: Least-squares relative residual per linear part of the stitch.
        residual: Least-squares relative residual (``1 - R^2``) over the stitch's whole
            target, the stitch-point signal of :mod:`evaluators.signals` (``None`` for an
            anchor).
        fit_steps: Fine-tuning steps of the stitching layer on calibration images.
        fit_seconds: Time of least squares and fine-tuning on calibration images.
        finetune: Rung 1, stitch-only fine-tuning on training images: the settings and
            :class:`evaluators.FinetuneResult` (``{"settings": ..., **result}``), or None.
        eval_seconds: Time of everything else (accuracy, MACs, params, latency, memory).
        val_images: Validation images evaluated.
        device: Where the candidate ran.
        threads: Torch threads during the evaluation.
        input_size: The ``[C, H, W]`` images the network ran at (its resolution).
        net: The evaluated module (a fitted :class:`space.StitchedNet`, or the anchor's
            model); not serialised by :meth:`to_dict`.
    """

    kind: Literal["anchor", "stitch"]
    config: dict[str, Any] | None
    anchors: list[str]
    val_acc: float
    val_top5: float | None
    test_acc: float | None
    test_top5: float | None
    macs: int
    params: int
    stitch_params: int
    latency_ms: float | None
    latency_spread_ms: float | None
    latency_batch: int
    latency_batch_ms: float | None
    memory_mb: float | None
    activation_mb: float | None
    cka: float | None
    fit_residual: dict[str, float]
    fit_steps: int
    fit_seconds: float
    eval_seconds: float
    val_images: int
    device: str
    threads: int
    finetune: dict[str, Any] | None = None
    residual: float | None = None
    input_size: list[int] | None = None
    macs_uncounted: dict[str, int] = field(default_factory=dict)
    net: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict of every field except ``net``."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "net"}
        return {k: type(v)(v) if type(v) in (dict, list) else v for k, v in values.items()}


# (front identity, back identity, k, j, input size) -> MACs of one image; process-wide.
_MACS: dict[tuple, MacsCount] = {}


def _macs(
    key: tuple, model: nn.Module, input_size: tuple[int, ...], allow: Collection[str], label: str
) -> tuple[int, dict[str, int]]:
    """MACs of one image (cached) and the allowed uncounted operators; refuses the others."""
    if key not in _MACS:
        _MACS[key] = fvcore_macs(model, input_size)
    count = _MACS[key]
    return count.total, count.check(allow, label)


@contextlib.contextmanager
def _num_threads(threads: int | None) -> Iterator[int]:
    if threads is None:
        yield torch.get_num_threads()
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


def _anchor(anchors: Mapping[str, Anchor], name: str) -> Anchor:
    if name not in anchors:
        raise ValueError(
            f"candidate names anchor {name!r}, which is not among the loaded anchors "
            f"{sorted(anchors)}"
        )
    return anchors[name]


def _to_device(anchor: Anchor, device: torch.device) -> None:
    param = next(anchor.model.parameters())
    if param.device != device:
        anchor.model.to(device)


def _cka_at(config: StitchConfig, cka: float | None, matrix: np.ndarray | None) -> float | None:
    if cka is not None:
        return float(cka)
    if matrix is None:
        return None
    m = np.asarray(matrix)
    k, j = config.front_block, config.back_block
    if m.ndim != 2 or k >= m.shape[0] or j >= m.shape[1]:
        raise ValueError(
            f"cka_matrix of shape {m.shape} has no entry [{k}, {j}] for {config}; pass the "
            "matrix of this ordered anchor pair, indexed by cuts"
        )
    return float(m[k, j])


def evaluate_candidate(
    candidate: StitchConfig | str,
    anchors: Mapping[str, Anchor],
    data: DataSplits,
    *,
    fit_steps: int = 0,
    fit_lr: float = 1e-3,
    cka: float | None = None,
    cka_matrix: np.ndarray | None = None,
    latency_batch: int = 1,
    measure_latency: bool = True,
    test: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    latency_seconds: float = 1.0,
    finetune: FinetuneSettings | None = None,
    teacher: nn.Module | None = None,
    resolution: int | None = None,
    macs_allow: Collection[str] = (),
) -> CandidateResult:
    """Builds, fits and measures one candidate.

    Args:
        candidate: A stitch configuration, or an anchor name (the bare anchor).
        anchors: Loaded anchors by name. On a CUDA device they are moved there in place.
        data: Calibration (least squares, fine-tuning), validation and test splits.
        fit_steps: Fine-tuning steps of the stitching layer after least squares (on the
            calibration split, cycled; cross-entropy, AdamW).
        fit_lr: Fine-tuning learning rate.
        cka: CKA at the stitch point, if already known.
        cka_matrix: The pair's CKA matrix indexed by cuts (:func:`evaluators.cka_matrix`);
            its entry ``[k, j]`` is used when ``cka`` is not given.
        latency_batch: Batch size of the second latency measurement.
        measure_latency: Measure latency and memory (off: those fields are ``None``).
        test: Also report test accuracy (final reporting only).
        device: ``"cpu"`` or a CUDA device.
        threads: ``torch.set_num_threads`` for the evaluation (the caller's CPU share);
            restored afterwards.
        latency_seconds: Time cap of each latency measurement.
        finetune: Rung 1: after least squares, fine-tune the stitching layer alone on
            ``data.train`` with these settings (stitches only; ignored for an anchor).
        teacher: The model to distil from when ``finetune.distill > 0``.
        resolution: Run at ``resolution`` x ``resolution`` pixels: both anchors see the
            images resized to it (:meth:`space.Anchor.at_resolution`), and MACs, latency and
            memory are measured there. ``None``: the front anchor's native size.
        macs_allow: Operators fvcore cannot count that may count as zero MACs (the study's
            ``macs.allow_unsupported``); the result records those it met.

    Returns:
        The result; ``result.net`` holds the fitted network.

    Raises:
        evaluators.UncountedOpsError: fvcore cannot count an operator of the candidate that
            ``macs_allow`` does not list.
        ValueError: Unknown anchors, a class count that differs from the data's, a bad
            configuration, an anchor that cannot run at ``resolution``, non-finite
            activations or logits.
    """
    dev = torch.device(device)
    if resolution is not None:
        names = [candidate] if isinstance(candidate, str) else [candidate.front, candidate.back]
        anchors = {n: _anchor(anchors, n).at_resolution(resolution) for n in set(names)}
    if isinstance(latency_batch, bool) or not isinstance(latency_batch, int) or latency_batch < 1:
        raise ValueError(f"latency_batch must be a positive integer, got {latency_batch!r}")
    with _num_threads(threads) as n_threads:
        run = _Run(
            device=dev,
            threads=n_threads,
            test=test,
            latency=measure_latency,
            latency_batch=latency_batch,
            latency_seconds=latency_seconds,
            macs_allow=tuple(macs_allow),
        )
        if isinstance(candidate, str):
            return _evaluate_anchor(candidate, anchors, data, run)
        if not isinstance(candidate, StitchConfig):
            raise ValueError(
                f"a candidate is a StitchConfig or an anchor name, got {type(candidate).__name__}"
            )
        front, back = _anchor(anchors, candidate.front), _anchor(anchors, candidate.back)
        _check_classes(back, data)
        cka_value = _cka_at(candidate, cka, cka_matrix)
        for a in (front, back):
            _to_device(a, run.device)
        t0 = time.perf_counter()
        net = build_stitched(front, back, candidate)
        fit = fit_stitch(net, data.calibration, steps=fit_steps, lr=fit_lr, device=run.device)
        fit_seconds = time.perf_counter() - t0
        tuned = None
        if finetune is not None:
            tuned = _finetune(net, data, finetune, teacher, run.device)
        return _measure_stitch(net, data, run, cka_value, fit, fit_seconds, tuned)


@dataclass(frozen=True)
class _Run:
    """How :func:`evaluate_candidate` measures: where, on how many threads, and what."""

    device: torch.device
    threads: int
    test: bool
    latency: bool
    latency_batch: int
    latency_seconds: float
    macs_allow: tuple[str, ...] = ()


def _check_classes(anchor: Anchor, data: DataSplits) -> None:
    if anchor.num_classes != data.num_classes:
        raise ValueError(
            f"anchor {anchor.name!r} has {anchor.num_classes} classes but the data "
            f"{data.name!r} has {data.num_classes}; load the anchor with "
            f"num_classes={data.num_classes}"
        )


def _finetune(
    net: StitchedNet,
    data: DataSplits,
    settings: FinetuneSettings,
    teacher: nn.Module | None,
    dev: torch.device,
) -> dict[str, Any]:
    """Rung 1 on the training split: the settings and the :class:`FinetuneResult`, as a dict."""
    if data.train is None:
        raise ValueError(
            f"fine-tuning needs training images, but the {data.name!r} splits have none"
        )
    result = finetune_stitch_layer(net, data.train, settings, teacher=teacher, device=dev)
    return {"settings": settings.to_dict(), **result.to_dict()}


def _measure_stitch(
    net: StitchedNet,
    data: DataSplits,
    run: _Run,
    cka: float | None,
    fit: FitResult,
    fit_seconds: float,
    tuned: dict[str, Any] | None,
) -> CandidateResult:
    """Accuracy and cost of a fitted stitched network, with how it was fitted."""
    t1 = time.perf_counter()
    scores = _scores(net, data, run, net.input_size)
    front, back, config = net.front, net.back, net.config
    key = (anchor_identity(front), anchor_identity(back), config.front_block, config.back_block)
    key += (tuple(front.input_size), tuple(back.input_size))
    macs, uncounted = _macs(key, net, net.input_size, run.macs_allow, f"candidate {config}")
    counts = stitched_param_counts(net)
    used = stitched_parameters(net)
    cost = _cost(net, net.input_size, used, run)
    return CandidateResult(
        kind="stitch",
        config=config.to_dict(),
        anchors=[front.name, back.name],
        **scores,
        macs=macs,
        params=counts["total"],
        stitch_params=counts["stitch"],
        **cost,
        cka=cka,
        fit_residual={k: float(v) for k, v in fit.residual.items()},
        fit_steps=fit.steps,
        fit_seconds=fit_seconds,
        eval_seconds=time.perf_counter() - t1,
        device=str(run.device),
        threads=run.threads,
        finetune=tuned,
        residual=fit.total_residual,
        input_size=list(net.input_size),
        macs_uncounted=uncounted,
        net=net,
    )


def _scores(
    model: nn.Module, data: DataSplits, run: _Run, input_size: tuple[int, ...]
) -> dict[str, Any]:
    """Validation (and, when asked, test) accuracy as :class:`CandidateResult` fields."""
    val = accuracy(model, data.validation, device=run.device, input_size=input_size)
    tst = accuracy(model, data.test, device=run.device, input_size=input_size) if run.test else None
    return {
        "val_acc": val.top1,
        "val_top5": val.top5,
        "test_acc": None if tst is None else tst.top1,
        "test_top5": None if tst is None else tst.top5,
        "val_images": val.num_images,
    }


def _cost(
    model: nn.Module, input_size: tuple[int, ...], used: list[nn.Parameter], run: _Run
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "latency_ms": None,
        "latency_spread_ms": None,
        "latency_batch": run.latency_batch,
        "latency_batch_ms": None,
        "memory_mb": None,
        "activation_mb": None,
    }
    if not run.latency:
        return out
    dev, seconds = run.device, run.latency_seconds
    lat = measure_latency(model, input_size, batch_size=1, device=dev, max_seconds=seconds)
    out["latency_ms"] = lat.median_ms
    out["latency_spread_ms"] = lat.iqr_ms
    out["latency_batch_ms"] = lat.median_ms
    if run.latency_batch != 1:
        lat_b = measure_latency(
            model, input_size, batch_size=run.latency_batch, device=dev, max_seconds=seconds
        )
        out["latency_batch_ms"] = lat_b.median_ms
    mem = measure_memory(model, input_size, batch_size=1, device=dev, parameters=used)
    out["memory_mb"] = mem.total_mb
    out["activation_mb"] = mem.peak_activation_bytes / 2**20
    return out


def _evaluate_anchor(
    name: str, anchors: Mapping[str, Anchor], data: DataSplits, run: _Run
) -> CandidateResult:
    anchor = _anchor(anchors, name)
    _check_classes(anchor, data)
    _to_device(anchor, run.device)
    model = anchor.model
    t1 = time.perf_counter()
    scores = _scores(model, data, run, anchor.input_size)
    macs, uncounted = _macs(
        (anchor_identity(anchor), None, None, None, tuple(anchor.input_size), None),
        model,
        anchor.input_size,
        run.macs_allow,
        f"anchor {anchor.name!r}",
    )
    used = anchor_used_parameters(anchor)
    cost = _cost(model, anchor.input_size, used, run)
    return CandidateResult(
        kind="anchor",
        config=None,
        anchors=[anchor.name],
        **scores,
        macs=macs,
        params=sum(p.numel() for p in used),
        stitch_params=0,
        **cost,
        cka=None,
        fit_residual={},
        fit_steps=0,
        fit_seconds=0.0,
        eval_seconds=time.perf_counter() - t1,
        device=str(run.device),
        threads=run.threads,
        input_size=list(anchor.input_size),
        macs_uncounted=uncounted,
        net=model,
    )


def evaluate_member(
    family: StitchedFamily,
    name: str,
    data: DataSplits,
    *,
    test: bool = False,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    measure_latency: bool = False,
    latency_batch: int = 1,
    latency_seconds: float = 1.0,
    macs_allow: Collection[str] = (),
) -> CandidateResult:
    """Measures one member of a trained family as it is (nothing is fitted).

    Args:
        family: The family (:func:`space.load_family`).
        name: The member's name.
        data: Validation (and test) splits.
        test: Also report test accuracy.
        device: ``"cpu"`` or a CUDA device; the member's anchors are moved there.
        threads: ``torch.set_num_threads`` for the evaluation; restored afterwards.
        measure_latency: Measure latency and memory.
        latency_batch: Batch size of the second latency measurement.
        latency_seconds: Time cap of each latency measurement.
        macs_allow: As for :func:`evaluate_candidate`.

    Returns:
        The result; ``result.net`` is the member (a :class:`space.StitchedNet` sharing the
        family's modules, or the anchor's model).

    Raises:
        KeyError: No member of that name.
        ValueError: A class count that differs from the data's, non-finite logits.
    """
    c = family.members[name]
    with _num_threads(threads) as n_threads:
        run = _Run(
            device=torch.device(device),
            threads=n_threads,
            test=test,
            latency=measure_latency,
            latency_batch=latency_batch,
            latency_seconds=latency_seconds,
            macs_allow=tuple(macs_allow),
        )
        if c.is_anchor:
            return _evaluate_anchor(c.front, family.anchors, data, run)
        front, back = family.anchors[c.front], family.anchors[c.back]
        _check_classes(back, data)
        for a in (front, back):
            _to_device(a, run.device)
        stitch = family.stitch_of(name)
        assert stitch is not None
        stitch.to(run.device)
        config = c.config
        assert isinstance(config, StitchConfig)
        net = StitchedNet(front, back, config, stitch)
        fit = FitResult(residual={}, ls_images=0, ls_seconds=0.0)
        return _measure_stitch(net, data, run, None, fit, 0.0, None)
