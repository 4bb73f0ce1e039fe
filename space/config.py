"""What one candidate is: a bare anchor, or a stitch configuration (two anchors, cut where).

:class:`Candidate` owns the candidate's JSON form (``{"kind": "anchor", "anchor": ...}`` or
``{"kind": "stitch", "front": ..., "back": ..., "front_block": k, "back_block": j}``), used by
trial records, Ray workers and export manifests alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from space.anchor import Anchor


@dataclass(frozen=True)
class StitchConfig:
    """One stitched network: front blocks, a stitching layer, back blocks and head.

    ``front`` runs its stem and blocks ``[0, front_block)``; ``back`` runs from
    ``back_block`` to its head.

    Attributes:
        front: Name of the front anchor (as given to :func:`space.load_anchor`).
        back: Name of the back anchor.
        front_block: ``k``: the front anchor's stem and blocks ``[0, k)`` run;
            ``0 <= k <= front.num_blocks``.
        back_block: ``j``: the back anchor runs blocks ``[j, n)`` and its head;
            ``0 <= j <= back.num_blocks``.
    """

    front: str
    back: str
    front_block: int
    back_block: int

    def __post_init__(self) -> None:
        for f in ("front", "back"):
            value = getattr(self, f)
            if not isinstance(value, str) or not value:
                raise ValueError(f"StitchConfig.{f} must be a non-empty anchor name, got {value!r}")
        for f in ("front_block", "back_block"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"StitchConfig.{f} must be an integer >= 0, got {value!r}")

    def validate(self, front: Anchor, back: Anchor) -> StitchConfig:
        """Checks the configuration against the two anchors.

        Args:
            front: The anchor named by :attr:`front`.
            back: The anchor named by :attr:`back`.

        Returns:
            ``self``, for chaining.

        Raises:
            ValueError: A name does not match, or a block index is out of range (the message
                names the valid range).
        """
        if front.name != self.front:
            raise ValueError(
                f"StitchConfig.front is {self.front!r} but the anchor is {front.name!r}"
            )
        if back.name != self.back:
            raise ValueError(f"StitchConfig.back is {self.back!r} but the anchor is {back.name!r}")
        if not 0 <= self.front_block <= front.num_blocks:
            raise ValueError(
                f"StitchConfig.front_block={self.front_block} is out of range for {front.name!r}: "
                f"valid range is 0..{front.num_blocks}"
            )
        if not 0 <= self.back_block <= back.num_blocks:
            raise ValueError(
                f"StitchConfig.back_block={self.back_block} is out of range for {back.name!r}: "
                f"valid range is 0..{back.num_blocks}"
            )
        return self

    @property
    def is_self_stitch(self) -> bool:
        """Whether an anchor is stitched to itself."""
        return self.front == self.back

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StitchConfig:
        """Builds a configuration from :meth:`to_dict` output.

        Raises:
            ValueError: Missing or unknown fields, or invalid values.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a stitch configuration must be a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        missing = sorted(names - d.keys())
        unknown = sorted(d.keys() - names)
        if missing or unknown:
            raise ValueError(
                f"bad stitch configuration {d!r}: missing fields {missing}, unknown fields "
                f"{unknown}; expected exactly {sorted(names)}"
            )
        return cls(**{k: d[k] for k in names})

    def to_json(self) -> str:
        """Returns the configuration as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> StitchConfig:
        """Parses :meth:`to_json` output."""
        return cls.from_dict(json.loads(s))

    def __str__(self) -> str:
        return f"{self.front}[:{self.front_block}] -> {self.back}[{self.back_block}:]"


#: The fields of each kind of candidate's JSON form.
CANDIDATE_FIELDS: dict[str, frozenset[str]] = {
    "anchor": frozenset({"kind", "anchor"}),
    "stitch": frozenset({"kind", "front", "back", "front_block", "back_block"}),
}

#: Fields either kind may have: ``resolution``, the input size in pixels the candidate runs
#: at (absent: the front anchor's native size, as before resolutions were searched).
CANDIDATE_OPTIONAL_FIELDS: frozenset[str] = frozenset({"resolution"})


def check_resolution(value: object, where: str = "resolution") -> int:
    """Validates an input resolution (square images of ``value`` pixels a side).

    Args:
        value: The value to check.
        where: The field's name, for the message.

    Returns:
        The resolution.

    Raises:
        ValueError: Not an integer, or not positive.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(
            f"{where} must be a positive integer number of pixels (e.g. 32), got {value!r}"
        )
    return value


@dataclass(frozen=True, order=True)
class Candidate:
    """One point of a search space: a bare anchor or a stitched network, at one resolution.

    Attributes:
        front: Front anchor name (the anchor itself when ``back == front``).
        back: Back anchor name.
        front_block: ``k`` (``None`` for a bare anchor).
        back_block: ``j`` (``None`` for a bare anchor).
        resolution: The input size in pixels (``H = W``) both anchors run at; ``None``: the
            front anchor's native input size. Part of the candidate's identity (:attr:`key`).
    """

    front: str
    back: str
    front_block: int | None = None
    back_block: int | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        if self.resolution is not None:
            check_resolution(self.resolution)

    @classmethod
    def anchor(cls, name: str, resolution: int | None = None) -> Candidate:
        """The bare anchor ``name`` (at ``resolution``, or its native size)."""
        return cls(name, name, resolution=resolution)

    def at(self, resolution: int | None) -> Candidate:
        """The same configuration at another resolution (``None``: native)."""
        return Candidate(self.front, self.back, self.front_block, self.back_block, resolution)

    @property
    def is_anchor(self) -> bool:
        """Whether this is a bare anchor."""
        return self.front_block is None

    @property
    def config(self) -> StitchConfig | str:
        """What the evaluators take: an anchor name, or a :class:`StitchConfig`."""
        if self.is_anchor:
            return self.front
        return StitchConfig(self.front, self.back, self.front_block, self.back_block)

    @property
    def key(self) -> str:
        """A stable string key (for de-duplication in the storage); includes the resolution."""
        at = "" if self.resolution is None else f"|{self.resolution}px"
        if self.is_anchor:
            return f"anchor|{self.front}{at}"
        return f"stitch|{self.front}|{self.front_block}|{self.back}|{self.back_block}{at}"

    @property
    def label(self) -> str:
        """Human-readable form."""
        at = "" if self.resolution is None else f" @{self.resolution}px"
        if self.is_anchor:
            return f"{self.front} (anchor){at}"
        return f"{self.front}[:{self.front_block}] -> {self.back}[{self.back_block}:]{at}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form (see the module docstring); ``resolution`` only when set."""
        at = {} if self.resolution is None else {"resolution": self.resolution}
        if self.is_anchor:
            return {"kind": "anchor", "anchor": self.front, **at}
        return {"kind": "stitch", **self.config.to_dict(), **at}

    @classmethod
    def from_dict(cls, d: Any) -> Candidate:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: Not a mapping, an unknown ``kind``, missing or unknown fields, or
                invalid values; the message names the field.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a candidate must be a JSON object, got {d!r}")
        kind = d.get("kind")
        if kind not in CANDIDATE_FIELDS:
            raise ValueError(f"field 'kind' must be 'anchor' or 'stitch', got {kind!r}")
        missing = sorted(CANDIDATE_FIELDS[kind] - d.keys())
        unknown = sorted(d.keys() - CANDIDATE_FIELDS[kind] - CANDIDATE_OPTIONAL_FIELDS)
        if missing or unknown:
            raise ValueError(
                f"bad {kind} candidate {d!r}: missing fields {missing}, unknown fields "
                f"{unknown}; expected exactly {sorted(CANDIDATE_FIELDS[kind])} (optionally "
                f"{sorted(CANDIDATE_OPTIONAL_FIELDS)})"
            )
        resolution = d.get("resolution")
        if resolution is not None:
            check_resolution(resolution, "field 'resolution'")
        if kind == "anchor":
            name = d["anchor"]
            if not isinstance(name, str) or not name:
                raise ValueError(f"field 'anchor' must be a non-empty anchor name, got {name!r}")
            return cls.anchor(name, resolution)
        config = StitchConfig.from_dict(
            {k: v for k, v in d.items() if k not in ("kind", "resolution")}
        )
        return cls(config.front, config.back, config.front_block, config.back_block, resolution)

    def to_json(self) -> str:
        """The JSON form as a string."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Candidate:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))
