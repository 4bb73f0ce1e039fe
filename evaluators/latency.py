"""Latency and memory of one forward pass on the evaluating host.

**Latency** (:func:`measure_latency`): the model runs ``warmup`` times, then is timed
``repeats`` times (or until ``max_seconds`` have passed, but at least ``min_repeats`` times)
with :func:`time.perf_counter` around each call, in ``torch.inference_mode``; on CUDA each
call is bracketed by ``torch.cuda.synchronize``. The median is reported with its spread
(inter-quartile range and the 10th-90th percentile range), since a shared host's timings
have long upper tails that would distort a mean.

**Memory** (:func:`measure_memory`): peak activation memory is the largest number of bytes
held at once by tensors created during one forward pass. On CUDA it is
``torch.cuda.max_memory_allocated`` minus the allocation before the pass. On CPU a
``TorchDispatchMode`` sees every ATen operator's outputs; each new storage adds its bytes
while alive and a ``weakref.finalize`` on the storage subtracts them when it is freed, so
the count follows the live set exactly, temporaries inside functional code included.
Views and in-place results (outputs the operator's schema marks as aliasing an input)
allocate nothing and are skipped; storages of parameters, buffers and the input are
excluded. Buffers that fused kernels allocate internally (e.g. inside CPU attention) are
not seen, only their outputs. Parameter bytes are counted
separately.
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass(frozen=True)
class LatencyResult:
    """Timing of one forward pass at one batch size.

    Attributes:
        median_ms: Median latency.
        p10_ms: 10th percentile.
        p25_ms: 25th percentile.
        p75_ms: 75th percentile.
        p90_ms: 90th percentile.
        mean_ms: Mean latency.
        repeats: Timed calls.
        warmup: Untimed calls before them.
        batch_size: Images per call.
        device: Where it ran.
        threads: ``torch.get_num_threads()`` during the measurement.
    """

    median_ms: float
    p10_ms: float
    p25_ms: float
    p75_ms: float
    p90_ms: float
    mean_ms: float
    repeats: int
    warmup: int
    batch_size: int
    device: str
    threads: int

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range (p75 - p25)."""
        return self.p75_ms - self.p25_ms

    @property
    def per_image_ms(self) -> float:
        """Median latency divided by the batch size."""
        return self.median_ms / self.batch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (with ``iqr_ms``)."""
        return {**asdict(self), "iqr_ms": self.iqr_ms}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted values."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _example(
    model: nn.Module, input_shape: Sequence[int], batch_size: int, device: Any
) -> tuple[torch.Tensor, torch.device]:
    param = next(model.parameters(), None)
    dev = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )
    dtype = param.dtype if param is not None else torch.float32
    shape = tuple(input_shape)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return torch.randn((batch_size, *shape), device=dev, dtype=dtype), dev


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 30,
    min_repeats: int = 5,
    max_seconds: float = 2.0,
    device: str | torch.device | None = None,
) -> LatencyResult:
    """Median latency of ``model`` on a random batch, after warm-up.

    Args:
        model: The module (run in eval mode, restored afterwards).
        input_shape: ``(C, H, W)`` of one image.
        batch_size: Images per call.
        warmup: Untimed calls first.
        repeats: Timed calls at most.
        min_repeats: Timed calls at least, whatever ``max_seconds`` says.
        max_seconds: Stop timing after this long (keeps evaluations short).
        device: Where to run (default: the model's device; the model is not moved).

    Returns:
        The latency distribution.
    """
    if repeats < 1 or min_repeats < 1:
        raise ValueError(f"repeats and min_repeats must be >= 1, got {repeats}, {min_repeats}")
    x, dev = _example(model, input_shape, batch_size, device)
    cuda = dev.type == "cuda"
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            if cuda:
                torch.cuda.synchronize(dev)
            budget_end = time.perf_counter() + max_seconds
            while len(times) < repeats:
                t0 = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(dev)
                t1 = time.perf_counter()
                times.append((t1 - t0) * 1000.0)
                if len(times) >= min_repeats and t1 > budget_end:
                    break
    finally:
        model.train(was_training)
    s = sorted(times)
    return LatencyResult(
        median_ms=statistics.median(s),
        p10_ms=percentile(s, 0.10),
        p25_ms=percentile(s, 0.25),
        p75_ms=percentile(s, 0.75),
        p90_ms=percentile(s, 0.90),
        mean_ms=statistics.fmean(s),
        repeats=len(s),
        warmup=warmup,
        batch_size=batch_size,
        device=str(dev),
        threads=torch.get_num_threads(),
    )


@dataclass(frozen=True)
class MemoryResult:
    """Memory of one forward pass.

    Attributes:
        peak_activation_bytes: Most bytes held at once by tensors created during the pass.
        param_bytes: Bytes of the parameters (those given, or all of the model's).
        batch_size: Images per pass.
        device: Where it ran.
        method: ``"dispatch"`` (CPU live-tensor tracking) or ``"cuda"`` (allocator peak).
    """

    peak_activation_bytes: int
    param_bytes: int
    batch_size: int
    device: str
    method: str

    @property
    def total_bytes(self) -> int:
        """Peak activation bytes plus parameter bytes."""
        return self.peak_activation_bytes + self.param_bytes

    @property
    def total_mb(self) -> float:
        """:attr:`total_bytes` in MiB."""
        return self.total_bytes / 2**20

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (with ``total_bytes``)."""
        return {**asdict(self), "total_bytes": self.total_bytes}


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of storages created by ATen operators while they are alive.

    Outputs that alias an input (views, in-place results: an alias annotation in the
    operator's schema) allocate nothing and are skipped, as are storages in ``exclude``
    and storages already counted.
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        super().__init__()
        self.exclude = exclude or set()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        if len(returns) == 1 and returns[0].alias_info is not None:
            return out  # a view or an in-place result (also covers Tensor[] views)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.exclude or key in self.live:
                continue
            self.live[key] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out


def _storage_ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def measure_memory(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    parameters: Iterable[torch.Tensor] | None = None,
) -> MemoryResult:
    """Peak activation memory of one forward pass, and parameter bytes.

    Args:
        model: The module (run in eval mode under ``torch.no_grad``, restored afterwards).
        input_shape: ``(C, H, W)`` of one image.
        batch_size: Images per pass.
        device: Where to run (default: the model's device).
        parameters: The parameters to count in ``param_bytes`` (default: all of the
            model's, each once), e.g. only those a stitched network uses.

    Returns:
        Peak activation bytes (the input itself excluded, the output included) and
        parameter bytes.
    """
    x, dev = _example(model, input_shape, batch_size, device)
    params = list(dict.fromkeys(model.parameters() if parameters is None else parameters))
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                out = model(x)
                torch.cuda.synchronize(dev)
                peak = torch.cuda.max_memory_allocated(dev) - base
                method = "cuda"
            else:
                exclude = _storage_ptrs([*model.parameters(), *model.buffers(), x])
                with LiveBytes(exclude) as tracker:
                    out = model(x)
                peak = tracker.peak
                method = "dispatch"
            del out
    finally:
        model.train(was_training)
    return MemoryResult(
        peak_activation_bytes=int(peak),
        param_bytes=int(param_bytes),
        batch_size=batch_size,
        device=str(dev),
        method=method,
    )
