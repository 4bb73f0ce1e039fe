"""A folder of unlabelled images: splits for label-free studies.

``root`` holds image files, flat or in nested folders of any depth; their names and folders
mean nothing (no classes). Files are taken in sorted order of their path relative to
``root``; a seeded permutation then gives validation, test, calibration and training images
(validation first, then test; calibration is the start of the remainder, which is the
training split). Files whose suffix is not an image suffix (:data:`IMAGE_SUFFIXES`) and
hidden files are ignored; an image file that cannot be read is an error naming the file (it
is not skipped: the splits would silently change with it). Images go through the anchor's
timm evaluation transform, as for ImageFolder data.

The images carry no labels: every label is :data:`UNLABELLED` until a teacher's top-1
predictions are attached (:meth:`ImageFiles.with_labels`, done by
:func:`evaluators.label_by_teacher`). The recipe's ``teacher_labels`` attaches recorded
predictions on a rebuild, so that ``--check`` measures agreement without the teacher.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from evaluators.data.loaders import DataSplits
from evaluators.data.recipe import DataError
from evaluators.data.splits import (
    PILLoader,
    data_config,
    dataset_splits,
    eval_transform,
    is_split_size,
    seeded_split,
    split_identity,
)
from space import Anchor

#: File suffixes read as images (case-insensitive); other files are ignored.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
#: The label of an image no teacher has labelled.
UNLABELLED = -1


class ImageFiles:
    """A map-style dataset of image files yielding ``(image tensor, label)``.

    Args:
        root: The folder the paths are relative to.
        paths: Image paths relative to ``root``, in dataset order.
        transform: Applied to each PIL image.
        channels: 1 (read as greyscale) or 3 (RGB).
        labels: One label per path (default: all :data:`UNLABELLED`).
    """

    def __init__(
        self,
        root: str | Path,
        paths: Sequence[str],
        transform: Any,
        channels: int,
        labels: Sequence[int] | None = None,
    ) -> None:
        self.root = str(root)
        self.paths = list(paths)
        self.transform = transform
        self.channels = int(channels)
        self.loader = PILLoader("L" if self.channels == 1 else "RGB")
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} labels for {len(self.paths)} images")
        self.labels = [UNLABELLED] * len(self.paths) if labels is None else [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path = os.path.join(self.root, self.paths[i])
        try:
            image = self.loader(path)
        except (OSError, ValueError) as e:
            raise DataError(
                f"image file {path!r} cannot be read ({e}); remove or replace it"
            ) from None
        return self.transform(image), self.labels[i]

    def with_labels(self, labels: Mapping[int, int]) -> ImageFiles:
        """A copy with the labels of the given dataset indices set (others unchanged)."""
        merged = list(self.labels)
        for i, label in labels.items():
            merged[int(i)] = int(label)
        return ImageFiles(self.root, self.paths, self.transform, self.channels, merged)


def find_images(root: str | Path) -> list[str]:
    """The image files under ``root`` (recursively), as sorted paths relative to it.

    Raises:
        DataError: ``root`` is not a folder, or holds no image files.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"image folder {str(root)!r} does not exist; set data.root to a folder of images"
        )
    found = []
    ignored = 0
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(os.path.relpath(os.path.join(folder, name), root))
            else:
                ignored += 1
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(
            f"image folder {str(root)!r} has no images ({ignored} other files); put image "
            f"files ({suffixes}) in it or in its sub-folders"
        )
    return sorted(found)


def _check_readable(root: Path, paths: Sequence[str]) -> None:
    """Opens every image's header and checks its data (PIL ``verify``), naming a bad file."""
    from PIL import Image, UnidentifiedImageError

    for rel in paths:
        path = root / rel
        try:
            with open(path, "rb") as f, Image.open(f) as img:
                img.verify()
        except (OSError, ValueError, UnidentifiedImageError, SyntaxError) as e:
            raise DataError(
                f"image file {str(path)!r} cannot be read ({type(e).__name__}: {e}); remove "
                "or replace it"
            ) from None


def _transform_config(source: Anchor | Sequence[Anchor] | Mapping[str, Any]) -> dict[str, Any]:
    """The timm data config images are transformed with, in its JSON form (lists, no tuples)."""
    if isinstance(source, Mapping):
        cfg = dict(source)
    else:
        cfg, _ = data_config(source)
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    missing = [k for k in ("input_size", "mean", "std") if cfg.get(k) is None]
    if missing:
        raise DataError(f"the images' transform config lacks {missing}; rebuild the export")
    return json.loads(json.dumps({k: cfg.get(k) for k in keys}))


def image_splits(
    root: str | Path,
    anchor: Anchor | Sequence[Anchor] | Mapping[str, Any],
    *,
    validation: int | None = None,
    test: int | None = None,
    calibration: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    teacher: str | None = None,
    teacher_labels: Mapping[str, Sequence[int]] | None = None,
    num_classes: int | None = None,
) -> DataSplits:
    """Validation, test, calibration and training splits of a folder of unlabelled images.

    Args:
        root: The folder (see the module docstring for what is read).
        anchor: The anchor (or anchors: the first one's) whose timm evaluation transform and
            input size the images take; the splits' class count is its head's. Or the
            transform's data config as a recipe records it (then ``num_classes`` says the
            class count).
        validation: Validation images (default: 10% of the images, at least 1, at most 2,000).
        test: Test images (default: as many as validation, at most what is left after it).
        calibration: Calibration images (default: up to 512 of the remainder).
        seed: Permutation seed.
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes.
        teacher: The anchor whose predictions ``teacher_labels`` are (recorded in the recipe).
        teacher_labels: ``{"validation": [...], "test": [...]}``: the teacher's top-1 class of
            each image of those splits, in split order (as recorded in a recipe).
        num_classes: The class count (default: the anchor's head).

    Returns:
        The splits; labels are :data:`UNLABELLED` except where ``teacher_labels`` sets them.

    Raises:
        DataError: The folder is missing or has no images, an image file cannot be read, the
            sizes do not fit the image count, or ``teacher_labels`` do not fit the splits.
    """
    root = Path(root).expanduser()
    paths = find_images(root)
    _check_readable(root, paths)
    validation, test, calibration = _sizes(root, len(paths), validation, test, calibration)
    cfg = _transform_config(anchor)
    channels = int(cfg["input_size"][0])
    val_idx, test_idx, rest = seeded_split(len(paths), seed, validation, test)
    dataset = ImageFiles(root, paths, eval_transform(cfg), channels)
    labels: dict[str, tuple[int, ...]] | None = None
    if teacher_labels is not None:
        labels = _recorded_labels(root, teacher_labels, val_idx, test_idx)
        dataset = dataset.with_labels(
            dict(zip(val_idx + test_idx, labels["validation"] + labels["test"], strict=True))
        )
    identity = split_identity(
        "images",
        (f"{rel}\n" for rel in paths),
        json.dumps(cfg, sort_keys=True),
        seed=seed,
        calibration=calibration,
        validation=validation,
        test=test,
        extra="" if labels is None else f"teacher={teacher}|labels={labels}",
    )
    input_size = tuple(int(v) for v in cfg["input_size"])
    if num_classes is None:
        if isinstance(anchor, Mapping):
            raise ValueError("image_splits needs num_classes when given a data config")
        first = anchor if isinstance(anchor, Anchor) else anchor[0]
        num_classes = first.num_classes
    return dataset_splits(
        "images",
        root,
        train_set=dataset,
        test_set=dataset,
        validation=val_idx,
        test=test_idx,
        remainder=rest,
        calibration=calibration,
        seed=seed,
        identity=identity,
        num_classes=num_classes,
        input_size=input_size,
        batch_size=batch_size,
        num_workers=num_workers,
        recipe={
            "teacher": teacher if labels is not None else None,
            "teacher_labels": labels,
            "transform": cfg,
        },
    )


def _sizes(
    root: Path, n: int, validation: int | None, test: int | None, calibration: int | None
) -> tuple[int, int, int]:
    """``(validation, test, calibration)`` sizes for ``n`` images, defaults filled in, checked.

    Raises:
        DataError: A size that is not an integer or leaves no image for the splits after it.
    """
    if validation is None:
        validation = max(1, min(2000, n // 10))
    if test is None:
        test = max(1, min(validation, n - validation - 1))
    for what, value, top in (
        ("validation", validation, n - 2),
        ("test", test, n - validation - 1),
    ):
        if not is_split_size(value, top):
            raise DataError(
                f"image folder {str(root)!r} has {n} images: data.{what} must be an integer in "
                f"1..{max(top, 0)} (validation and test leave at least one image for "
                f"calibration and training), got {value!r}; lower it or add images"
            )
    left = n - validation - test
    if calibration is None:
        calibration = min(512, left)
    if isinstance(calibration, bool) or not isinstance(calibration, int):
        raise DataError(f"data.calibration must be an integer, got {calibration!r}")
    if not 1 <= calibration <= left:
        raise DataError(
            f"image folder {str(root)!r} has {n} images, {left} after validation ({validation}) "
            f"and test ({test}): calibration (the largest of data.calibration, cka.images and "
            f"pruning.images) must be in 1..{left}, got {calibration}; lower them or add images"
        )
    return validation, test, calibration


def _recorded_labels(
    root: Path,
    teacher_labels: Mapping[str, Sequence[int]],
    val_idx: Sequence[int],
    test_idx: Sequence[int],
) -> dict[str, tuple[int, ...]]:
    """A recipe's recorded teacher labels of the validation and test splits, checked.

    Raises:
        DataError: A split's labels are missing or not one per image of the split.
    """
    labels = {}
    for split, idx in (("validation", val_idx), ("test", test_idx)):
        given = teacher_labels.get(split)
        if given is None or len(given) != len(idx):
            got = "none" if given is None else len(given)
            raise DataError(
                f"the recorded teacher labels of the {split} split are {got}, the image "
                f"folder {str(root)!r} gives {len(idx)} {split} images; is it the folder "
                "the search ran on?"
            )
        labels[split] = tuple(int(v) for v in given)
    return labels
