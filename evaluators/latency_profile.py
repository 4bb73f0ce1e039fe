"""Profiling a device's latency table: every part timed in context, and the overhead fitted.

Tiny parts timed one by one misrepresent a whole forward pass (the per-call Python overhead
dominates each small block, and a part timed alone keeps its caches warm), so
:func:`profile_parts` times large contiguous pieces instead: the prefixes, suffixes, bare
anchors and stitching layers of :mod:`evaluators.latency_parts`.

**Timing** (:func:`time_calls`): after warm-up, each repeat times a loop of calls long
enough (about :data:`REPEAT_SECONDS`) that the timer's own cost vanishes, and reports the
mean per call; the median over repeats is the part's latency, with its inter-quartile range.

**Overhead.** A stitch's three pieces are three calls where the stitched network makes one.
Per runtime and batch size, ``measured = scale * sum of pieces + overhead`` is fitted by
least squares (:func:`fit_overhead`) over a spread sample of stitched networks timed end to
end and the anchors (each as its prefix and suffix at its middle cut, :func:`split_cut`,
against its end-to-end time), and the fit's errors on those networks are recorded.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from evaluators.latency import percentile
from evaluators.latency_parts import (
    anchor_key,
    anchor_latency_record,
    candidate_resolutions,
    cut_info,
    fit_keys,
    prefix_key,
    split_cut,
    stitch_key,
    study_fingerprint,
    suffix_key,
)
from evaluators.latency_table import LatencyTable
from space import Anchor, Candidate, FeatureInfo, StitchConfig, build_stitched, make_stitching_layer

#: Seconds each timed repeat runs its loop of calls for (at least one call).
REPEAT_SECONDS = 0.002

#: A callable that prepares a part to run on a runtime: ``(module, input shape with the
#: batch dimension) -> run``, where ``run()`` does one forward pass.
RunnerFactory = Callable[[nn.Module, tuple[int, ...]], Callable[[], object]]


class _Call(nn.Module):
    """A part as a module: ``fn(x)`` (keeps the anchor's model registered for export)."""

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _part_modules(
    anchors: Mapping[str, Anchor], candidates: Sequence[Candidate]
) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Every part the candidates use: key -> (module, input shape of one image).

    Per anchor and resolution of the candidates: the bare anchor and its prefix and suffix
    at its :func:`split_cut`; each prefix and suffix a stitch cuts at; each stitching layer
    (by kind and shapes).
    """
    sizes = candidate_resolutions(candidates)
    records = {name: anchor_latency_record(a, sizes) for name, a in anchors.items()}
    resized: dict[tuple[str, int | None], tuple[Anchor, list[FeatureInfo]]] = {}

    def at(name: str, r: int | None) -> tuple[Anchor, list[FeatureInfo]]:
        if (name, r) not in resized:
            a = anchors[name] if r is None else anchors[name].at_resolution(r)
            resized[name, r] = (a, a.features())
        return resized[name, r]

    out: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

    def add_prefix(name: str, k: int, r: int | None) -> None:
        key = prefix_key(name, k, r)
        if key not in out:
            a, _ = at(name, r)
            out[key] = (_Call(a.model, lambda x, a=a, k=k: a.forward_front(x, k)), a.input_size)

    def add_suffix(name: str, j: int, r: int | None) -> None:
        key = suffix_key(name, j, r)
        if key not in out:
            a, cuts = at(name, r)
            out[key] = (_Call(a.model, lambda h, a=a, j=j: a.forward_back(h, j)), cuts[j].shape)

    for r in sizes or [None]:
        for name in anchors:
            a, _ = at(name, r)
            out[anchor_key(name, r)] = (a.model, a.input_size)
            m = split_cut(a.num_blocks)
            add_prefix(name, m, r)
            add_suffix(name, m, r)
    for c in candidates:
        r = c.resolution
        if c.is_anchor:
            continue
        add_prefix(c.front, c.front_block, r)
        src = cut_info(records[c.front], c.front_block, r)
        dst = cut_info(records[c.back], c.back_block, r)
        key = stitch_key(src, dst)
        if key not in out:
            layer = make_stitching_layer(src, dst).eval()
            for p in layer.parameters():
                p.requires_grad_(False)
            out[key] = (layer, src.shape)
        add_suffix(c.back, c.back_block, r)
    return out


def time_calls(
    run: Callable[[], object], *, warmup: int = 3, repeats: int = 15
) -> dict[str, float | int]:
    """Times ``run()``: warm-up, then ``repeats`` loops of calls; the mean call per loop.

    Args:
        run: One forward pass.
        warmup: Untimed calls first.
        repeats: Timed loops.

    Returns:
        ``median_ms``, ``p25_ms``, ``p75_ms``, ``iqr_ms``, ``repeats`` and ``calls`` (per
        loop).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        run()
    once = math.inf
    for _ in range(3):  # the fastest of three calls sets the loop length
        t0 = time.perf_counter()
        run()
        once = min(once, time.perf_counter() - t0)
    calls = max(1, min(10_000, math.ceil(REPEAT_SECONDS / max(once, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - t0) * 1000.0 / calls)
    s = sorted(times)
    p25, p75 = percentile(s, 0.25), percentile(s, 0.75)
    return {
        "median_ms": statistics.median(s),
        "p25_ms": p25,
        "p75_ms": p75,
        "iqr_ms": p75 - p25,
        "repeats": repeats,
        "calls": calls,
    }


def torch_runner(module: nn.Module, shape: tuple[int, ...]) -> Callable[[], object]:
    """Runs ``module`` in PyTorch (inference mode) on a fixed random input of ``shape``."""
    param = next(module.parameters(), None)
    x = torch.randn(shape, dtype=param.dtype if param is not None else torch.float32)
    module.eval()

    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


def calibration_stitches(candidates: Sequence[Candidate], count: int) -> list[Candidate]:
    """Up to ``count`` stitches spread evenly over the sorted stitches (deterministic)."""
    stitches = sorted(c for c in candidates if not c.is_anchor)
    if count <= 0 or not stitches:
        return []
    if count >= len(stitches):
        return stitches
    step = len(stitches) / count
    return [stitches[int(i * step + step / 2)] for i in range(count)]


def profile_parts(
    anchors: Mapping[str, Anchor],
    candidates: Sequence[Candidate],
    *,
    device: str,
    study_name: str,
    host: Mapping[str, Any],
    runtimes: Mapping[str, RunnerFactory],
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 3,
    repeats: int = 15,
    calibration: int = 12,
    predict_runtime: str = "torch",
    on_step: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measures every part the candidates use in context, and fits the per-call overhead.

    Times each bare anchor end to end, each prefix and suffix a stitch cuts at (and each
    anchor's at its :func:`split_cut`), and each stitching layer; then the calibration
    stitches end to end, and fits ``measured = scale * sum of pieces + overhead`` over them
    and the anchors (:func:`fit_keys`).

    Args:
        anchors: The study's anchors by name, in the study's order (on the CPU).
        candidates: Every candidate of the study (anchors and stitches).
        device: The device's name (recorded).
        study_name: The study's name (recorded).
        host: The device's identity (recorded).
        runtimes: Runtime name -> :data:`RunnerFactory` (``{"torch": torch_runner}``).
        batch_sizes: Batch sizes to time at (batch 1 first).
        warmup: Untimed calls before each timing.
        repeats: Timed loops per part.
        calibration: Stitched networks measured end to end (besides every anchor) to fit
            the overhead.
        predict_runtime: The runtime predictions use (one of ``runtimes``).
        on_step: Called with a description after every timing (a progress bar).

    Returns:
        The table (``created`` is set by the caller's clock: now, UTC).
    """
    if predict_runtime not in runtimes:
        raise ValueError(f"predict_runtime {predict_runtime!r} is not among {sorted(runtimes)}")
    batches = sorted(set(batch_sizes))
    t_start = time.perf_counter()
    sizes = candidate_resolutions(candidates)
    records = [anchor_latency_record(a, sizes) for a in anchors.values()]
    by_name = {r["name"]: r for r in records}
    modules = _part_modules(anchors, candidates)
    anchor_networks = [Candidate.anchor(n, r) for r in (sizes or [None]) for n in anchors]
    networks = anchor_networks + calibration_stitches(candidates, calibration)
    timing = {"warmup": warmup, "repeats": repeats}
    table_runtimes: dict[str, dict[str, dict[str, Any]]] = {}
    for rt, factory in runtimes.items():
        table_runtimes[rt] = {}
        for batch in batches:
            step = _prefixed(on_step, f"{rt} b{batch}")
            parts = {}
            for key, (module, shape) in modules.items():
                parts[key] = time_calls(factory(module, (batch, *shape)), **timing)
                step(key)
            fit = _fit_networks(anchors, networks, parts, by_name, factory, batch, timing, step)
            table_runtimes[rt][str(batch)] = _runtime_entry(parts, fit)
    study = {
        "name": study_name,
        "fingerprint": study_fingerprint(records),
        "anchors": records,
    }
    return LatencyTable(
        device=device,
        created="",
        host=dict(host),
        study=study,
        settings={
            "warmup": warmup,
            "repeats": repeats,
            "repeat_seconds": REPEAT_SECONDS,
            "batch_sizes": batches,
            "calibration_networks": len(networks),
            "runtimes": list(runtimes),
        },
        runtimes=table_runtimes,
        predict_runtime=predict_runtime,
        profile_seconds=time.perf_counter() - t_start,
    )


def _prefixed(on_step: Callable[[str], None] | None, prefix: str) -> Callable[[str], None]:
    """``on_step`` with every description after ``prefix`` (does nothing without one)."""

    def step(what: str) -> None:
        if on_step:
            on_step(f"{prefix} {what}")

    return step


#: One network of the overhead fit: ``(candidate, measured ms, sum of its pieces' ms)``.
FitPoint = tuple[Candidate, float, float]


def _fit_networks(
    anchors: Mapping[str, Anchor],
    networks: Sequence[Candidate],
    parts: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    factory: RunnerFactory,
    batch: int,
    timing: Mapping[str, int],
    step: Callable[[str], None],
) -> list[FitPoint]:
    """Each network's end-to-end time beside the sum of its pieces (:func:`fit_keys`).

    A bare anchor's end-to-end time is its part; a stitch is timed end to end here.
    """
    fit = []
    for c in networks:
        if c.is_anchor:  # timed end to end among the parts
            measured = parts[anchor_key(c.front, c.resolution)]["median_ms"]
        else:
            net, size = _network(anchors, c)
            measured = time_calls(factory(net, (batch, *size)), **timing)["median_ms"]
            step(c.label)
        total = sum(parts[k]["median_ms"] for k in fit_keys(c, records))
        fit.append((c, measured, total))
    return fit


def _runtime_entry(parts: dict[str, Any], fit: Sequence[FitPoint]) -> dict[str, Any]:
    """A runtime's entry at one batch size: the fitted overhead, the fit's errors, the parts.

    ``fit.fallback`` says why the scale is 1 instead of the least-squares fit (``None``: the
    fit was used; see :func:`fit_overhead`).
    """
    scale, overhead, fallback = fit_overhead([s for _, _, s in fit], [m for _, m, _ in fit])
    errors = [abs(scale * s + overhead - m) / m * 100 for _, m, s in fit if m > 0]
    return {
        "scale": scale,
        "overhead_ms": overhead,
        "fit": {
            "networks": [
                {"candidate": c.label, "measured_ms": m, "parts_ms": s} for c, m, s in fit
            ],
            "median_abs_error_pct": statistics.median(errors) if errors else 0.0,
            "max_abs_error_pct": max(errors, default=0.0),
            "fallback": fallback,
        },
        "parts": parts,
    }


#: The fitted scales :func:`fit_overhead` accepts.
SCALE_RANGE = (0.5, 2.0)


def fit_overhead(
    parts_ms: Sequence[float], measured_ms: Sequence[float]
) -> tuple[float, float, str | None]:
    """Fits ``measured = scale * sum of parts + overhead`` over networks timed end to end.

    Least squares over the networks; with fewer than three networks, or a scale outside
    :data:`SCALE_RANGE` (too few or too similar networks), the scale is 1 and the overhead
    the median difference, and the third value says so.

    Returns:
        ``(scale, overhead_ms, fallback)``: ``fallback`` is ``None`` when the least-squares
        fit was used, else one line saying why it was not and what replaced it.
    """
    if not parts_ms:
        return 1.0, 0.0, "no network was timed end to end: scale 1, no overhead"
    n = len(parts_ms)
    why = f"{n} network(s) timed end to end are too few to fit a scale (3 needed)"
    if n >= 3:
        x = torch.tensor(parts_ms, dtype=torch.float64)
        y = torch.tensor(measured_ms, dtype=torch.float64)
        a = torch.stack([x, torch.ones_like(x)], dim=1)
        sol = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
        scale, overhead = float(sol[0]), float(sol[1])
        low, high = SCALE_RANGE
        if low <= scale <= high:
            return scale, overhead, None
        why = (
            f"the fitted scale {scale:.3g} is outside [{low:g}, {high:g}] (the {n} networks "
            "timed end to end are too few or too alike)"
        )
    overhead = statistics.median(m - s for s, m in zip(parts_ms, measured_ms, strict=True))
    return 1.0, overhead, f"{why}: scale 1 and the median difference {overhead:+.3f} ms used"


def count_steps(
    anchors: Mapping[str, Anchor],
    candidates: Sequence[Candidate],
    *,
    runtimes: int,
    batch_sizes: Sequence[int],
    calibration: int,
) -> int:
    """How many timings :func:`profile_parts` makes (for a progress bar's total)."""
    parts = len(_part_modules(anchors, candidates))
    stitches = len(calibration_stitches(candidates, calibration))  # anchors are parts
    return runtimes * len(set(batch_sizes)) * (parts + stitches)


def _network(anchors: Mapping[str, Anchor], c: Candidate) -> tuple[nn.Module, tuple[int, ...]]:
    """The candidate's network and the ``(C, H, W)`` it runs at.

    A stitch gets its layer at default init (timing only); the size is the candidate's
    resolution, else the front anchor's native size.
    """
    front, back = anchors[c.front], anchors[c.back]
    if c.resolution is not None:
        front, back = front.at_resolution(c.resolution), back.at_resolution(c.resolution)
    if c.is_anchor:
        return front.model, tuple(front.input_size)
    net = build_stitched(front, back, StitchConfig(c.front, c.back, c.front_block, c.back_block))
    return net, tuple(net.input_size)
