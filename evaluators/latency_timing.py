"""Timing many networks on a noisy machine: interleaved rounds, medians, and the noise floor.

A machine's speed drifts: thermal throttling, frequency scaling, a neighbour process. Timing
part A for a second and then part B for a second lets a slow second hit one part only, and
the table then disagrees with itself. :func:`time_interleaved` instead times **every
runner once per round, in a shuffled order, for R rounds**, so that a slow moment hits
every runner alike, and keeps each runner's median over the rounds (robust to the long
upper tail of a shared host, as ``torch.utils.benchmark`` recommends) with its spread.

**One timing** is a loop of calls long enough (about :data:`LOOP_SECONDS`) that the clock's
own cost vanishes, divided by the calls: :func:`perf_clock` (``time.perf_counter``) on the
CPU, :func:`cuda_clock` (CUDA events around the loop, then a synchronize) on a GPU.

**The noise floor** (:func:`noise_floor`) is measured in the same run: a reference network
is timed at the start, the middle and the end (its drift), and each runner's medians over
the first and the second half of the rounds are compared (how well a timing reproduces
itself). The floor is the larger of the reference's drift and the median half-to-half
difference, in percent; above :data:`NOISY_FLOOR_PCT` the machine is too noisy for a table
to be trusted within ±10%, and :func:`noise_advice` says what to do.

**Threads and CPU affinity** (:func:`timing_settings`, :func:`apply_timing`): a table
records the torch threads and, where the OS allows it, the CPUs it was timed on; a
measurement to compare with it (a benchmark's ground truth) is made under the same.
"""

from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from evaluators.latency import percentile

#: Seconds one timing's loop of calls runs for (at least one call).
LOOP_SECONDS = 0.002

#: A noise floor above this (percent) gets a warning: the machine does not reproduce its
#: own timings well enough for predictions within ±10%.
NOISY_FLOOR_PCT = 5.0

#: Two timings "agree" when they differ by at most this share (the ±10% of the targets).
AGREE = 0.10

#: A clock: ``(run, calls) -> milliseconds per call`` of a loop of ``calls`` calls.
Clock = Callable[[Callable[[], object], int], float]

#: A callable that prepares a network to run: ``(module, input shape with the batch
#: dimension) -> run``, where ``run()`` does one forward pass.
RunnerFactory = Callable[[nn.Module, tuple[int, ...]], Callable[[], object]]


def perf_clock(run: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``calls`` calls, by ``time.perf_counter`` (CPU)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - t0) * 1000.0 / calls


def cuda_clock(run: Callable[[], object], calls: int) -> float:
    """Milliseconds per call of ``calls`` calls, by CUDA events (kernels included)."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def clock_for(device_type: str) -> Clock:
    """The clock of a device type (``"cpu"`` or ``"cuda"``)."""
    if device_type == "cuda":
        return cuda_clock
    if device_type == "cpu":
        return perf_clock
    raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")


def torch_runner(
    module: nn.Module, shape: tuple[int, ...], device: str = "cpu"
) -> Callable[[], object]:
    """Runs ``module`` in PyTorch (inference mode) on a fixed random input of ``shape``.

    Args:
        module: The network (moved to ``device``).
        shape: The input's shape, batch dimension first.
        device: ``"cpu"`` or ``"cuda"``.
    """
    module.to(device).eval()
    param = next(module.parameters(), None)
    x = torch.randn(shape, dtype=param.dtype if param is not None else torch.float32)
    x = x.to(device)

    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


def _calls_per_loop(run: Callable[[], object], clock: Clock) -> int:
    """Calls that make one loop last about :data:`LOOP_SECONDS` (the fastest of three)."""
    once = min(clock(run, 1) for _ in range(3)) / 1000.0
    return max(1, min(10_000, math.ceil(LOOP_SECONDS / max(once, 1e-7))))


def summarize(times: Sequence[float], calls: int) -> dict[str, Any]:
    """A runner's timing from its per-round times (milliseconds per call).

    Returns:
        ``median_ms``; ``p25_ms``, ``p75_ms``, ``iqr_ms``; ``std_ms`` (a robust standard
        deviation of one timing, the inter-quartile range / 1.349, as for a normal
        distribution); ``halves_ms`` (the medians of the first and second half of the
        rounds); ``rounds`` and ``calls`` (per timing).
    """
    s = sorted(times)
    p25, p75 = percentile(s, 0.25), percentile(s, 0.75)
    half = max(1, len(times) // 2)
    second = times[half:] or times[:half]
    return {
        "median_ms": statistics.median(s),
        "p25_ms": p25,
        "p75_ms": p75,
        "iqr_ms": p75 - p25,
        "std_ms": (p75 - p25) / 1.349,
        "halves_ms": [statistics.median(times[:half]), statistics.median(second)],
        "rounds": len(times),
        "calls": calls,
    }


def time_interleaved(
    runners: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 20,
    warmup: int = 3,
    seed: int = 0,
    clock: Clock = perf_clock,
    reference: str | None = None,
    on_step: Callable[[str], None] | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any] | None]:
    """Times every runner once per round, in a shuffled order, for ``rounds`` rounds.

    Args:
        runners: Name -> one forward pass.
        rounds: Rounds (each runner is timed once per round; at least 2).
        warmup: Untimed calls of each runner first.
        seed: Seeds the order of each round.
        clock: :func:`perf_clock` or :func:`cuda_clock`.
        reference: A runner also timed on its own at the start, the middle and the end
            (``rounds`` loops each, their median) to see the machine drift; None: not.
        on_step: Called with the runner's name after each timing (a progress bar).

    Returns:
        ``(timings, reference)``: each runner's :func:`summarize`; and the reference's
        ``{"name", "times_ms": [start, middle, end], "drift_pct"}`` (None without one).
    """
    if rounds < 2 or warmup < 0:
        raise ValueError(f"rounds must be >= 2 and warmup >= 0, got {rounds}, {warmup}")
    if reference is not None and reference not in runners:
        raise ValueError(f"the reference {reference!r} is not among the runners")
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    calls = {name: _calls_per_loop(runners[name], clock) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    ref_times: list[float] = []

    def time_reference() -> None:
        if reference is not None:
            run, n = runners[reference], calls[reference]
            ref_times.append(statistics.median(clock(run, n) for _ in range(rounds)))
            if on_step:
                on_step(f"reference {reference}")

    rng = random.Random(seed)
    time_reference()
    for r in range(rounds):
        if r == rounds // 2:
            time_reference()
        order = names[:]
        rng.shuffle(order)
        for name in order:
            times[name].append(clock(runners[name], calls[name]))
            if on_step:
                on_step(name)
    time_reference()
    timings = {name: summarize(times[name], calls[name]) for name in names}
    if reference is None:
        return timings, None
    mid = statistics.median(ref_times)
    drift = (max(ref_times) - min(ref_times)) / mid * 100 if mid > 0 else 0.0
    return timings, {"name": reference, "times_ms": ref_times, "drift_pct": drift}


def interleaved_steps(runners: int, rounds: int, reference: bool = True) -> int:
    """How many ``on_step`` calls :func:`time_interleaved` makes (a progress bar's total)."""
    return runners * rounds + (3 if reference else 0)


def relative_difference(a: float, b: float) -> float:
    """``|a - b| / b`` (infinite when ``b`` is 0 and ``a`` is not)."""
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return abs(a - b) / b


def noise_floor(
    timings: Mapping[str, Mapping[str, Any]], reference: Mapping[str, Any] | None
) -> dict[str, Any]:
    """How well this run reproduces its own timings.

    Args:
        timings: :func:`summarize` of each runner.
        reference: The reference network's drift from :func:`time_interleaved`.

    Returns:
        ``floor_pct`` (the larger of the reference's drift and the median half-to-half
        difference, percent), ``halves_within_10pct`` (the share of runners whose two
        halves agree within ±10%), ``halves_median_diff_pct``, ``reference`` (as given),
        ``runners`` and ``noisy`` (``floor_pct`` above :data:`NOISY_FLOOR_PCT`).
    """
    diffs = [relative_difference(*t["halves_ms"]) for t in timings.values()]
    median_diff = statistics.median(diffs) * 100 if diffs else 0.0
    within = sum(d <= AGREE for d in diffs) / len(diffs) if diffs else 1.0
    drift = reference["drift_pct"] if reference else 0.0
    floor = max(drift, median_diff)
    return {
        "floor_pct": floor,
        "halves_within_10pct": within,
        "halves_median_diff_pct": median_diff,
        "reference": dict(reference) if reference else None,
        "runners": len(diffs),
        "noisy": floor > NOISY_FLOOR_PCT,
    }


def noise_line(noise: Mapping[str, Any]) -> str:
    """One line on the noise floor, for the profiler's output."""
    ref = noise.get("reference")
    drift = (
        f"reference {ref['name']} drifted {ref['drift_pct']:.1f}% (start/middle/end)"
        if ref
        else "no reference"
    )
    return (
        f"noise floor ±{noise['floor_pct']:.1f}%: {noise['halves_within_10pct']:.0%} of "
        f"{noise['runners']} timings agree with themselves within ±10% across the two halves "
        f"of the rounds (median difference {noise['halves_median_diff_pct']:.1f}%); {drift}"
    )


def noise_advice(noise: Mapping[str, Any]) -> str | None:
    """One warning line when the floor is worse than ±:data:`NOISY_FLOOR_PCT`, else None."""
    if noise["floor_pct"] <= NOISY_FLOOR_PCT:
        return None
    return (
        f"warning: this machine's timings are noisy (floor ±{noise['floor_pct']:.1f}% > "
        f"±{NOISY_FLOOR_PCT:g}%), so predictions carry that noise in their ±: close other "
        "jobs, pin threads and cores (--threads 1 --cpus 0), fix the frequency governor "
        "(cpupower frequency-set -g performance), then profile again"
    )


def current_affinity() -> list[int] | None:
    """The CPUs this process may run on, where the OS tells (None elsewhere)."""
    getter = getattr(os, "sched_getaffinity", None)
    return sorted(getter(0)) if getter else None


def timing_settings(device_type: str = "cpu") -> dict[str, Any]:
    """What a timing ran under: device type, torch threads, CPU affinity."""
    return {
        "device_type": device_type,
        "threads": torch.get_num_threads(),
        "affinity": current_affinity(),
    }


@contextmanager
def apply_timing(settings: Mapping[str, Any]) -> Iterator[None]:
    """Runs the block with a table's torch threads and CPU affinity, then restores both.

    The affinity is applied only where the OS allows it and when every CPU named exists
    here; ``settings`` without ``threads`` or ``affinity`` leave them as they are.
    """
    threads = torch.get_num_threads()
    affinity = current_affinity()
    setter = getattr(os, "sched_setaffinity", None)
    wanted = settings.get("affinity")
    try:
        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        if wanted and setter and affinity is not None:
            available = set(range(os.cpu_count() or 1))
            if set(wanted) <= available:
                setter(0, set(wanted))
        yield
    finally:
        torch.set_num_threads(threads)
        if setter and affinity is not None:
            setter(0, set(affinity))


def parse_cpus(text: str) -> list[int]:
    """``"0"``, ``"0,2"`` or ``"0-3"`` -> the CPU numbers (sorted).

    Raises:
        ValueError: Not such a list, or a CPU this machine lacks.
    """
    cpus: set[int] = set()
    for piece in (p.strip() for p in text.split(",")):
        lo, sep, hi = piece.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list such as 0, 0,2 or 0-3")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{piece!r} runs backwards; write the lower CPU first")
        cpus.update(range(first, last + 1))
    allowed = current_affinity()
    if allowed is not None and not cpus <= set(allowed):
        raise ValueError(
            f"CPU(s) {sorted(cpus - set(allowed))} are not available here (this process may "
            f"use {allowed})"
        )
    return sorted(cpus)
