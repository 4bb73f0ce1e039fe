"""The search space: which candidates a study holds, and how Optuna parameters encode them.

:class:`SearchSpace` enumerates the anchors and the stitch points of every ordered anchor
pair and maps them to and from Optuna parameters; :class:`PruningRule` says which stitch
points CKA prunes (:mod:`search.pruning` applies it to a study). The candidates themselves
are :class:`space.Candidate` values.

**Encoding.** Every candidate is four parameters, the same for every trial, so that
multi-objective samplers (TPE, NSGA-II) model all of them instead of falling back to random
sampling for conditional ones:

- ``front``, ``back``: categorical over the study's anchors; ``front == back`` is the bare
  anchor (no stitch).
- ``front_cut``, ``back_cut``: floats in ``[0, 1]``, the relative depth of the cut in each
  anchor. They decode to ``k = 1 + round(front_cut * (n_front - 1))`` (at least one front
  block runs) and ``j = round(back_cut * (n_back - 1))`` (at least one back block runs), so
  the same value means "the same depth" in anchors of different depths, as SN-Net's
  nearest-interpolation mapping of block ids.

Several parameter vectors decode to one configuration; the searcher evaluates each
configuration once and answers repeats from the stored result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from space import Candidate


class SearchSpace:
    """Ordered anchor pairs and their stitch points.

    Args:
        depths: Anchor name -> number of stitchable blocks, in the study's order.
    """

    def __init__(self, depths: Mapping[str, int]) -> None:
        if len(depths) < 2:
            raise ValueError("a search space needs at least two anchors")
        for name, n in depths.items():
            if n < 1:
                raise ValueError(f"anchor {name!r} has no stitchable blocks")
        self.depths = dict(depths)
        self.names = list(depths)

    # ------------------------------------------------------------- encoding
    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the four parameters."""
        return {
            "front": CategoricalDistribution(self.names),
            "back": CategoricalDistribution(self.names),
            "front_cut": FloatDistribution(0.0, 1.0),
            "back_cut": FloatDistribution(0.0, 1.0),
        }

    def decode(self, params: Mapping[str, object]) -> Candidate:
        """Parameters -> candidate."""
        front, back = str(params["front"]), str(params["back"])
        if front == back:
            return Candidate(front, front)
        nf, nb = self.depths[front], self.depths[back]
        k = 1 + round(float(params["front_cut"]) * (nf - 1))
        j = round(float(params["back_cut"]) * (nb - 1))
        return Candidate(front, back, k, j)

    def encode(self, c: Candidate) -> dict[str, object]:
        """Candidate -> parameters that decode to it."""
        if c.is_anchor:
            return {"front": c.front, "back": c.front, "front_cut": 1.0, "back_cut": 0.0}
        nf, nb = self.depths[c.front], self.depths[c.back]
        return {
            "front": c.front,
            "back": c.back,
            "front_cut": (c.front_block - 1) / (nf - 1) if nf > 1 else 0.0,
            "back_cut": c.back_block / (nb - 1) if nb > 1 else 0.0,
        }

    # ----------------------------------------------------------- enumeration
    def anchors(self) -> list[Candidate]:
        """The bare anchors."""
        return [Candidate(n, n) for n in self.names]

    def pairs(self) -> list[tuple[str, str]]:
        """Ordered pairs of distinct anchors (both stitching orders)."""
        return [(a, b) for a in self.names for b in self.names if a != b]

    def stitches(self, front: str, back: str) -> list[Candidate]:
        """Every stitch point of one ordered pair."""
        return [
            Candidate(front, back, k, j)
            for k in range(1, self.depths[front] + 1)
            for j in range(self.depths[back])
        ]

    def all_candidates(self) -> list[Candidate]:
        """Anchors first, then every stitch point of every ordered pair."""
        out = self.anchors()
        for a, b in self.pairs():
            out.extend(self.stitches(a, b))
        return out

    def __len__(self) -> int:
        return len(self.all_candidates())


@dataclass(frozen=True)
class PruningRule:
    """Which stitch points CKA prunes.

    Attributes:
        threshold: Prune a stitch point whose CKA is below this (0 disables).
        top_k: Keep only the ``top_k`` back cuts with the highest CKA for each front cut
            (``None`` disables).
    """

    threshold: float = 0.0
    top_k: int | None = None

    @property
    def active(self) -> bool:
        """Whether the rule prunes anything at all."""
        return self.threshold > 0 or self.top_k is not None

    def reason(self, c: Candidate, matrix: np.ndarray) -> str | None:
        """Why ``c`` is pruned (``None`` if it is kept).

        Args:
            c: A stitch candidate.
            matrix: The pair's CKA matrix indexed by cuts ``[k, j]``.
        """
        if c.is_anchor or not self.active:
            return None
        value = float(matrix[c.front_block, c.back_block])
        if value < self.threshold:
            return f"CKA {value:.3f} < threshold {self.threshold:.3f}"
        if self.top_k is not None:
            nb = matrix.shape[1] - 1  # valid back cuts: 0 .. nb - 1
            row = np.asarray(matrix[c.front_block, :nb], dtype=float)
            rank = int((row > value).sum())
            if rank >= self.top_k:
                return (
                    f"CKA {value:.3f} ranks {rank + 1} of {nb} for front cut "
                    f"{c.front_block} (top_k={self.top_k})"
                )
        return None

    def kept(
        self, candidates: Sequence[Candidate], matrices: Mapping[tuple[str, str], np.ndarray]
    ) -> list[Candidate]:
        """The candidates the rule keeps (anchors always)."""
        return [
            c
            for c in candidates
            if c.is_anchor or self.reason(c, matrices[(c.front, c.back)]) is None
        ]
