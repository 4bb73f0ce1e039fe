"""ImageFolder trees: splits seen through an anchor's timm evaluation transform."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
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


def _image_folder(directory: Path, transform: Any, channels: int) -> Any:
    from torchvision.datasets import ImageFolder

    if not directory.is_dir():
        raise DataError(f"ImageFolder directory {str(directory)!r} does not exist")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    try:
        ds = ImageFolder(
            str(directory), transform=transform, loader=PILLoader("L" if channels == 1 else "RGB")
        )
    except FileNotFoundError as e:
        raise DataError(
            f"ImageFolder {str(directory)!r} has no images: found {len(classes)} class "
            f"folders and 0 images ({e})"
        ) from None
    if len(ds) == 0:
        raise DataError(
            f"ImageFolder {str(directory)!r} has no images: found {len(ds.classes)} class "
            "folders and 0 images"
        )
    return ds


def imagefolder_splits(
    root: str | Path,
    anchor_or_data_config: Anchor | Sequence[Anchor] | Mapping[str, Any],
    *,
    calibration: int | None = None,
    validation: int | None = None,
    test: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    num_classes: int | None = None,
) -> DataSplits:
    """Calibration, validation and test loaders over an ImageFolder tree.

    ``root`` holds ``train/`` and ``val/`` (or ``test/``), each with one sub-folder of images
    per class (torchvision's ``ImageFolder``). Validation is the first ``validation``
    images of a seeded permutation of ``train/``, calibration the next ``calibration``
    images; ``val/`` (or ``test/``) is the test split. All images go through the anchors'
    timm evaluation transform (``timm.data.resolve_data_config`` + ``create_transform``, at
    the anchor's ``input_size``).

    Args:
        root: The tree's root directory.
        anchor_or_data_config: An anchor (its data config and head size are used), a list of
            anchors (the first one's data config; every head must match), or a timm data
            config mapping (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``).
        calibration: Calibration images (default: up to 512 of the remainder).
        validation: Validation images (default: 10% of ``train/``, at most 5,000).
        test: Test images (default: all of ``val/``).
        seed: Permutation seed.
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes.
        num_classes: Expected class count when a data config (not anchors) is given.

    Returns:
        The splits; ``train`` holds the remainder after validation; ``recipe`` is None when
        a data config mapping (not anchors) gave the transform.

    Raises:
        DataError: Missing folders, an ImageFolder with no images, class counts that differ
            from the anchors' heads or between ``train/`` and ``val/``, or split sizes that do
            not fit (each message names the directory and the counts).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageFolder root {str(root)!r} does not exist")
    cfg, anchors = data_config(anchor_or_data_config)
    train_dir, test_dir = _split_dirs(root)
    transform = eval_transform(cfg)
    train_ds, test_ds = (
        _image_folder(d, transform, int(cfg["input_size"][0])) for d in (train_dir, test_dir)
    )
    n_cls = len(train_ds.classes)
    _check_classes(train_ds, test_ds, (train_dir, test_dir), anchors, num_classes)
    validation, calibration, n_test = _sizes(
        (train_dir, len(train_ds)), (test_dir, len(test_ds)), calibration, validation, test
    )
    val_idx, rest = seeded_split(len(train_ds), seed, validation)
    identity = split_identity(
        "imagefolder",
        _sample_lines(root, (train_ds, test_ds)),
        str(sorted((k, str(v)) for k, v in cfg.items())),
        seed=seed,
        calibration=calibration,
        validation=validation,
        test=n_test,
    )
    return dataset_splits(
        "imagefolder",
        root,
        train_set=train_ds,
        test_set=test_ds,
        validation=val_idx,
        test=range(n_test),
        remainder=rest,
        calibration=calibration,
        seed=seed,
        identity=identity,
        num_classes=n_cls,
        input_size=tuple(int(v) for v in cfg["input_size"]),
        batch_size=batch_size,
        num_workers=num_workers,
        # Anchors give the transform back on a rebuild; a bare data config mapping does not.
        recipe={} if anchors else None,
    )


def _sample_lines(root: Path, datasets: Sequence[Any]) -> Iterator[str]:
    """``<path relative to root>:<label>`` of every image of the datasets, one a line."""
    for ds in datasets:
        for path, label in ds.samples:
            yield f"{os.path.relpath(path, root)}:{label}\n"


def _split_dirs(root: Path) -> tuple[Path, Path]:
    """``root/train`` and ``root/val`` (or ``root/test``).

    Raises:
        DataError: Either is missing (the message lists the sub-folders found).
    """
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"ImageFolder root {str(root)!r} must hold train/ and val/ (or test/) "
            f"sub-folders; found {sorted(p.name for p in root.iterdir() if p.is_dir())}"
        )
    return train_dir, test_dir


def _check_classes(
    train_ds: Any,
    test_ds: Any,
    dirs: tuple[Path, Path],
    anchors: Sequence[Anchor],
    num_classes: int | None,
) -> None:
    """Raises :class:`DataError` unless both trees and every head have the same classes."""
    train_dir, test_dir = dirs
    n_cls = len(train_ds.classes)
    if train_ds.classes != test_ds.classes:
        raise DataError(
            f"ImageFolder {str(train_dir)!r} has {n_cls} classes but {str(test_dir)!r} has "
            f"{len(test_ds.classes)}, or their names differ; both need the same class folders"
        )
    expected = [(a.name, a.num_classes) for a in anchors]
    if num_classes is not None:
        expected.append(("num_classes", int(num_classes)))
    wrong = [(name, n) for name, n in expected if n != n_cls]
    if wrong:
        heads = ", ".join(f"{name}: {n}" for name, n in wrong)
        raise DataError(
            f"ImageFolder {str(train_dir)!r} has {n_cls} classes but the anchors' heads have "
            f"{heads}; pass num_classes={n_cls} when loading the anchors or use a dataset "
            "with their classes"
        )


def _sizes(
    train: tuple[Path, int],
    test_tree: tuple[Path, int],
    calibration: int | None,
    validation: int | None,
    test: int | None,
) -> tuple[int, int, int]:
    """``(validation, calibration, test)`` sizes, the defaults filled in, checked.

    Args:
        train: The ``train/`` folder and its image count.
        test_tree: The ``val/`` (or ``test/``) folder and its image count.
        calibration: Asked calibration size (default: up to 512 of the remainder).
        validation: Asked validation size (default: 10% of ``train/``, at most 5,000).
        test: Asked test size (default: all of ``val/``).

    Raises:
        DataError: A size that is not an integer or does not fit its folder.
    """
    (train_dir, n_train), (test_dir, n_test_images) = train, test_tree
    if validation is None:
        validation = max(1, min(5000, n_train // 10))
    if calibration is None:
        calibration = max(0, min(512, n_train - validation))
    n_test = n_test_images if test is None else test
    for what, n, top, where, available in (
        ("validation", validation, n_train - 1, train_dir, n_train),
        ("calibration", calibration, n_train - validation, train_dir, n_train),
        ("test", n_test, n_test_images, test_dir, n_test_images),
    ):
        if not is_split_size(n, top):
            raise DataError(
                f"ImageFolder {str(where)!r} has {available} images: {what} size must be an "
                f"integer in 1..{max(top, 0)}, got {n!r}"
            )
    return validation, calibration, n_test
