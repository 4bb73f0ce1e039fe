"""Profiling a device's latency table: every part timed in context, and the overhead fitted.

Tiny parts timed one by one misrepresent a whole forward pass (the per-call Python overhead
dominates each small block, and a part timed alone keeps its caches warm), so
:func:`profile_parts` times large contiguous pieces instead: the prefixes, suffixes, bare
anchors and stitching layers of :mod:`evaluators.latency_parts`.

**Timing** (:mod:`evaluators.latency_timing`): every part and every calibration network is
timed once per round, in a shuffled order, for R rounds, so that a slow moment of the
machine hits them all alike; each keeps its median over the rounds and its spread, and the
run measures its own noise floor (a reference network's drift, and how well each timing's
two halves of the rounds agree).

**Overhead.** A stitch's three pieces are three calls where the stitched network makes one.
Per runtime and batch size, ``measured = scale * sum of pieces + overhead`` is fitted by
least squares (:func:`fit_overhead`) over a spread sample of stitched networks timed end to
end and the anchors (each as its prefix and suffix at its middle cut, :func:`split_cut`,
against its end-to-end time), and the fit's errors on those networks are recorded, with
its leave-one-out error (:func:`fit_residual_pct`), which a prediction's interval uses.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

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
from evaluators.latency_timing import (
    LOOP_SECONDS,
    RunnerFactory,
    clock_for,
    interleaved_steps,
    noise_floor,
    time_interleaved,
    timing_settings,
)
from space import Anchor, Candidate, FeatureInfo, StitchConfig, build_stitched, make_stitching_layer


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
    rounds: int = 20,
    calibration: int = 12,
    predict_runtime: str = "torch",
    device_type: str = "cpu",
    seed: int = 0,
    on_step: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measures every part the candidates use in context, and fits the per-call overhead.

    Per runtime and batch size, every part (each bare anchor end to end, each prefix and
    suffix a stitch cuts at and each anchor's at its :func:`split_cut`, each stitching
    layer) and every calibration stitch end to end are timed together in interleaved
    rounds (:func:`evaluators.latency_timing.time_interleaved`: every one once per round,
    in a shuffled order), with the first anchor as the reference of the noise floor; then
    ``measured = scale * sum of pieces + overhead`` is fitted over the calibration
    stitches and the anchors (:func:`fit_keys`).

    Args:
        anchors: The study's anchors by name, in the study's order (on the CPU).
        candidates: Every candidate of the study (anchors and stitches).
        device: The device's name (recorded).
        study_name: The study's name (recorded).
        host: The device's identity (recorded).
        runtimes: Runtime name -> :data:`RunnerFactory` (``{"torch": torch_runner}``).
        batch_sizes: Batch sizes to time at (batch 1 first).
        warmup: Untimed calls of each part first.
        rounds: Interleaved rounds (each part timed once per round; at least 2).
        calibration: Stitched networks measured end to end (besides every anchor) to fit
            the overhead.
        predict_runtime: The runtime predictions use (one of ``runtimes``).
        device_type: ``"cpu"`` (``time.perf_counter``) or ``"cuda"`` (CUDA events); the
            runners must run there.
        seed: Seeds the order of the rounds.
        on_step: Called with a description after every timing (a progress bar).

    Returns:
        The table (``created`` is set by the caller's clock: now, UTC).
    """
    if predict_runtime not in runtimes:
        raise ValueError(f"predict_runtime {predict_runtime!r} is not among {sorted(runtimes)}")
    clock = clock_for(device_type)
    batches = sorted(set(batch_sizes))
    t_start = time.perf_counter()
    sizes = candidate_resolutions(candidates)
    records = [anchor_latency_record(a, sizes) for a in anchors.values()]
    by_name = {r["name"]: r for r in records}
    modules = _part_modules(anchors, candidates)
    anchor_networks = [Candidate.anchor(n, r) for r in (sizes or [None]) for n in anchors]
    stitches = calibration_stitches(candidates, calibration)
    stitch_nets = {network_key(c): candidate_network(anchors, c) for c in stitches}
    reference = anchor_key(next(iter(anchors)), sizes[0] if sizes else None)
    table_runtimes: dict[str, dict[str, dict[str, Any]]] = {}
    for rt, factory in runtimes.items():
        table_runtimes[rt] = {}
        for batch in batches:
            runners = {
                key: factory(module, (batch, *shape))
                for key, (module, shape) in {**modules, **stitch_nets}.items()
            }
            timing = {"rounds": rounds, "warmup": warmup, "seed": seed, "clock": clock}
            timings, ref = time_interleaved(
                runners, **timing, reference=reference, on_step=_prefixed(on_step, f"{rt} b{batch}")
            )
            parts = {key: timings[key] for key in modules}
            fit = _fit_points(anchor_networks + stitches, parts, timings, by_name)
            table_runtimes[rt][str(batch)] = _runtime_entry(parts, fit, noise_floor(timings, ref))
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
            "rounds": rounds,
            "loop_seconds": LOOP_SECONDS,
            "seed": seed,
            "batch_sizes": batches,
            "calibration_networks": len(anchor_networks) + len(stitches),
            "runtimes": list(runtimes),
            **timing_settings(device_type),
        },
        runtimes=table_runtimes,
        predict_runtime=predict_runtime,
        profile_seconds=time.perf_counter() - t_start,
    )


def network_key(c: Candidate) -> str:
    """The name a calibration stitch is timed under, end to end."""
    return f"network|{c.label}"


def _prefixed(on_step: Callable[[str], None] | None, prefix: str) -> Callable[[str], None]:
    """``on_step`` with every description after ``prefix`` (does nothing without one)."""

    def step(what: str) -> None:
        if on_step:
            on_step(f"{prefix} {what}")

    return step


#: One network of the overhead fit: ``(candidate, measured ms, sum of its pieces' ms,
#: the measurement's std ms)``.
FitPoint = tuple[Candidate, float, float, float]


def _fit_points(
    networks: Sequence[Candidate],
    parts: Mapping[str, Mapping[str, Any]],
    timings: Mapping[str, Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
) -> list[FitPoint]:
    """Each network's end-to-end time beside the sum of its pieces (:func:`fit_keys`).

    A bare anchor's end-to-end time is its part; a stitch's is its own timing.
    """
    fit = []
    for c in networks:
        key = anchor_key(c.front, c.resolution) if c.is_anchor else network_key(c)
        timing = timings[key]
        total = sum(parts[k]["median_ms"] for k in fit_keys(c, records))
        fit.append((c, timing["median_ms"], total, timing["std_ms"]))
    return fit


def _runtime_entry(
    parts: dict[str, Any], fit: Sequence[FitPoint], noise: Mapping[str, Any]
) -> dict[str, Any]:
    """A runtime's entry at one batch size: the fitted overhead, the fit's errors, the parts.

    ``fit.fallback`` says why the scale is 1 instead of the least-squares fit (``None``: the
    fit was used; see :func:`fit_overhead`). ``fit.residual_pct`` is the relative error a
    stitch's prediction is expected to have from the fit alone (leave-one-out, see
    :func:`fit_residual_pct`); ``noise`` is the run's :func:`noise_floor`.
    """
    xs, ys = [s for _, _, s, _ in fit], [m for _, m, _, _ in fit]
    scale, overhead, fallback = fit_overhead(xs, ys)
    errors = [abs(scale * s + overhead - m) / m * 100 for _, m, s, _ in fit if m > 0]
    return {
        "scale": scale,
        "overhead_ms": overhead,
        "fit": {
            "networks": [
                {"candidate": c.label, "measured_ms": m, "parts_ms": s, "std_ms": sd}
                for c, m, s, sd in fit
            ],
            "median_abs_error_pct": statistics.median(errors) if errors else 0.0,
            "max_abs_error_pct": max(errors, default=0.0),
            "residual_pct": fit_residual_pct(xs, ys),
            "fallback": fallback,
        },
        "noise": dict(noise),
        "parts": parts,
    }


def fit_residual_pct(parts_ms: Sequence[float], measured_ms: Sequence[float]) -> float:
    """The root-mean-square relative error of the overhead fit, in percent.

    Leave-one-out when there are at least four networks (each predicted by the fit on the
    others, so the error is out of sample); in sample with fewer; 0 with none.
    """
    n = len(parts_ms)
    if n == 0:
        return 0.0
    errors = []
    for i in range(n):
        if n >= 4:
            xs = [x for j, x in enumerate(parts_ms) if j != i]
            ys = [y for j, y in enumerate(measured_ms) if j != i]
        else:
            xs, ys = list(parts_ms), list(measured_ms)
        scale, overhead, _ = fit_overhead(xs, ys)
        if measured_ms[i] > 0:
            errors.append((scale * parts_ms[i] + overhead - measured_ms[i]) / measured_ms[i])
    return math.sqrt(sum(e * e for e in errors) / len(errors)) * 100 if errors else 0.0


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
    rounds: int,
) -> int:
    """How many timings :func:`profile_parts` makes (for a progress bar's total)."""
    runners = len(_part_modules(anchors, candidates))
    runners += len(calibration_stitches(candidates, calibration))  # anchors are parts
    return runtimes * len(set(batch_sizes)) * interleaved_steps(runners, rounds)


def candidate_network(
    anchors: Mapping[str, Anchor], c: Candidate
) -> tuple[nn.Module, tuple[int, ...]]:
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
