"""A stitched family: several anchors and stitches in one network, switched at run time.

SN-Net trains its anchors together with the stitching layers between them so that every
member of the family works, then picks a member at run time ("switch the stitching position
instantly"). :class:`StitchedFamily` holds each anchor once and every member's stitching
layer; :meth:`StitchedFamily.forward` runs the active member, :meth:`StitchedFamily.select`
switches by name or by budget. A member is a :class:`~space.Candidate`: a bare anchor or a
stitch between two of the family's anchors. Unlike :class:`~space.StitchedNet`, the anchors
here may be trained (:mod:`evaluators.family`); save and load a family with
:func:`space.save_family` / :func:`space.load_family`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from space.anchor import Anchor
from space.config import Candidate
from space.stitched import adapt_images, stitch_cuts
from space.stitching import StitchingLayer

#: Budget keywords of :meth:`StitchedFamily.select` and the member metric each limits.
SELECT_LIMITS = {"max_macs": "macs", "max_params": "params", "max_latency_ms": "latency_ms"}


class StitchedFamily(nn.Module):
    """Anchors and the stitches between them in one module; one member runs at a time.

    Args:
        anchors: The family's anchors by name (each held once, shared by every member).
        members: The members by name: bare anchors and stitches of ``anchors``
            (``Candidate.label`` is the usual name). Resolutions are not supported.
        stitches: A stitching layer for every stitch member, by member name.
        metrics: Optional measurements per member name (``accuracy``, ``macs``, ``params``,
            ``latency_ms``, ...) that :meth:`select` chooses by.
        active: The member ``forward`` runs first (default: the first one).

    Raises:
        ValueError: No members, a member of another anchor, a member at a resolution, a
            stitch without its layer, or a layer whose cuts differ from its member's.
    """

    def __init__(
        self,
        anchors: Mapping[str, Anchor],
        members: Mapping[str, Candidate],
        stitches: Mapping[str, StitchingLayer],
        *,
        metrics: Mapping[str, Mapping[str, Any]] | None = None,
        active: str | None = None,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("StitchedFamily needs at least one member, got none")
        self.anchors = dict(anchors)
        #: Anchor name -> the key of its model in :attr:`models` (names may hold dots).
        self.anchor_keys = {name: f"a{i}" for i, name in enumerate(self.anchors)}
        self.models = nn.ModuleDict({self.anchor_keys[n]: a.model for n, a in anchors.items()})
        self.members = dict(members)
        #: Member name -> the key of its stitching layer in :attr:`stitches`.
        self.stitch_keys: dict[str, str] = {}
        layers: dict[str, StitchingLayer] = {}
        for i, (name, c) in enumerate(self.members.items()):
            self._check_member(name, c)
            if c.is_anchor:
                continue
            if name not in stitches:
                raise ValueError(f"member {name!r} is a stitch but has no stitching layer")
            layer = stitches[name]
            self._check_layer(name, c, layer)
            self.stitch_keys[name] = f"s{i}"
            layers[f"s{i}"] = layer
        self.stitches = nn.ModuleDict(layers)
        self.metrics: dict[str, dict[str, Any]] = {
            name: dict((metrics or {}).get(name, {})) for name in self.members
        }
        self.active = next(iter(self.members))
        if active is not None:
            self.switch(active)

    def _check_member(self, name: str, c: Candidate) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"member name {name!r} must be a non-empty string")
        if c.resolution is not None:
            raise ValueError(
                f"member {name!r} runs at {c.resolution} px; a family runs every member at its "
                "front anchor's native size"
            )
        missing = [a for a in (c.front, c.back) if a not in self.anchors]
        if missing:
            raise ValueError(
                f"member {name!r} uses anchor {missing[0]!r}, which is not one of the "
                f"family's anchors {sorted(self.anchors)}"
            )

    def _check_layer(self, name: str, c: Candidate, layer: StitchingLayer) -> None:
        front, back = self.anchors[c.front], self.anchors[c.back]
        config = c.config
        assert not isinstance(config, str)
        config.validate(front, back)
        src, dst = stitch_cuts(front, back, config)
        if (layer.src, layer.dst) != (src, dst):
            raise ValueError(
                f"member {name!r}: its stitching layer maps {layer.src} -> {layer.dst}, but "
                f"the cut needs {src} -> {dst}"
            )

    # ------------------------------------------------------------------ members
    @property
    def names(self) -> list[str]:
        """The members' names, in order."""
        return list(self.members)

    def switch(self, name: str) -> StitchedFamily:
        """Makes ``name`` the member :meth:`forward` runs.

        Raises:
            KeyError: No member of that name.
        """
        if name not in self.members:
            raise KeyError(f"no member {name!r}; the members are {self.names}")
        self.active = name
        return self

    def select(
        self,
        name: str | None = None,
        *,
        max_macs: float | None = None,
        max_params: float | None = None,
        max_latency_ms: float | None = None,
        by: str = "accuracy",
    ) -> str:
        """Switches to a member by name, or to the best member within a budget.

        Args:
            name: A member's name (then no budget may be given).
            max_macs: Most MACs per image.
            max_params: Most parameters.
            max_latency_ms: Longest latency in milliseconds (as recorded per member).
            by: The recorded metric to maximise among the members that fit.

        Returns:
            The chosen member's name (now active).

        Raises:
            ValueError: Both a name and a budget, no metric ``by`` recorded, or no member
                within the budget.
        """
        limits = {"max_macs": max_macs, "max_params": max_params, "max_latency_ms": max_latency_ms}
        given = {k: v for k, v in limits.items() if v is not None}
        if name is not None:
            if given:
                raise ValueError("select takes a member name or a budget, not both")
            self.switch(name)
            return name
        fits = [n for n in self.members if self._fits(n, given)]
        scored = [n for n in fits if _finite(self.metrics[n].get(by))]
        if not scored:
            raise ValueError(
                f"no member of the family fits {given or 'no budget'} with a recorded {by!r}; "
                f"members: {self.describe()}"
            )
        best = max(scored, key=lambda n: (float(self.metrics[n][by]), -self.names.index(n)))
        self.switch(best)
        return best

    def _fits(self, name: str, limits: Mapping[str, float]) -> bool:
        for key, limit in limits.items():
            value = self.metrics[name].get(SELECT_LIMITS[key])
            if not _finite(value) or float(value) > float(limit):
                return False
        return True

    def describe(self) -> str:
        """One line per member: name and its recorded accuracy, MACs and parameters."""
        parts = []
        for n in self.members:
            m = self.metrics[n]
            parts.append(
                f"{n} (acc {m.get('accuracy')}, macs {m.get('macs')}, params {m.get('params')})"
            )
        return "; ".join(parts)

    # ------------------------------------------------------------------ running
    def stitch_of(self, name: str) -> StitchingLayer | None:
        """A member's stitching layer (None for a bare anchor)."""
        key = self.stitch_keys.get(name)
        return None if key is None else self.stitches[key]  # type: ignore[return-value]

    def anchor_models(self) -> Iterator[tuple[str, nn.Module]]:
        """``(anchor name, model)`` of every anchor, once each."""
        for name, anchor in self.anchors.items():
            yield name, anchor.model

    def input_size(self, name: str | None = None) -> tuple[int, int, int]:
        """The ``(C, H, W)`` a member takes: its front anchor's (default: the active one)."""
        return tuple(self.anchors[self.members[name or self.active].front].input_size)

    def forward(self, x: torch.Tensor, member: str | None = None) -> torch.Tensor:
        """Logits of ``member`` (default: the active one) for images ``x``."""
        name = self.active if member is None else member
        c = self.members[name]
        front = self.anchors[c.front]
        if tuple(x.shape[1:]) != tuple(front.input_size):
            x = adapt_images(x, front.input_size)
        if c.is_anchor:
            return front.model(x)
        h = front.forward_front(x, c.front_block)
        h = self.stitch_of(name)(h)
        return self.anchors[c.back].forward_back(h, c.back_block)

    def member_module(self, name: str) -> nn.Module:
        """A module that runs member ``name`` (sharing this family's weights)."""
        return _Member(self, name)

    def members_of(self, anchor: str) -> list[str]:
        """The members that run any block of ``anchor``."""
        return [n for n, c in self.members.items() if anchor in (c.front, c.back)]


class _Member(nn.Module):
    """One member of a family as a plain ``images -> logits`` module."""

    def __init__(self, family: StitchedFamily, name: str) -> None:
        super().__init__()
        self.family = family
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.family(x, self.name)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def member_name(c: Candidate) -> str:
    """A member's name: an anchor's name, or a stitch's label (``a[:5] -> b[3:]``)."""
    return c.front if c.is_anchor else c.label


def member_names(candidates: Sequence[Candidate]) -> dict[str, Candidate]:
    """Members by name (:func:`member_name`), in order.

    Raises:
        ValueError: A candidate listed twice.
    """
    out: dict[str, Candidate] = {}
    for c in candidates:
        name = member_name(c)
        if name in out:
            raise ValueError(f"member {name!r} is listed twice")
        out[name] = c
    return out
