"""ImageFolder trees: splits seen through an anchor's timm evaluation transform."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evaluators.data.loaders import DatasetLoader, DataSplits
from evaluators.data.recipe import DataError, DataRecipe
from space import Anchor


class _PILLoader:
    """Opens an image file as ``"L"`` or ``"RGB"`` (a class, so that splits pickle for Ray)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f, Image.open(f) as img:
            return img.convert(self.mode)


def _image_folder(directory: Path, transform: Any, channels: int) -> Any:
    from torchvision.datasets import ImageFolder

    if not directory.is_dir():
        raise DataError(f"ImageFolder directory {str(directory)!r} does not exist")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    try:
        ds = ImageFolder(
            str(directory), transform=transform, loader=_PILLoader("L" if channels == 1 else "RGB")
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


def _data_config(
    source: Anchor | Sequence[Anchor] | Mapping[str, Any],
) -> tuple[dict[str, Any], list[Anchor]]:
    from timm.data import resolve_data_config

    if isinstance(source, Mapping):
        cfg = resolve_data_config(args=dict(source))
        return cfg, []
    anchors = [source] if isinstance(source, Anchor) else list(source)
    if not anchors or not all(isinstance(a, Anchor) for a in anchors):
        raise ValueError(
            "imagefolder_splits needs an Anchor, a list of Anchors or a timm data config "
            f"mapping, got {source!r}"
        )
    first = anchors[0]
    cfg = dict(resolve_data_config(model=first.model))
    size = tuple(first.input_size)
    cfg["input_size"] = size
    for key in ("mean", "std"):
        values = tuple(float(v) for v in cfg[key])
        if len(values) != size[0]:  # e.g. a 1-channel anchor with an RGB default config
            values = (sum(values) / len(values),) * size[0]
        cfg[key] = values
    return cfg, anchors


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
    from timm.data import create_transform

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"ImageFolder root {str(root)!r} does not exist")
    cfg, anchors = _data_config(anchor_or_data_config)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise DataError(
            f"ImageFolder root {str(root)!r} must hold train/ and val/ (or test/) "
            f"sub-folders; found {sorted(p.name for p in root.iterdir() if p.is_dir())}"
        )
    transform = create_transform(
        input_size=cfg["input_size"],
        is_training=False,
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode"),
    )
    channels = int(cfg["input_size"][0])
    train_ds = _image_folder(train_dir, transform, channels)
    test_ds = _image_folder(test_dir, transform, channels)
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
    n_train = len(train_ds)
    if validation is None:
        validation = max(1, min(5000, n_train // 10))
    if calibration is None:
        calibration = max(0, min(512, n_train - validation))
    n_test = len(test_ds) if test is None else test
    for what, n, top, where, available in (
        ("validation", validation, n_train - 1, train_dir, n_train),
        ("calibration", calibration, n_train - validation, train_dir, n_train),
        ("test", n_test, len(test_ds), test_dir, len(test_ds)),
    ):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
            raise DataError(
                f"ImageFolder {str(where)!r} has {available} images: {what} size must be an "
                f"integer in 1..{max(top, 0)}, got {n!r}"
            )
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
    val_idx, rest = perm[:validation], perm[validation:]
    h = hashlib.sha256()
    for ds in (train_ds, test_ds):
        for path, label in ds.samples:
            h.update(f"{os.path.relpath(path, root)}:{label}\n".encode())
    h.update(
        f"cfg={sorted((k, str(v)) for k, v in cfg.items())}|seed={seed}|cal={calibration}|"
        f"val={validation}|test={n_test}".encode()
    )
    identity = f"imagefolder-{h.hexdigest()[:16]}"
    common = {"batch_size": batch_size, "num_workers": num_workers}
    input_size = tuple(int(v) for v in cfg["input_size"])
    # Anchors give the transform back on a rebuild; a bare data config mapping does not.
    recipe = None
    if anchors:
        recipe = DataRecipe(
            "imagefolder",
            root=os.path.abspath(root),
            calibration=calibration,
            validation=validation,
            test=n_test,
            batch_size=batch_size,
            seed=seed,
            input_size=input_size,
            num_classes=n_cls,
        )
    return DataSplits(
        name=f"imagefolder:{root.name}",
        calibration=DatasetLoader(
            train_ds, rest[:calibration], identity=f"{identity}-cal", **common
        ),
        validation=DatasetLoader(train_ds, val_idx, identity=f"{identity}-val", **common),
        test=DatasetLoader(test_ds, range(n_test), identity=f"{identity}-test", **common),
        num_classes=n_cls,
        input_size=input_size,
        identity=identity,
        train=DatasetLoader(train_ds, rest, identity=f"{identity}-train", **common),
        recipe=recipe,
    )
