"""Centered Kernel Alignment (CKA) between anchors' cuts, for choosing stitch points.

Definitions (Kornblith et al. 2019; minibatch form: Nguyen et al. 2021):

* :func:`linear_cka` is the classic linear CKA of two representations of the same ``n``
  images, ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` with centred columns (biased HSIC),
  or with ``unbiased=True`` the same ratio of unbiased HSIC estimates.
* :class:`MinibatchCKA` streams batches: per batch it computes each representation's Gram
  matrix, the *unbiased* HSIC estimate (Song et al. 2012) of every pair, and averages the
  estimates over batches; CKA is ``mean HSIC(K, L) / sqrt(mean HSIC(K, K) * mean HSIC(L, L))``.
  Memory is ``O(batch^2)`` per representation, independent of the number of images.
* :func:`cka_matrix` runs the front and back anchor once per batch on the same images
  (:meth:`space.Anchor.forward_cuts`) and returns the CKA of every front cut with every back
  cut, indexed like stitch points: entry ``[k, j]`` compares front cut ``k`` (the stem's
  output for ``k = 0``, else the output of front block ``k - 1``) with back cut ``j`` (the
  input of back block ``j``).

**Layouts.** CKA compares Gram matrices over images, so the two sides may have any width,
grid or layout; each activation only has to become one feature vector per image. Two modes:

``"pooled"`` (default)
    Feature maps are averaged over their ``H x W`` positions, token sequences over their
    patch tokens: one ``C``-vector per image. Resolution-free, so CNN feature maps and ViT
    token grids of any size compare on equal terms; cheap (``C`` features); the convention
    of DeRy's block similarity. It is the default because stitching searches compare cuts
    of very different resolutions, and flattened early CNN maps have far more features than
    a calibration set has images, where linear CKA is known to be inflated.
``"flatten"`` (per position)
    Every position's channels are concatenated in row-major position order (NCHW is taken
    as NHWC, tokens in sequence order): ``H * W * C`` features per image. Keeps spatial
    structure, costs ``O(batch^2 * H * W * C)`` per cut and batch.

Prefix tokens (class, distillation, register) are excluded in both modes: they have no
spatial position and no CNN counterpart.

**Cache.** Matrices are cached on disk (:mod:`evaluators.pair_cache`: ``.npy`` plus a
``.json`` sidecar, both written atomically) under a key made of both anchors' identities
(name and checkpoint or weight SHA-256), their input sizes, the data identity, the batch
size, the mode and the number of images, so a search computes each ordered pair once.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

# anchor_identity was defined here before evaluators.pair_cache; benchmarks import it from here.
from evaluators.pair_cache import anchor_identity as anchor_identity
from evaluators.pair_cache import (
    cached_data_identity,
    entry_meta,
    entry_path,
    pair_key,
    read_entry,
    write_entry,
)
from space import Anchor, FeatureInfo, adapt_images, back_input_size

CKAMode = Literal["pooled", "flatten"]
CKA_MODES: tuple[str, ...] = ("pooled", "flatten")
#: Bumped whenever the estimator changes, so stale cache entries are never read.
CKA_CACHE_VERSION = 1
_MIN_BATCH = 4  # the unbiased HSIC estimator needs n >= 4


def _as_matrix(x: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach()
    if t.ndim < 2:
        raise ValueError(
            f"{what} must have a sample dimension and features, got shape {tuple(t.shape)}"
        )
    t = t.reshape(t.shape[0], -1).to(dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(
            f"non-finite values in the CKA input {what}; check the anchors' weights and the "
            "input images"
        )
    return t


def _gram(x: torch.Tensor) -> torch.Tensor:
    return x @ x.T


def _u_centre(gram: torch.Tensor) -> torch.Tensor:
    """U-centres Gram matrices ``(..., n, n)``: ``<U(K), U(L)> / (n (n - 3))`` is unbiased HSIC.

    This is the U-centring of Szekely and Rizzo; the inner product equals the unbiased HSIC
    estimator of Song et al. (2012), which the tests check against the explicit formula.
    """
    n = gram.shape[-1]
    k = gram.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    rows = k.sum(-1, keepdim=True)  # (..., n, 1)
    total = rows.sum(-2, keepdim=True)  # (..., 1, 1)
    u = k - rows / (n - 2) - rows.transpose(-1, -2) / (n - 2) + total / ((n - 1) * (n - 2))
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def _ratio(cross: float, xx: float, yy: float) -> float:
    """``cross / sqrt(xx * yy)`` (HSIC(K, L) over the geometric mean of HSIC(K, K), HSIC(L, L))."""
    denom = math.sqrt(xx * yy) if xx > 0 and yy > 0 else 0.0
    if denom <= 0.0:
        warnings.warn(
            "CKA is undefined for a representation without variance; returning 0.0",
            RuntimeWarning,
            stacklevel=3,
        )
        return 0.0
    return float(cross / denom)


def linear_cka(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, *, unbiased: bool = False
) -> float:
    """Linear CKA of two representations of the same images, computed in float64.

    Args:
        x: ``(n, d1)`` features (more dimensions are flattened per sample).
        y: ``(n, d2)`` features of the same ``n`` samples.
        unbiased: Use unbiased HSIC estimates (needs ``n >= 4``) instead of the classic
            biased form.

    Returns:
        CKA in ``[0, 1]`` (the unbiased form can be slightly negative); 1 for identical
        representations, invariant to orthogonal transforms and isotropic scaling.

    Raises:
        ValueError: Different sample counts, too few samples or non-finite values.
    """
    a, b = _as_matrix(x, "x"), _as_matrix(y, "y")
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {b.shape[0]}; CKA needs the same images")
    if unbiased:
        if n < _MIN_BATCH:
            raise ValueError(f"unbiased CKA needs at least {_MIN_BATCH} samples, got {n}")
        u, v = _u_centre(_gram(a)), _u_centre(_gram(b))
        return _ratio(float((u * v).sum()), float((u * u).sum()), float((v * v).sum()))
    if n < 2:
        raise ValueError(f"CKA needs at least 2 samples, got {n}")
    a = a - a.mean(0, keepdim=True)
    b = b - b.mean(0, keepdim=True)
    if a.shape[1] + b.shape[1] <= 2 * n:  # feature form: small d
        cross = float(torch.linalg.matrix_norm(b.T @ a) ** 2)
        xx = float(torch.linalg.matrix_norm(a.T @ a) ** 2)
        yy = float(torch.linalg.matrix_norm(b.T @ b) ** 2)
    else:  # Gram form: small n
        ka, kb = _gram(a), _gram(b)
        cross = float((ka * kb).sum())
        xx = float((ka * ka).sum())
        yy = float((kb * kb).sum())
    return _ratio(cross, xx, yy)


class MinibatchCKA:
    """Streams minibatches and accumulates unbiased HSIC for every pair of representations.

    Each :meth:`update` takes the features of the same batch of images for ``num_x``
    representations on one side and ``num_y`` on the other; :meth:`compute` returns the
    ``(num_x, num_y)`` CKA matrix. Memory holds one batch's Gram matrices only.

    Args:
        num_x: Representations on the first side.
        num_y: Representations on the second side.
    """

    def __init__(self, num_x: int = 1, num_y: int = 1) -> None:
        self.num_x = num_x
        self.num_y = num_y
        self.cross = torch.zeros(num_x, num_y, dtype=torch.float64)
        self.self_x = torch.zeros(num_x, dtype=torch.float64)
        self.self_y = torch.zeros(num_y, dtype=torch.float64)
        self.num_batches = 0
        self.num_images = 0

    @staticmethod
    def _centred(features: Sequence[torch.Tensor], side: str) -> torch.Tensor:
        grams = []
        for i, f in enumerate(features):
            grams.append(_gram(_as_matrix(f, f"{side}[{i}]")))
        return _u_centre(torch.stack(grams)).flatten(1)

    def update(
        self,
        xs: Sequence[torch.Tensor] | torch.Tensor,
        ys: Sequence[torch.Tensor] | torch.Tensor | None = None,
    ) -> None:
        """Adds one batch.

        Args:
            xs: ``num_x`` feature tensors ``(B, d_i)`` (or one tensor when ``num_x == 1``).
            ys: ``num_y`` feature tensors ``(B, e_j)`` of the same ``B`` images; ``None``
                means the same representations as ``xs`` (a symmetric matrix, computed
                once).

        Raises:
            ValueError: Wrong counts, batch sizes that differ or are below 4, non-finite
                values.
        """
        xs = [xs] if isinstance(xs, torch.Tensor) else list(xs)
        same = ys is None
        ys = xs if ys is None else ([ys] if isinstance(ys, torch.Tensor) else list(ys))
        if len(xs) != self.num_x or len(ys) != self.num_y:
            raise ValueError(
                f"expected {self.num_x} and {self.num_y} representations, got {len(xs)} and "
                f"{len(ys)}"
            )
        sizes = {int(t.shape[0]) for t in (*xs, *ys)}
        if len(sizes) != 1:
            raise ValueError(f"representations of one batch have different sample counts {sizes}")
        n = sizes.pop()
        if n < _MIN_BATCH:
            raise ValueError(f"a CKA minibatch needs at least {_MIN_BATCH} images, got {n}")
        ux = self._centred(xs, "x")
        uy = ux if same else self._centred(ys, "y")
        scale = 1.0 / (n * (n - 3))
        self.cross += (ux @ uy.T).cpu() * scale
        self.self_x += (ux * ux).sum(1).cpu() * scale
        self.self_y += (uy * uy).sum(1).cpu() * scale
        self.num_batches += 1
        self.num_images += n

    def compute(self) -> np.ndarray:
        """The ``(num_x, num_y)`` CKA matrix (float64).

        Raises:
            ValueError: No batch was added.
        """
        if self.num_batches == 0:
            raise ValueError("minibatch CKA needs at least one batch of 4 or more images")
        denom = torch.sqrt(self.self_x.clamp_min(0)[:, None] * self.self_y.clamp_min(0)[None, :])
        out = torch.where(denom > 0, self.cross / denom.clamp_min(1e-300), torch.zeros(()))
        if bool((denom <= 0).any()):
            warnings.warn(
                "CKA is undefined for a representation without variance; those entries are 0.0",
                RuntimeWarning,
                stacklevel=2,
            )
        return out.numpy()


def minibatch_cka(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Minibatch linear CKA of two representations streamed as ``(x, y)`` batches.

    Args:
        batches: Pairs of ``(B, d1)`` and ``(B, d2)`` features of the same images (more
            dimensions are flattened per sample); batches with fewer than 4 images are
            skipped.

    Returns:
        The unbiased-HSIC CKA averaged over batches (Nguyen et al. 2021).

    Raises:
        ValueError: Non-finite values, or no batch of 4 or more images.
    """
    acc = MinibatchCKA(1, 1)
    for x, y in batches:
        if x.shape[0] >= _MIN_BATCH:
            acc.update([x], [y])
    return float(acc.compute()[0, 0])


def cka_features(
    activation: torch.Tensor, info: FeatureInfo, mode: CKAMode = "pooled"
) -> torch.Tensor:
    """One feature vector per image from a cut's activation (see the module docstring).

    Args:
        activation: ``(B, C, H, W)`` or ``(B, L, C)`` activations.
        info: The cut's layout (for the number of prefix tokens).
        mode: ``"pooled"`` or ``"flatten"``.

    Returns:
        ``(B, D)`` features in float64.
    """
    a = activation.detach()
    if info.is_tokens:
        a = a[:, info.num_prefix_tokens :, :]
        out = a.mean(1) if mode == "pooled" else a.flatten(1)
    else:
        out = a.mean((2, 3)) if mode == "pooled" else a.permute(0, 2, 3, 1).flatten(1)
    return out.to(torch.float64)


def _check_mode(mode: str) -> None:
    if mode not in CKA_MODES:
        raise ValueError(f"CKA mode must be one of {CKA_MODES}, got {mode!r}")


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, tuple | list) else batch


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]


def cka_cache_path(
    front: Anchor,
    back: Anchor,
    *,
    data_identity: str,
    mode: CKAMode = "pooled",
    num_images: int | None = None,
    batch_size: int | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Where :func:`cka_matrix` caches the matrix of one ordered pair (see its arguments)."""
    key = pair_key(
        front,
        back,
        version=CKA_CACHE_VERSION,
        data_identity=data_identity,
        num_images=num_images,
        batch_size=batch_size,
        mode=mode,
    )
    return entry_path(cache_dir, [_safe(front.name), _safe(back.name), mode], key, ".npy")


@torch.no_grad()
def cka_matrix(
    front: Anchor,
    back: Anchor,
    loader: Iterable[Any],
    *,
    mode: CKAMode = "pooled",
    num_images: int | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    data_identity: str | None = None,
) -> np.ndarray:
    """CKA of every front cut with every back cut on the same images, indexed by stitch point.

    Both anchors run once per batch (:meth:`space.Anchor.forward_cuts`) on the same images,
    at the resolution a stitched network of the pair runs at: adapted once to the front
    anchor's input size, and for the back anchor to :func:`space.back_input_size` (only its
    channels, unless it cannot run at another size). A pair of one anchor with itself runs it
    once.

    Args:
        front: The front anchor.
        back: The back anchor (may be ``front``).
        loader: Batches of images or ``(images, labels)``; the minibatch estimate depends on
            the batch size, which is part of the cache key.
        mode: ``"pooled"`` (default) or ``"flatten"``; see the module docstring.
        num_images: Use only the first ``num_images`` images (default: all).
        device: Where the anchors run (default: where their weights are).
        cache_dir: Cache directory (default :func:`evaluators.pair_cache.default_cache_dir`).
        use_cache: Read and write the cache.
        data_identity: Identifies the images (e.g. ``DataSplits.identity`` plus the split).
            Default: a content hash for in-memory loaders; without either the cache is off.

    Returns:
        A float64 array of shape ``(front.num_blocks + 1, back.num_blocks + 1)``: entry
        ``[k, j]`` is the CKA between front cut ``k`` and back cut ``j``.

    Raises:
        ValueError: Unknown mode, non-finite activations (naming anchor and cut), or fewer
            than 4 images.
    """
    _check_mode(mode)
    if num_images is not None and (isinstance(num_images, bool) or num_images < _MIN_BATCH):
        raise ValueError(f"num_images must be an integer >= {_MIN_BATCH}, got {num_images!r}")
    shape = (front.num_blocks + 1, back.num_blocks + 1)
    ident = cached_data_identity(loader, data_identity, use_cache)
    path = None
    if ident is not None:
        path = cka_cache_path(
            front,
            back,
            data_identity=ident,
            mode=mode,
            num_images=num_images,
            batch_size=getattr(loader, "batch_size", None),
            cache_dir=cache_dir,
        )
        cached = read_entry(path, ("cka",), shape, finite=True)
        if cached is not None:
            return cached["cka"]
    start = time.perf_counter()
    acc = _accumulate(front, back, loader, mode, num_images, device)
    result = acc.compute()
    if path is not None:
        meta = entry_meta(
            front,
            back,
            ident,
            mode=mode,
            num_images=acc.num_images,
            batches=acc.num_batches,
            seconds=round(time.perf_counter() - start, 3),
            shape=list(shape),
        )
        write_entry(path, {"cka": result}, meta)
    return result


def _accumulate(
    front: Anchor,
    back: Anchor,
    loader: Iterable[Any],
    mode: CKAMode,
    num_images: int | None,
    device: str | torch.device | None,
) -> MinibatchCKA:
    """Runs both anchors on the loader's (first ``num_images``) images and streams their CKA.

    Raises:
        ValueError: Non-finite activations, or no batch of 4 or more images.
    """
    if device is None:
        device = next(front.model.parameters()).device
    device = torch.device(device)
    back_size = back_input_size(front, back)
    f_info, b_info = front.features(), back.features(back_size)
    shared = back.model is front.model and tuple(back_size) == tuple(front.input_size)
    acc = MinibatchCKA(front.num_blocks + 1, back.num_blocks + 1)
    seen = 0
    for batch in loader:
        x = _images(batch)
        if num_images is not None:
            x = x[: num_images - seen]
        if x.shape[0] < _MIN_BATCH:
            if num_images is not None and seen + x.shape[0] >= num_images:
                break
            continue
        x = x.to(device)
        xf = x if tuple(x.shape[1:]) == front.input_size else adapt_images(x, front.input_size)
        feats_f = _cut_features(front, front.forward_cuts(xf), f_info, mode, "front")
        if shared:
            acc.update(feats_f, None)
        else:
            xb = xf if tuple(xf.shape[1:]) == back_size else adapt_images(xf, back_size)
            feats_b = _cut_features(back, back.forward_cuts(xb), b_info, mode, "back")
            acc.update(feats_f, feats_b)
        seen += x.shape[0]
        if num_images is not None and seen >= num_images:
            break
    if acc.num_batches == 0:
        raise ValueError(
            f"CKA of {front.name!r} -> {back.name!r} needs at least one batch of "
            f"{_MIN_BATCH} or more images; the loader gave none"
        )
    return acc


def _cut_features(
    anchor: Anchor,
    acts: list[torch.Tensor],
    infos: list[FeatureInfo],
    mode: CKAMode,
    side: str,
) -> list[torch.Tensor]:
    out = []
    for cut, (a, info) in enumerate(zip(acts, infos, strict=True)):
        f = cka_features(a, info, mode)
        if not torch.isfinite(f).all():
            raise ValueError(
                f"non-finite activations at cut {cut} of the {side} anchor {anchor.name!r} "
                "while computing CKA; check its weights and the input images"
            )
        out.append(f)
    return out
