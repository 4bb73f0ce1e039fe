"""A study's anchors, loaded (and checked at its resolutions and cuts) before anything runs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from search.core import SearchSpace, build_space
from search.inputs.study import Study
from space import Anchor, InputError, load_anchor


def load_anchors(
    study: Study, study_path: Path
) -> tuple[dict[str, Anchor], dict[str, dict[str, Any]]]:
    """Loads the study's anchors, in the study's order.

    Args:
        study: The study.
        study_path: Its file (checkpoint paths are relative to its folder).

    Returns:
        The anchors by id (:attr:`space.Anchor.name`), and the ``load_anchor`` keyword
        arguments of each, its timm (or zoo) ``name`` among them.

    Raises:
        InputError: An anchor cannot be loaded (the message names ``anchors[i]``), or cannot
            run at one of the study's ``resolutions`` (the message names ``resolutions[i]``).
    """
    anchors: dict[str, Anchor] = {}
    kwargs: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(study.anchors):
        kw = {"name": spec.name, **spec.load_kwargs(study_path.parent)}
        try:
            anchors[spec.anchor_id] = load_anchor(**kw)
        except InputError as e:
            raise InputError(f"{study_path}: field 'anchors[{i}]' ({spec.name}): {e}") from None
        kwargs[spec.anchor_id] = kw
    check_resolutions(study, anchors, study_path)
    study_space(study, anchors, study_path)
    return anchors, kwargs


def study_space(study: Study, anchors: Mapping[str, Anchor], study_path: Path) -> SearchSpace:
    """The study's search space over its loaded anchors (``resolutions``, ``cuts``).

    Raises:
        InputError: ``cuts: stages`` with an anchor that has no stages, or two anchors with
            different numbers of stages; one line naming the field ``cuts`` and the fix.
    """
    try:
        return build_space(anchors, study.resolutions, study.cuts)
    except ValueError as e:
        raise InputError(
            f"{study_path}: field 'cuts': {e}; use cuts: all, or anchors whose stages match "
            "(e.g. two EfficientNets)"
        ) from None


def check_resolutions(study: Study, anchors: dict[str, Anchor], study_path: Path) -> None:
    """Checks that every anchor runs at every one of the study's ``resolutions``.

    Each anchor's view at each size is built once here (:meth:`space.Anchor.at_resolution`:
    a ViT's copy with its position embedding interpolated) and reused by the search.

    Raises:
        InputError: One line naming ``resolutions[i]``, the anchor and why.
    """
    for i, r in enumerate(study.resolutions or ()):
        for anchor in anchors.values():
            try:
                anchor.at_resolution(r)
            except ValueError as e:
                raise InputError(
                    f"{study_path}: field 'resolutions[{i}]': {e}; list sizes every anchor "
                    "runs at (see the README's table of families)"
                ) from None
