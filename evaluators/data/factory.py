"""The one dataset factory: :func:`make_splits` builds the splits a :class:`DataRecipe` says."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from evaluators.data.fashion_mnist import fashion_mnist_splits
from evaluators.data.imagefolder import imagefolder_splits
from evaluators.data.images import image_splits
from evaluators.data.recipe import DataError, DataRecipe
from evaluators.data.synthetic import synthetic_splits

if TYPE_CHECKING:
    from evaluators.data.loaders import DataSplits
    from space import Anchor


def _given(recipe: DataRecipe, *names: str) -> dict[str, Any]:
    """The recipe fields among ``names`` that are set (None leaves the builder's default)."""
    return {n: getattr(recipe, n) for n in names if getattr(recipe, n) is not None}


def _transform_anchor(recipe: DataRecipe, anchor: Anchor | None, what: str) -> Anchor:
    """The anchor whose transform image-folder data uses, checked against the recipe's size.

    Raises:
        ValueError: No anchor was given.
        DataError: The recipe was made at another input size than the anchor's.
    """
    if anchor is None:
        raise ValueError(f"make_splits needs the anchor whose transform {what} uses")
    if recipe.input_size is not None and tuple(anchor.input_size) != recipe.input_size:
        raise DataError(
            f"{what} {recipe.root!r} was made at input size {recipe.input_size} but "
            f"anchor {anchor.name!r} takes {tuple(anchor.input_size)}; rebuild it with the "
            "anchor it was made for"
        )
    return anchor


def make_splits(recipe: DataRecipe, anchor: Anchor | None = None) -> DataSplits:
    """Builds the calibration, validation and test splits a recipe describes.

    Args:
        recipe: The dataset, its location and the split sizes.
        anchor: The anchor whose timm evaluation transform and head ImageFolder data go
            through (required for ``imagefolder`` and ``images``; not used otherwise).

    Returns:
        The splits; ``splits.recipe`` is ``recipe`` with every size filled in and an absolute
        ``root``, so ``make_splits(splits.recipe, anchor)`` rebuilds the same data.

    Raises:
        DataError: The data cannot be found or read, the sizes do not fit it, its class count
            differs from the anchor's head, or ``input_size`` is not the anchor's.
        ValueError: ``imagefolder`` or ``images`` without an anchor.
    """
    if recipe.dataset == "fashion-mnist":
        sizes = _given(recipe, "calibration", "validation", "test", "batch_size", "input_size")
        return fashion_mnist_splits(recipe.root, seed=recipe.seed, **sizes)
    if recipe.dataset == "synthetic":
        kw = _given(recipe, "num_classes", "input_size", "calibration", "validation")
        kw |= _given(recipe, "batch_size")
        test = recipe.test if recipe.test is not None else recipe.validation
        if test is not None:
            kw["test"] = test
        return synthetic_splits(seed=recipe.seed, **kw)
    if recipe.dataset == "images":
        return _images(recipe, anchor)
    if recipe.root is None:
        raise DataError(
            "ImageFolder data needs a root directory; set the recipe's root to the folder "
            "holding train/ and val/"
        )
    return imagefolder_splits(
        recipe.root,
        _transform_anchor(recipe, anchor, "ImageFolder data"),
        seed=recipe.seed,
        num_classes=recipe.num_classes,
        **_given(recipe, "calibration", "validation", "test", "batch_size"),
    )


def _images(recipe: DataRecipe, anchor: Anchor | None) -> DataSplits:
    """A folder of unlabelled images (with the recipe's recorded teacher labels, if any).

    A recipe that records its transform rebuilds the same images whichever anchor is given.
    """
    if recipe.root is None:
        raise DataError("images data needs a root directory; set the recipe's root (data.root)")
    source: Any = recipe.transform
    if source is None:
        source = _transform_anchor(recipe, anchor, "images data")
    elif recipe.num_classes is None:
        raise DataError("images data recorded with its transform needs num_classes")
    return image_splits(
        recipe.root,
        source,
        seed=recipe.seed,
        teacher=recipe.teacher,
        teacher_labels=recipe.teacher_labels,
        num_classes=recipe.num_classes,
        **_given(recipe, "calibration", "validation", "test", "batch_size"),
    )
