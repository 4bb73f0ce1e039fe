"""Seeded splits of image files, shared by ImageFolder trees and folders of unlabelled images.

Both read image files through an anchor's timm evaluation transform (:func:`data_config`,
:func:`eval_transform`), cut a seeded permutation of the training images into validation
(first), then test where it comes from the same images, and a remainder whose start is the
calibration split and the whole of which is the training split (:func:`seeded_split`), and
name the result by a hash of the files and the settings (:func:`split_identity`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evaluators.data.loaders import DatasetLoader, DataSplits
from evaluators.data.recipe import DataRecipe
from space import Anchor


class PILLoader:
    """Opens an image file as ``"L"`` or ``"RGB"`` (a class, so that splits pickle for Ray)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, path: str) -> Any:
        from PIL import Image

        with open(path, "rb") as f, Image.open(f) as img:
            return img.convert(self.mode)


def data_config(
    source: Anchor | Sequence[Anchor] | Mapping[str, Any],
) -> tuple[dict[str, Any], list[Anchor]]:
    """The timm data config images are transformed with, and the anchors it came from.

    Args:
        source: An anchor or a list of anchors (the first one's config, at its input size,
            with ``mean`` and ``std`` of its channel count), or a timm data config mapping
            (then no anchors).

    Raises:
        ValueError: ``source`` is none of these.
    """
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


def eval_transform(cfg: Mapping[str, Any]) -> Any:
    """The timm evaluation transform (resize, centre crop, normalise) of a data config."""
    from timm.data import create_transform

    return create_transform(
        input_size=cfg["input_size"],
        is_training=False,
        interpolation=cfg.get("interpolation", "bilinear"),
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg.get("crop_pct"),
        crop_mode=cfg.get("crop_mode"),
    )


def is_split_size(value: Any, top: int) -> bool:
    """Whether ``value`` is an integer (not a bool) in ``1..top``."""
    return not isinstance(value, bool) and isinstance(value, int) and 1 <= value <= top


def seeded_split(n: int, seed: int, *sizes: int) -> list[list[int]]:
    """A seeded permutation of ``range(n)`` cut into runs of ``sizes``, then the remainder.

    Returns:
        ``len(sizes) + 1`` lists of indices: the runs in order, the remainder last.
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    runs, start = [], 0
    for size in sizes:
        runs.append(perm[start : start + size])
        start += size
    return [*runs, perm[start:]]


def split_identity(
    kind: str,
    files: Iterable[str],
    cfg_text: str,
    *,
    seed: int,
    calibration: int,
    validation: int,
    test: int,
    extra: str = "",
) -> str:
    """``<kind>-<hash>``: a hash of the files' lines, the transform config and the sizes."""
    h = hashlib.sha256()
    for line in files:
        h.update(line.encode())
    h.update(
        f"cfg={cfg_text}|seed={seed}|cal={calibration}|val={validation}|test={test}{extra}".encode()
    )
    return f"{kind}-{h.hexdigest()[:16]}"


def dataset_splits(
    kind: str,
    root: Path,
    *,
    train_set: Any,
    test_set: Any,
    validation: Sequence[int],
    test: Sequence[int],
    remainder: Sequence[int],
    calibration: int,
    seed: int,
    identity: str,
    num_classes: int,
    input_size: tuple[int, int, int],
    batch_size: int,
    num_workers: int,
    recipe: Mapping[str, Any] | None,
) -> DataSplits:
    """The splits' loaders over two map-style datasets (the same one for a single folder).

    Args:
        kind: The dataset kind (``"imagefolder"`` or ``"images"``; the recipe's dataset).
        root: The folder the images were read from (the splits are named after it).
        train_set: The dataset validation, calibration and training images come from.
        test_set: The dataset test images come from.
        validation: Validation indices into ``train_set``.
        test: Test indices into ``test_set``.
        remainder: The rest of ``train_set``: the training split, whose first
            ``calibration`` images are the calibration split.
        calibration: Calibration images.
        seed: The permutation's seed (recorded in the recipe).
        identity: The splits' identity; each loader's adds the split.
        num_classes: The class count.
        input_size: ``(C, H, W)`` of the images.
        batch_size: Batch size of every loader.
        num_workers: DataLoader worker processes.
        recipe: The recipe's fields besides the sizes (``{}``: none), or None for splits
            that no recipe can rebuild.
    """
    record = None
    if recipe is not None:
        record = DataRecipe(
            kind,
            root=os.path.abspath(root),
            calibration=calibration,
            validation=len(validation),
            test=len(test),
            batch_size=batch_size,
            seed=seed,
            input_size=input_size,
            num_classes=num_classes,
            **recipe,
        )
    common = {"batch_size": batch_size, "num_workers": num_workers}
    return DataSplits(
        name=f"{kind}:{root.name}",
        calibration=DatasetLoader(
            train_set, remainder[:calibration], identity=f"{identity}-cal", **common
        ),
        validation=DatasetLoader(train_set, validation, identity=f"{identity}-val", **common),
        test=DatasetLoader(test_set, test, identity=f"{identity}-test", **common),
        num_classes=num_classes,
        input_size=input_size,
        identity=identity,
        train=DatasetLoader(train_set, remainder, identity=f"{identity}-train", **common),
        recipe=record,
    )
