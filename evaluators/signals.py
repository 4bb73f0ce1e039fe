"""Stitch-point signals: how promising every stitch point of an anchor pair is, before trials.

The search prunes stitch points before it evaluates any (``search.strategy.pruning``), so its signal
must be computable for a whole ordered anchor pair at once and cheaply. Signals, each a
matrix indexed like :func:`evaluators.cka_matrix` (``[front cut k, back cut j]``; entries
outside the search space's stitch points, ``k = 0`` or ``j = n_back``, are NaN, and so are
the points a restricted space leaves out, ``points=``; e.g. ``cuts: stages``):

``residual`` (lower is better)
    The relative residual ``1 - R^2`` of the least-squares stitching layer over its whole
    target (:attr:`space.StitchingLayer.residual`): the share of the back anchor's
    activation variance at cut ``j`` that a linear map of front cut ``k`` cannot explain.
    It is the very fit a rung-0 trial makes (same calibration images, same layer), so a
    trial records the same value (``CandidateResult.residual``, trial attribute
    ``residual``).
``kl`` (lower is better)
    Mean ``KL(p_back || p_stitched)`` over the calibration images between the back anchor's
    class probabilities and those of the least-squares stitched network: how far the
    stitched network's outputs are from the back anchor's. Needs no labels.
``cka`` (higher is better)
    From :func:`evaluators.cka_matrix` (pooled features, unbiased-HSIC minibatch CKA, which
    is the debiased CKA estimator averaged over batches).

:func:`stitch_signals` gets ``residual`` and ``kl`` from at most two passes over the
calibration images: the first runs both anchors once per batch (all cuts at once) and
accumulates the normal equations of every stitch point of the pair
(:class:`space.LeastSquares`); the second, only for ``kl``, runs every stitch point's back
part on the fitted layer. Cost for a pair with ``P`` stitch points: two anchor forward
passes per image, ``P`` Gram accumulations and pseudo-inverses of size ``C_k + 1``, and for
``kl`` ``P`` back-part passes per image (as many as ``P`` rung-0 fits, without validation,
MACs or latency). Results are cached on disk like CKA matrices (:mod:`evaluators.pair_cache`).

:func:`stitch_macs` gives the MACs of every stitch point of a pair (front part, stitching
layer and back part counted once each, as :func:`evaluators.stitched_macs`), for pruning
rules that weigh a signal against cost.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from evaluators.macs import BackPart, FrontPart, count_macs, stitch_layer_macs
from evaluators.pair_cache import (
    cached_data_identity,
    entry_meta,
    entry_path,
    pair_key,
    read_entry,
    write_entry,
)
from space import (
    Anchor,
    LeastSquares,
    StitchConfig,
    adapt_images,
    back_input_size,
    make_stitching_layer,
    stitch_cuts,
)

#: Every stitch-point signal and whether higher values are better.
SIGNALS: dict[str, bool] = {"cka": True, "residual": False, "kl": False}
#: The signals :func:`stitch_signals` computes (CKA comes from :func:`evaluators.cka_matrix`).
FIT_SIGNALS: tuple[str, ...] = ("residual", "kl")
#: Bumped whenever a signal's computation changes, so stale cache entries are never read.
SIGNALS_CACHE_VERSION = 1


def stitch_points(
    front: Anchor, back: Anchor, points: Sequence[tuple[int, int]] | None = None
) -> list[tuple[int, int]]:
    """The ``(k, j)`` stitch points of a pair (``1 <= k``, ``j < n``), or the given ``points``.

    Args:
        front: The front anchor.
        back: The back anchor.
        points: A subset to use instead (a search space restricted to stage boundaries).

    Raises:
        ValueError: A point of ``points`` lies outside the pair's stitch points.
    """
    every = [(k, j) for k in range(1, front.num_blocks + 1) for j in range(back.num_blocks)]
    if points is None:
        return every
    chosen = sorted({(int(k), int(j)) for k, j in points})
    outside = sorted(set(chosen) - set(every))
    if outside or not chosen:
        raise ValueError(
            f"stitch points {outside or chosen!r} are not stitch points of {front.name!r} -> "
            f"{back.name!r} (1 <= k <= {front.num_blocks}, 0 <= j < {back.num_blocks})"
        )
    return chosen


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, tuple | list) else batch


def _batches(loader: Iterable[Any], num_images: int | None) -> Iterable[torch.Tensor]:
    seen = 0
    for batch in loader:
        x = _images(batch)
        if num_images is not None:
            x = x[: num_images - seen]
            if len(x) == 0:
                break
        seen += len(x)
        yield x
        if num_images is not None and seen >= num_images:
            break


def signals_cache_path(
    front: Anchor,
    back: Anchor,
    *,
    data_identity: str,
    signals: Sequence[str],
    num_images: int | None,
    batch_size: int | None,
    cache_dir: str | Path | None = None,
    points: Sequence[tuple[int, int]] | None = None,
) -> Path:
    """Where :func:`stitch_signals` caches the matrices of one ordered pair."""
    fields: dict[str, Any] = {"signals": sorted(signals)}
    if points is not None:  # only then, so that the entries of full pairs keep their names
        fields["points"] = [list(p) for p in stitch_points(front, back, points)]
    key = pair_key(
        front,
        back,
        version=SIGNALS_CACHE_VERSION,
        data_identity=data_identity,
        num_images=num_images,
        batch_size=batch_size,
        **fields,
    )
    # Not the CKA entries' way of making names safe: entries written before keep their names.
    safe = [n.replace(":", "_").replace("/", "_")[:60] for n in (front.name, back.name)]
    return entry_path(cache_dir, ["signals", *safe], key, ".npz")


@torch.no_grad()
def stitch_signals(
    front: Anchor,
    back: Anchor,
    loader: Iterable[Any],
    *,
    signals: Sequence[str] = FIT_SIGNALS,
    num_images: int | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    data_identity: str | None = None,
    points: Sequence[tuple[int, int]] | None = None,
) -> dict[str, np.ndarray]:
    """The ``residual`` and ``kl`` signals of every stitch point of an ordered pair.

    Args:
        front: The front anchor.
        back: The back anchor (may be ``front``: a self-stitch).
        loader: Calibration batches of images or ``(images, labels)`` (labels are unused);
            re-iterated once more for ``kl``. Images are adapted as a stitched network
            adapts them (:func:`space.back_input_size`).
        signals: Which of :data:`FIT_SIGNALS` to compute.
        num_images: Use only the first ``num_images`` images (default: all).
        device: Where the anchors run (default: where their weights are).
        cache_dir: Cache directory (default: the CKA cache's).
        use_cache: Read and write the cache.
        data_identity: Identifies the images (default: a content hash for in-memory
            loaders; without either the cache is off).
        points: Compute only these stitch points ``(k, j)`` (a search space restricted to
            stage boundaries; default: all of them).

    Returns:
        Signal name -> float64 array ``(front.num_blocks + 1, back.num_blocks + 1)``,
        NaN outside :func:`stitch_points` (outside ``points`` when given).

    Raises:
        ValueError: An unknown signal, no images, non-finite activations, or a point
            outside the pair's stitch points.
    """
    wanted = tuple(dict.fromkeys(signals))
    unknown = [s for s in wanted if s not in FIT_SIGNALS]
    if unknown or not wanted:
        raise ValueError(f"signals must be some of {FIT_SIGNALS}, got {list(signals)!r}")
    chosen = stitch_points(front, back, points)
    shape = (front.num_blocks + 1, back.num_blocks + 1)
    ident = cached_data_identity(loader, data_identity, use_cache)
    path = None
    if ident is not None:
        path = signals_cache_path(
            front,
            back,
            data_identity=ident,
            signals=wanted,
            num_images=num_images,
            batch_size=getattr(loader, "batch_size", None),
            cache_dir=cache_dir,
            points=points,
        )
        cached = read_entry(path, wanted, shape)
        if cached is not None:
            return cached
    start = time.perf_counter()
    param = next(front.model.parameters())
    dev = torch.device(device) if device is not None else param.device
    fits: dict[tuple[int, int], LeastSquares] = {}
    for k, j in chosen:
        src, dst = stitch_cuts(front, back, StitchConfig(front.name, back.name, k, j))
        layer = make_stitching_layer(src, dst).to(device=dev, dtype=param.dtype)
        fits[(k, j)] = LeastSquares(layer)
    run = _pair_runner(front, back, dev)
    images = _fit_all(run, fits, _batches(loader, num_images))
    if images == 0:
        raise ValueError(
            f"stitch signals of {front.name!r} -> {back.name!r} need calibration images; "
            "the loader gave none"
        )
    out: dict[str, np.ndarray] = {}
    residual = np.full(shape, np.nan)
    for (k, j), fit in fits.items():
        fit.solve()
        residual[k, j] = fit.layer.residual
    if "residual" in wanted:
        out["residual"] = residual
    if "kl" in wanted:
        kl_sum = _kl_sums(run, back, fits, _batches(loader, num_images), shape)
        kl_mat = np.full(shape, np.nan)
        for k, j in chosen:
            kl_mat[k, j] = kl_sum[k, j] / images
        out["kl"] = kl_mat
    _check_finite(out, front, back)
    if path is not None:
        seconds = round(time.perf_counter() - start, 3)
        meta = entry_meta(front, back, ident, signals=list(out), num_images=images, seconds=seconds)
        write_entry(path, out, meta)
    return out


#: Runs both anchors of a pair on a batch of images: ``x -> (front cuts, back cuts)``.
_PairRun = Callable[[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]


def _pair_runner(front: Anchor, back: Anchor, dev: torch.device) -> _PairRun:
    """Every cut of both anchors on the images a stitched network of the pair would see.

    The images are adapted once to the front anchor's input size, and from there to the back
    anchor's (:func:`space.back_input_size`); a self-stitch at one size runs once.
    """
    back_size = back_input_size(front, back)
    shared = back.model is front.model and tuple(back_size) == tuple(front.input_size)

    def run(x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        x = x.to(dev)
        if tuple(x.shape[1:]) != tuple(front.input_size):
            x = adapt_images(x, front.input_size)
        acts_f = front.forward_cuts(x)
        if shared:
            return acts_f, acts_f
        xb = x if tuple(x.shape[1:]) == tuple(back_size) else adapt_images(x, back_size)
        return acts_f, back.forward_cuts(xb)

    return run


def _fit_all(
    run: _PairRun, fits: dict[tuple[int, int], LeastSquares], batches: Iterable[torch.Tensor]
) -> int:
    """Accumulates every stitch point's normal equations in one pass; returns the images."""
    images = 0
    for x in batches:
        acts_f, acts_b = run(x)
        for (k, j), fit in fits.items():
            fit.update(acts_f[k], acts_b[j])
        images += len(x)
    return images


def _kl_sums(
    run: _PairRun,
    back: Anchor,
    fits: dict[tuple[int, int], LeastSquares],
    batches: Iterable[torch.Tensor],
    shape: tuple[int, int],
) -> np.ndarray:
    """Summed ``KL(p_back || p_stitched)`` over the images, per fitted stitch point."""
    kl_sum = np.zeros(shape)
    nb = back.num_blocks
    for x in batches:
        acts_f, acts_b = run(x)
        target = F.log_softmax(back.forward_back(acts_b[nb], nb).double(), dim=1)
        for (k, j), fit in fits.items():
            logits = back.forward_back(fit.layer(acts_f[k]), j).double()
            kl = F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="sum")
            kl_sum[k, j] += float(kl)
    return kl_sum


def _check_finite(out: dict[str, np.ndarray], front: Anchor, back: Anchor) -> None:
    """Raises when a signal has a non-finite value at a computed (non-NaN) stitch point."""
    for name, m in out.items():
        valid = m[~np.isnan(m)]
        if not np.isfinite(valid).all():
            raise ValueError(
                f"non-finite {name} signal for {front.name!r} -> {back.name!r}; check the "
                "anchors' weights and the input images"
            )


@torch.no_grad()
def stitch_macs(
    front: Anchor,
    back: Anchor,
    points: Sequence[tuple[int, int]] | None = None,
    *,
    allow_unsupported: Collection[str] = (),
) -> np.ndarray:
    """MACs of one image through every stitch point of an ordered pair.

    Each front part (per ``k``) and back part (per ``j``) is counted once with
    :func:`evaluators.count_macs`, and each stitching layer; the sum is
    :func:`evaluators.stitched_macs`' total for the stitched network.

    Args:
        front: The front anchor.
        back: The back anchor.
        points: Count only these stitch points ``(k, j)`` (default: all of them).
        allow_unsupported: Operators that may count as zero (:func:`evaluators.count_macs`).

    Returns:
        An int64-valued float array ``(front.num_blocks + 1, back.num_blocks + 1)``, NaN
        outside :func:`stitch_points` (outside ``points`` when given).
    """
    points = stitch_points(front, back, points)
    size = front.input_size
    allow = allow_unsupported
    fronts = {
        k: count_macs(
            FrontPart(front, k), (1, *size), allow_unsupported=allow, label=f"{front.name!r}"
        )
        for k in {k for k, _ in points}
    }
    backs: dict[int, int] = {}
    out = np.full((front.num_blocks + 1, back.num_blocks + 1), np.nan)
    param = next(front.model.parameters())
    for k, j in points:
        src, dst = stitch_cuts(front, back, StitchConfig(front.name, back.name, k, j))
        if j not in backs:
            backs[j] = count_macs(
                BackPart(back, j), (1, *dst.shape), allow_unsupported=allow, label=repr(back.name)
            )
        layer = make_stitching_layer(src, dst).to(device=param.device, dtype=param.dtype)
        stitch = stitch_layer_macs(layer, src.shape, allow_unsupported=allow)
        out[k, j] = fronts[k] + stitch + backs[j]
    return out
