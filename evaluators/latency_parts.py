"""Latency-table parts: what a candidate's latency is predicted from, and their names.

A candidate runs a front anchor's stem and blocks ``[0, k)``, a stitching layer and a back
anchor's blocks ``[j, n)`` and head (a bare anchor: the whole anchor). A latency table
(:mod:`evaluators.latency_table`) times, per anchor, every **prefix** ``front(k)`` = stem and
blocks ``[0, k)`` that a stitch can cut at, every **suffix** ``back(j)`` = blocks ``[j, n)``
and head, and the **bare anchor** end to end; and every stitching layer of the space.

**Parts** are named by strings (:func:`part_keys`): ``prefix|<anchor>|<k>``,
``suffix|<anchor>|<j>``, ``anchor|<anchor>``, and ``stitch|<kind>|<src>|<dst>`` for a
stitching layer, by its kind and the two cuts' shapes (``NCHW:64x7x7``, ``NLC:1+7x7x64`` for
a class token and a 7x7 grid of 64-wide tokens), so stitch points with equal shapes share an
entry. A candidate at a searched input resolution (:attr:`space.Candidate.resolution`) runs
its anchors at that size: ``prefix|<anchor>|<k>@<px>``, ``suffix|<anchor>|<j>@<px>``,
``anchor|<anchor>@<px>`` (the anchor records then hold the cut shapes at each resolution,
``cuts_at``), so a table covers a study's resolutions only when profiled for them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from evaluators.pair_cache import anchor_identity
from space import Anchor, Candidate, FeatureInfo


def _shape_text(info: FeatureInfo) -> str:
    if info.is_tokens:
        return f"NLC:{info.num_prefix_tokens}+{info.height}x{info.width}x{info.channels}"
    return f"NCHW:{info.channels}x{info.height}x{info.width}"


def cut_info(record: Mapping[str, Any], cut: int, resolution: int | None = None) -> FeatureInfo:
    """Layout and shape of a cut, from an :func:`anchor_latency_record` (at ``resolution``)."""
    cuts = record["cuts"] if resolution is None else record["cuts_at"][str(resolution)]
    layout, c, h, w, p = cuts[cut]
    return FeatureInfo(layout, c, h, w, p)


def _cut_rows(anchor: Anchor) -> list[list[Any]]:
    return [
        [f.layout, f.channels, f.height, f.width, f.num_prefix_tokens] for f in anchor.features()
    ]


def _at(resolution: int | None) -> str:
    """The part-name suffix of a resolution (none at the native sizes)."""
    return "" if resolution is None else f"@{resolution}"


def stitch_key(src: FeatureInfo, dst: FeatureInfo) -> str:
    """The part name of the stitching layer between two cuts (its kind and both shapes)."""
    kind = f"{'vit' if src.is_tokens else 'cnn'}->{'vit' if dst.is_tokens else 'cnn'}"
    return f"stitch|{kind}|{_shape_text(src)}|{_shape_text(dst)}"


def anchor_latency_record(anchor: Anchor, resolutions: Iterable[int] = ()) -> dict[str, Any]:
    """What a table records of an anchor: name, weights identity, input size and cuts.

    Args:
        anchor: The anchor (at its native size).
        resolutions: Searched input sizes; their cut shapes are recorded under ``cuts_at``.
    """
    rec: dict[str, Any] = {
        "name": anchor.name,
        "identity": anchor_identity(anchor),
        "checkpoint_sha256": anchor.checkpoint_sha256,
        "input_size": list(anchor.input_size),
        "num_blocks": anchor.num_blocks,
        "cuts": _cut_rows(anchor),
    }
    sizes = sorted(set(resolutions))
    if sizes:
        rec["cuts_at"] = {str(r): _cut_rows(anchor.at_resolution(r)) for r in sizes}
    return rec


def candidate_resolutions(candidates: Iterable[Candidate]) -> list[int]:
    """The searched resolutions among candidates (sorted; empty at the native sizes)."""
    return sorted({c.resolution for c in candidates if c.resolution is not None})


def prefix_key(anchor: str, k: int, resolution: int | None = None) -> str:
    """The part name of an anchor's stem and blocks ``[0, k)``."""
    return f"prefix|{anchor}|{k}{_at(resolution)}"


def suffix_key(anchor: str, j: int, resolution: int | None = None) -> str:
    """The part name of an anchor's blocks ``[j, n)`` and head."""
    return f"suffix|{anchor}|{j}{_at(resolution)}"


def anchor_key(anchor: str, resolution: int | None = None) -> str:
    """The part name of a bare anchor, end to end."""
    return f"anchor|{anchor}{_at(resolution)}"


def split_cut(num_blocks: int) -> int:
    """The cut an anchor is split at (prefix and suffix) for the overhead fit: its middle."""
    return max(1, num_blocks // 2)


def part_keys(candidate: Candidate, anchors: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The parts a candidate's prediction is made of, in execution order.

    A bare anchor: ``[anchor|<name>]``; a stitch: its front anchor's prefix up to cut ``k``,
    the stitching layer and its back anchor's suffix from cut ``j``.

    Args:
        candidate: A bare anchor or a stitch.
        anchors: :func:`anchor_latency_record` of each anchor by name.

    Raises:
        KeyError: The candidate names an anchor that ``anchors`` lacks, or a resolution
            whose cut shapes its record lacks.
    """
    front = anchors[candidate.front]
    r = candidate.resolution
    if candidate.is_anchor:
        return [anchor_key(candidate.front, r)]
    back = anchors[candidate.back]
    k, j = candidate.front_block, candidate.back_block
    return [
        prefix_key(candidate.front, k, r),
        stitch_key(cut_info(front, k, r), cut_info(back, j, r)),
        suffix_key(candidate.back, j, r),
    ]


def fit_keys(candidate: Candidate, anchors: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The pieces whose sum the overhead fit relates to a network's end-to-end time.

    A stitch's parts (:func:`part_keys`); a bare anchor's prefix and suffix at its
    :func:`split_cut` (so that, like a stitch, it is pieces timed apart).

    Raises:
        KeyError: As :func:`part_keys`.
    """
    if not candidate.is_anchor:
        return part_keys(candidate, anchors)
    name, r = candidate.front, candidate.resolution
    m = split_cut(anchors[name]["num_blocks"])
    return [prefix_key(name, m, r), suffix_key(name, m, r)]


def study_fingerprint(anchors: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 over the anchors' names, weights identities and input sizes, in order."""
    data = [[a["name"], a["identity"], list(a["input_size"])] for a in anchors]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()
