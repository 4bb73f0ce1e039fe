"""The pruning rule: which stitch points a stitch-point signal removes before the search.

:class:`PruningRule` judges one stitch point from its pair's signal matrix (and MACs, for a
``depth`` rule); :mod:`search.strategy.pruning` applies it to a whole study.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from search.core.encoding import SignalKey, signal_key
from space import Candidate

#: Pruning signals and whether higher values are better (see :mod:`evaluators.signals`).
SIGNAL_DIRECTIONS: dict[str, bool] = {"cka": True, "residual": False, "kl": False}


@dataclass(frozen=True)
class PruningRule:
    """Which stitch points a stitch-point signal prunes.

    Attributes:
        threshold: Prune a stitch point whose signal is worse than this: below it for
            ``cka`` (0 disables, as before), above it for ``residual`` and ``kl``
            (``None`` disables).
        top_k: Keep only the ``top_k`` back cuts with the best signal for each front cut
            (``None`` disables).
        signal: ``cka`` (higher is better), ``residual`` or ``kl`` (lower is better).
        depth: Keep only the stitch points in the first ``depth`` Pareto layers of (signal,
            MACs) within their ordered anchor pair (non-dominated sorting: layer 1 is the
            pair's points no other point beats on both signal and MACs; ``None``
            disables). Needs the pair's MACs.
    """

    threshold: float | None = 0.0
    top_k: int | None = None
    signal: str = "cka"
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.signal not in SIGNAL_DIRECTIONS:
            raise ValueError(
                f"pruning signal must be one of {sorted(SIGNAL_DIRECTIONS)}, got {self.signal!r}"
            )

    @property
    def higher_is_better(self) -> bool:
        """Whether the rule's signal is better when higher."""
        return SIGNAL_DIRECTIONS[self.signal]

    @property
    def active(self) -> bool:
        """Whether the rule prunes anything at all."""
        return self._threshold_on or self.top_k is not None or self.depth is not None

    @property
    def _threshold_on(self) -> bool:
        if self.threshold is None:
            return False
        return self.threshold > 0 if self.higher_is_better else True

    def _score(self, value: float) -> float:
        return value if self.higher_is_better else -value

    def reason(
        self, c: Candidate, matrix: np.ndarray, macs: np.ndarray | None = None
    ) -> str | None:
        """Why ``c`` is pruned (``None`` if it is kept).

        Args:
            c: A stitch candidate.
            matrix: The pair's signal matrix indexed by cuts ``[k, j]``.
            macs: The pair's MACs matrix, same indexing (needed by ``depth``).

        Raises:
            ValueError: ``depth`` is set but ``macs`` is missing.
        """
        if c.is_anchor or not self.active:
            return None
        value = float(matrix[c.front_block, c.back_block])
        name = self.signal if self.signal != "cka" else "CKA"
        if self._threshold_on:
            worse = value < self.threshold if self.higher_is_better else value > self.threshold
            if worse:
                op = "<" if self.higher_is_better else ">"
                return f"{name} {value:.3f} {op} threshold {self.threshold:.3f}"
        if self.top_k is not None:
            nb = matrix.shape[1] - 1  # valid back cuts: 0 .. nb - 1
            row = np.array([self._score(float(v)) for v in matrix[c.front_block, :nb]])
            rank = int((row > self._score(value)).sum())  # NaN: a point the space leaves out
            if rank >= self.top_k:
                return (
                    f"{name} {value:.3f} ranks {rank + 1} of {int((~np.isnan(row)).sum())} "
                    f"for front cut "
                    f"{c.front_block} (top_k={self.top_k})"
                )
        if self.depth is not None:
            if macs is None:
                raise ValueError(f"pruning depth={self.depth} needs the MACs of every stitch point")
            layer = int(
                pareto_layers(matrix, macs, self.higher_is_better)[c.front_block, c.back_block]
            )
            if layer >= self.depth:
                return (
                    f"{name} {value:.3f} at {int(macs[c.front_block, c.back_block])} MACs is in "
                    f"Pareto layer {layer + 1} of (signal, MACs) within its pair (depth="
                    f"{self.depth})"
                )
        return None

    def kept(
        self,
        candidates: Sequence[Candidate],
        matrices: Mapping[SignalKey, np.ndarray],
        macs: Mapping[SignalKey, np.ndarray] | None = None,
    ) -> list[Candidate]:
        """The candidates the rule keeps (anchors always); matrices keyed by :func:`signal_key`."""
        return [
            c
            for c in candidates
            if c.is_anchor
            or self.reason(
                c,
                matrices[signal_key(c)],
                None if macs is None else macs[signal_key(c)],
            )
            is None
        ]


def pareto_layers(matrix: np.ndarray, macs: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Non-dominated sorting of a pair's stitch points by (signal, MACs).

    Args:
        matrix: Signal per cut pair ``[k, j]``; the stitch points are ``k >= 1``, ``j < n``.
        macs: MACs, same indexing.
        higher_is_better: The signal's direction.

    Returns:
        An int array of ``matrix``'s shape: 0 for the stitch points no other point of the
        pair beats on both (better or equal signal and MACs, one strictly), 1 for those only
        layer-0 points beat, and so on; -1 outside the stitch points and where the signal
        or MACs are NaN (points a restricted space does not hold, :class:`SearchSpace`).
    """
    sign = 1.0 if higher_is_better else -1.0
    points = [
        (k, j)
        for k in range(1, matrix.shape[0])
        for j in range(matrix.shape[1] - 1)
        if not (np.isnan(matrix[k, j]) or np.isnan(macs[k, j]))
    ]
    score = np.array([sign * float(matrix[p]) for p in points])
    cost = np.array([float(macs[p]) for p in points])
    layers = np.full(matrix.shape, -1, dtype=int)
    left = np.ones(len(points), dtype=bool)
    layer = 0
    while left.any():
        idx = np.flatnonzero(left)
        s, m = score[idx], cost[idx]
        ge = (s[None, :] >= s[:, None]) & (m[None, :] <= m[:, None])
        strict = (s[None, :] > s[:, None]) | (m[None, :] < m[:, None])
        front = ~(ge & strict).any(axis=1)
        for i in idx[front]:
            layers[points[i]] = layer
        left[idx[front]] = False
        layer += 1
    return layers
