"""The search space: which candidates a study holds, and how Optuna parameters encode them.

:class:`SearchSpace` enumerates the anchors and the stitch points of every ordered anchor
pair and maps them to and from Optuna parameters; :mod:`search.core.pruning_rule` says which
stitch points a signal prunes. The candidates themselves are :class:`space.Candidate` values.

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

A study that lists input ``resolutions`` adds a fifth parameter every trial shares:

- ``resolution``: categorical over the listed sizes (pixels); both anchors of the
  candidate run on images of that size. It is part of the candidate's identity, so every
  anchor and stitch point exists once per resolution. Without ``resolutions`` there is no
  such parameter and every candidate runs at its front anchor's native size.

Several parameter vectors decode to one configuration; the searcher evaluates each
configuration once and answers repeats from the stored result.

**Restricted stitch points.** A study with ``cuts: stages`` holds only the stage-boundary
stitch points of each ordered pair (:func:`space.stage_stitch_points`; :func:`build_space`).
The encoding stays the same four (or five) parameters: a parameter vector decodes to the
pair's allowed point nearest to its relative depths (``front_cut``, ``back_cut``), and every
allowed point encodes to parameters that decode to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from space import Anchor, Candidate, stage_stitch_points

#: The values of a study's ``cuts`` setting: every stitch point, or stage boundaries only.
CUTS = ("all", "stages")
#: Allowed stitch points ``(k, j)`` per ordered anchor pair ``(front, back)``.
StitchPoints = Mapping[tuple[str, str], Sequence[tuple[int, int]]]

#: What a pair's pruning signal (and CKA) matrix is keyed by: ``(front, back)`` for a study at
#: the native sizes, ``(front, back, resolution)`` in one that searches resolutions.
SignalKey = tuple[str, str] | tuple[str, str, int]


def pair_key(front: str, back: str, resolution: int | None = None) -> SignalKey:
    """The :data:`SignalKey` of an ordered pair at a resolution (``None``: native sizes)."""
    return (front, back) if resolution is None else (front, back, resolution)


def signal_key(c: Candidate) -> SignalKey:
    """The key of the signal matrix a stitch candidate's pruning reads (see :data:`SignalKey`)."""
    return pair_key(c.front, c.back, c.resolution)


def key_resolution(key: SignalKey) -> int | None:
    """The resolution of a :data:`SignalKey` (``None``: native sizes)."""
    return key[2] if len(key) == 3 else None  # type: ignore[misc]


class SearchSpace:
    """Ordered anchor pairs and their stitch points.

    Args:
        depths: Anchor name -> number of stitchable blocks, in the study's order.
        resolutions: The input sizes (pixels) every candidate is searched at, or ``None``
            for the anchors' native sizes (no ``resolution`` parameter).
        points: The stitch points ``(k, j)`` each ordered pair holds, or ``None`` for all
            of them (``1 <= k <= n_front``, ``0 <= j < n_back``); every ordered pair must be
            given at least one point.
    """

    def __init__(
        self,
        depths: Mapping[str, int],
        resolutions: Sequence[int] | None = None,
        points: StitchPoints | None = None,
    ) -> None:
        if len(depths) < 2:
            raise ValueError("a search space needs at least two anchors")
        for name, n in depths.items():
            if n < 1:
                raise ValueError(f"anchor {name!r} has no stitchable blocks")
        self.depths = dict(depths)
        self.names = list(depths)
        if resolutions is not None:
            if not resolutions or len(set(resolutions)) != len(resolutions):
                raise ValueError(f"resolutions must be distinct and non-empty, got {resolutions!r}")
            resolutions = [int(r) for r in resolutions]
        self.resolutions: list[int] | None = resolutions
        self.points: dict[tuple[str, str], list[tuple[int, int]]] | None = None
        if points is not None:
            self.points = {}
            for a, b in self.pairs():
                pts = [(int(k), int(j)) for k, j in points.get((a, b), ())]
                bad = [
                    (k, j)
                    for k, j in pts
                    if not (1 <= k <= self.depths[a] and 0 <= j < self.depths[b])
                ]
                if not pts or bad:
                    raise ValueError(
                        f"stitch points of {a!r} -> {b!r} must be a non-empty list of (k, j) "
                        f"with 1 <= k <= {self.depths[a]} and 0 <= j < {self.depths[b]}, got "
                        f"{pts!r}"
                    )
                self.points[(a, b)] = sorted(set(pts))

    # ------------------------------------------------------------- encoding
    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the four parameters (five with resolutions)."""
        out: dict[str, BaseDistribution] = {
            "front": CategoricalDistribution(self.names),
            "back": CategoricalDistribution(self.names),
            "front_cut": FloatDistribution(0.0, 1.0),
            "back_cut": FloatDistribution(0.0, 1.0),
        }
        if self.resolutions is not None:
            out["resolution"] = CategoricalDistribution(self.resolutions)
        return out

    def decode(self, params: Mapping[str, object]) -> Candidate:
        """Parameters -> candidate."""
        front, back = str(params["front"]), str(params["back"])
        res = None if self.resolutions is None else int(params["resolution"])  # type: ignore[call-overload]
        if front == back:
            return Candidate(front, front, resolution=res)
        nf, nb = self.depths[front], self.depths[back]
        fc, bc = float(params["front_cut"]), float(params["back_cut"])
        if self.points is not None:
            k, j = min(
                self.points[(front, back)],
                key=lambda p: (_rel(p[0] - 1, nf) - fc) ** 2 + (_rel(p[1], nb) - bc) ** 2,
            )
            return Candidate(front, back, k, j, res)
        k = 1 + round(fc * (nf - 1))
        j = round(bc * (nb - 1))
        return Candidate(front, back, k, j, res)

    def encode(self, c: Candidate) -> dict[str, object]:
        """Candidate -> parameters that decode to it."""
        at = {} if self.resolutions is None else {"resolution": c.resolution}
        if c.is_anchor:
            return {"front": c.front, "back": c.front, "front_cut": 1.0, "back_cut": 0.0, **at}
        nf, nb = self.depths[c.front], self.depths[c.back]
        return {
            "front": c.front,
            "back": c.back,
            "front_cut": _rel(c.front_block - 1, nf),
            "back_cut": _rel(c.back_block, nb),
            **at,
        }

    # ----------------------------------------------------------- enumeration
    def sizes(self) -> list[int | None]:
        """The resolutions candidates run at (``[None]``: the native sizes only)."""
        return [None] if self.resolutions is None else list(self.resolutions)

    def anchors(self) -> list[Candidate]:
        """The bare anchors (each once per resolution)."""
        return [Candidate(n, n, resolution=r) for r in self.sizes() for n in self.names]

    def pairs(self) -> list[tuple[str, str]]:
        """Ordered pairs of distinct anchors (both stitching orders)."""
        return [(a, b) for a in self.names for b in self.names if a != b]

    def signal_keys(self) -> list[SignalKey]:
        """What pruning signals are computed for: each ordered pair at each resolution."""
        return [pair_key(a, b, r) for r in self.sizes() for a, b in self.pairs()]

    def stitch_points(self, front: str, back: str) -> list[tuple[int, int]]:
        """The stitch points ``(k, j)`` of one ordered pair the space holds."""
        if self.points is not None:
            return list(self.points[(front, back)])
        return [(k, j) for k in range(1, self.depths[front] + 1) for j in range(self.depths[back])]

    def restricted_points(self, front: str, back: str) -> list[tuple[int, int]] | None:
        """The pair's stitch points when the space restricts them (``None``: all of them)."""
        return None if self.points is None else self.stitch_points(front, back)

    def stitches(self, front: str, back: str, resolution: int | None = None) -> list[Candidate]:
        """Every stitch point of one ordered pair (at one resolution)."""
        return [
            Candidate(front, back, k, j, resolution) for k, j in self.stitch_points(front, back)
        ]

    def all_candidates(self) -> list[Candidate]:
        """Anchors first, then every stitch point of every ordered pair (per resolution)."""
        out = self.anchors()
        for r in self.sizes():
            for a, b in self.pairs():
                out.extend(self.stitches(a, b, r))
        return out

    def __len__(self) -> int:
        return len(self.all_candidates())


def _rel(i: int, n: int) -> float:
    """Relative depth of cut index ``i`` among ``n`` values (``front_cut``/``back_cut``)."""
    return i / (n - 1) if n > 1 else 0.0


def build_space(
    anchors: Mapping[str, Anchor],
    resolutions: Sequence[int] | None = None,
    cuts: str = "all",
) -> SearchSpace:
    """The search space of a study's anchors.

    Args:
        anchors: The anchors by name, in the study's order.
        resolutions: The study's ``resolutions`` (``None``: native sizes).
        cuts: ``all`` (every stitch point) or ``stages`` (stage boundaries only:
            :func:`space.stage_stitch_points` for every ordered pair).

    Raises:
        ValueError: An unknown ``cuts``, or ``stages`` for a pair without stage-boundary
            points (the message names the anchors).
    """
    if cuts not in CUTS:
        raise ValueError(f"cuts must be one of {', '.join(CUTS)}, got {cuts!r}")
    depths = {name: a.num_blocks for name, a in anchors.items()}
    points = None
    if cuts == "stages":
        points = {
            (a, b): stage_stitch_points(anchors[a], anchors[b])
            for a in anchors
            for b in anchors
            if a != b
        }
    return SearchSpace(depths, resolutions, points)
