"""Stage boundaries: the stitch points between whole stages of two anchors.

A CNN runs its blocks in *stages*, runs of blocks at one feature-map resolution and width
(:meth:`space.FamilyAdapter.stage_depths`). A *stage-boundary stitch point* of an ordered
pair runs the front anchor's stem and stages ``0..s``, a stitching layer, then the back
anchor's stages ``s+1..`` and head: front cut ``k`` after front stage ``s`` and back cut
``j`` after back stage ``s`` (so both halves keep whole stages and their features sit at the
same depth in the network's layout). It needs two anchors with the same number of stages,
and exists for ``1 <= k`` and ``j < n_back`` (at least one back block runs), so an anchor
with ``S`` stages gives ``S - 1`` such points per ordered pair at most.

A study restricts its search space to them with ``cuts: stages`` (the default, ``cuts: all``,
searches every ``(k, j)``); ``benchmarks/bench_real_pair.py`` measures the same points.
"""

from __future__ import annotations

from space.anchor import Anchor
from space.families import family_of


def stage_ends(anchor: Anchor) -> list[int] | None:
    """The cut after every stage of ``anchor`` (the last is ``num_blocks``), or ``None``.

    ``None`` when the anchor's family has no stages (ViTs).

    Raises:
        ValueError: The family's stage depths do not add up to the anchor's blocks.
    """
    family = family_of(anchor.model)
    depths = None if family is None else family.stage_depths(anchor.model)
    if depths is None:
        return None
    ends, total = [], 0
    for depth in depths:
        total += depth
        ends.append(total)
    if total != anchor.num_blocks:
        raise ValueError(
            f"anchor {anchor.name!r}: its stages hold {total} blocks, but it has "
            f"{anchor.num_blocks}"
        )
    return ends


def stage_stitch_points(front: Anchor, back: Anchor) -> list[tuple[int, int]]:
    """The stage-boundary stitch points ``(k, j)`` of an ordered pair, by stage.

    Point ``s`` cuts the front after its stage ``s`` and the back after its stage ``s``;
    points with ``k < 1`` or ``j >= back.num_blocks`` are left out (no back block would run).

    Raises:
        ValueError: An anchor has no stages, the two have different numbers of stages, or
            the pair has no stage-boundary point; the message names the anchors.
    """
    ends = {}
    for anchor in (front, back):
        e = stage_ends(anchor)
        if e is None:
            raise ValueError(
                f"anchor {anchor.name!r} ({anchor.family}) has no stages, so it has no stage "
                "boundaries to stitch at"
            )
        ends[anchor.name] = e
    fe, be = ends[front.name], ends[back.name]
    if len(fe) != len(be):
        raise ValueError(
            f"anchors {front.name!r} ({len(fe)} stages) and {back.name!r} ({len(be)} stages) "
            "have different numbers of stages; a stage-boundary stitch joins stage s of one "
            "to stage s + 1 of the other"
        )
    points = [
        (k, j)
        for k, j in zip(fe, be, strict=True)
        if 1 <= k <= front.num_blocks and j < back.num_blocks
    ]
    if not points:
        raise ValueError(
            f"anchors {front.name!r} -> {back.name!r} have no stage-boundary stitch point "
            "(one stage each)"
        )
    return points
