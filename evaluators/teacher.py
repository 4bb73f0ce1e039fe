"""Label-free data: a teacher anchor's top-1 predictions as the labels of unlabelled images.

A label-free study has images but no labels. It measures *agreement*: the share of images
whose top-1 class is the teacher's top-1 class. :func:`label_by_teacher` runs the teacher
once over the validation and test images and attaches its predictions as their labels, so
:func:`evaluators.accuracy` (and everything built on it) then measures agreement with the
teacher, and the teacher's own agreement is 100%. The predictions are recorded in the
splits' recipe (``teacher_labels``), so a rebuild measures agreement without the teacher.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from evaluators.data import DataError, DatasetLoader, DataSplits, make_splits
from evaluators.fit import fit_input
from evaluators.macs import ANY_OP, count_macs
from space import Anchor


def largest_anchor(anchors: Mapping[str, Anchor]) -> str:
    """The anchor with the most MACs per image at its input size (the default teacher).

    Ties go to the anchor listed first.
    """
    # Only a ranking: operators fvcore cannot count are refused when candidates are measured.
    macs = {
        name: count_macs(a.model, tuple(a.input_size), allow_unsupported=[ANY_OP])
        for name, a in anchors.items()
    }
    return max(macs, key=lambda name: macs[name])


@torch.inference_mode()
def top1_predictions(
    model: torch.nn.Module, loader: DatasetLoader, input_size: tuple[int, int, int] | None
) -> list[int]:
    """The top-1 class of every image of ``loader``, as :func:`evaluators.accuracy` ranks them.

    Classes are ranked the way ``accuracy`` ranks them (``topk`` above 5 classes, ``argmax``
    otherwise), so a model agrees with its own predictions on every image.
    """
    was_training = model.training
    model.eval()
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    out: list[int] = []
    try:
        for x, _ in loader:
            logits = model(fit_input(x, input_size).to(device))
            if not torch.isfinite(logits).all():
                raise ValueError("the teacher gives non-finite logits; check its weights")
            top = logits.topk(5, dim=1).indices[:, 0] if logits.shape[1] > 5 else logits.argmax(1)
            out.extend(int(v) for v in top)
    finally:
        model.train(was_training)
    return out


def label_by_teacher(
    splits: DataSplits, teacher: Anchor, *, name: str, anchor: Anchor
) -> DataSplits:
    """Splits of unlabelled images, their validation and test images labelled by a teacher.

    Args:
        splits: Splits of ``images`` data (:func:`evaluators.image_splits`).
        teacher: The teacher anchor.
        name: Its name in the study (recorded in the recipe).
        anchor: The anchor whose transform ``splits`` were made with (rebuilt with it).

    Returns:
        The same images, rebuilt from a recipe that records the teacher's predictions (so
        the validation and test labels are the teacher's top-1 classes, and the identity
        names them).

    Raises:
        DataError: ``splits`` are not unlabelled images, or the teacher's head differs from
            the splits' class count.
    """
    recipe = splits.recipe
    if recipe is None or recipe.dataset != "images":
        raise DataError(f"only images data is labelled by a teacher, not {splits.name!r}")
    if teacher.num_classes != splits.num_classes:
        raise DataError(
            f"teacher {name!r} has {teacher.num_classes} classes but the other anchors have "
            f"{splits.num_classes}; every anchor needs the teacher's classes"
        )
    labels = {
        split: tuple(top1_predictions(teacher.model, getattr(splits, split), teacher.input_size))
        for split in ("validation", "test")
    }
    labelled = dataclasses.replace(recipe, teacher=name, teacher_labels=labels)
    return make_splits(labelled, anchor=anchor)
