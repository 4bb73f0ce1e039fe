"""What the benchmarks score with: Pareto fronts, normalised hypervolume, rank correlations.

**Hypervolume convention.** Objectives are accuracy (up) and MACs (down). Both are mapped
to minimisation on ``[0, 1]``: ``a = (acc_best - acc) / (acc_best - acc_chance)`` and
``m = (macs - macs_min) / (macs_max - macs_min)``, where ``acc_best``, ``macs_min`` and
``macs_max`` are taken over the whole space (every candidate evaluated) and ``acc_chance``
is chance accuracy (``100 / classes``). The reference point is ``(1.0, 1.1)``: a network no
better than chance adds nothing, and the 10% margin in MACs lets the largest network
contribute. A search's hypervolume is that of every candidate it evaluated, reported as a
fraction of the exhaustive front's hypervolume (1.0 = the whole true front found).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna._hypervolume import compute_hypervolume


def pareto_mask(
    acc: Sequence[float] | np.ndarray, macs: Sequence[float] | np.ndarray
) -> np.ndarray:
    """Which points no other point dominates (accuracy up, MACs down)."""
    acc = np.asarray(acc, dtype=float)
    macs = np.asarray(macs, dtype=float)
    ge = acc[None, :] >= acc[:, None]  # [i, j]: j at least as accurate as i
    le = macs[None, :] <= macs[:, None]
    strict = (acc[None, :] > acc[:, None]) | (macs[None, :] < macs[:, None])
    dominated = (ge & le & strict).any(axis=1)
    return ~dominated


@dataclass(frozen=True)
class Hypervolume:
    """Normalised two-objective hypervolume (see the module docstring for the convention).

    Attributes:
        acc_best: Best accuracy of the space (percent).
        acc_chance: Chance accuracy (percent).
        macs_min: Fewest MACs of the space.
        macs_max: Most MACs of the space.
        reference: Reference point in normalised coordinates.
    """

    acc_best: float
    acc_chance: float
    macs_min: float
    macs_max: float
    reference: tuple[float, float] = (1.0, 1.1)

    @classmethod
    def for_space(cls, acc: np.ndarray, macs: np.ndarray, num_classes: int) -> Hypervolume:
        """The convention for a space whose every candidate is ``(acc, macs)``."""
        return cls(
            acc_best=float(np.max(acc)),
            acc_chance=100.0 / num_classes,
            macs_min=float(np.min(macs)),
            macs_max=float(np.max(macs)),
        )

    def normalise(self, acc: np.ndarray, macs: np.ndarray) -> np.ndarray:
        """``(n, 2)`` minimisation coordinates."""
        a = (self.acc_best - np.asarray(acc, dtype=float)) / max(
            self.acc_best - self.acc_chance, 1e-12
        )
        m = (np.asarray(macs, dtype=float) - self.macs_min) / max(
            self.macs_max - self.macs_min, 1e-12
        )
        return np.stack([a, m], axis=1)

    def __call__(self, acc: np.ndarray, macs: np.ndarray) -> float:
        """Hypervolume dominated by the points (Optuna's WFG implementation)."""
        pts = self.normalise(acc, macs)
        ref = np.asarray(self.reference, dtype=float)
        pts = pts[(pts < ref).all(axis=1)]
        if len(pts) == 0:
            return 0.0
        return float(compute_hypervolume(pts, ref))

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "acc_best": self.acc_best,
            "acc_chance": self.acc_chance,
            "macs_min": self.macs_min,
            "macs_max": self.macs_max,
            "reference": list(self.reference),
        }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (``nan`` when either side is constant or too short)."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(np.asarray(x)), _ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equally long sequences."""
    a, b = np.asarray(x), np.asarray(y)
    dx = np.sign(a[:, None] - a[None, :])
    dy = np.sign(b[:, None] - b[None, :])
    iu = np.triu_indices(len(a), 1)
    dx, dy = dx[iu], dy[iu]
    concordant_minus_discordant = float((dx * dy).sum())
    n0 = len(dx)
    tx, ty = float((dx == 0).sum()), float((dy == 0).sum())
    denom = math.sqrt((n0 - tx) * (n0 - ty))
    return concordant_minus_discordant / denom if denom else float("nan")
