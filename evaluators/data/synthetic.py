"""A small, learnable synthetic dataset for tests and benchmarks."""

from __future__ import annotations

import torch

from evaluators.data.loaders import ArrayLoader, DataSplits
from evaluators.data.recipe import DataRecipe


def synthetic_splits(
    *,
    num_classes: int = 4,
    input_size: tuple[int, int, int] = (3, 32, 32),
    calibration: int = 64,
    validation: int = 128,
    test: int = 128,
    batch_size: int = 64,
    seed: int = 0,
) -> DataSplits:
    """A small, learnable synthetic dataset for tests: class ``c`` brightens one region.

    Each class adds a bright square at its own position to Gaussian noise, so small
    models separate the classes easily. ``train`` holds ``4 * calibration`` more images
    (drawn after the others, so the other splits do not depend on it).
    """
    g = torch.Generator().manual_seed(seed)
    c, h, w = input_size

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        images = torch.randn((n, c, h, w), generator=g) * 0.5
        side = max(2, min(h, w) // 4)
        for k in range(num_classes):
            r = (k * side) % max(1, h - side)
            col = ((k * side) // max(1, h - side) * side) % max(1, w - side)
            images[labels == k, :, r : r + side, col : col + side] += 2.0
        return images, labels

    sizes = (("cal", calibration), ("val", validation), ("test", test))
    parts = {name: make(n) for name, n in sizes}
    parts["train"] = make(4 * calibration)
    kw = {"batch_size": batch_size}
    return DataSplits(
        name="synthetic",
        calibration=ArrayLoader(*parts["cal"], **kw),
        validation=ArrayLoader(*parts["val"], **kw),
        test=ArrayLoader(*parts["test"], **kw),
        train=ArrayLoader(*parts["train"], **kw),
        num_classes=num_classes,
        input_size=tuple(input_size),
        identity=f"synthetic-{num_classes}-{input_size}-{calibration}-{validation}-{test}-{seed}",
        recipe=DataRecipe(
            "synthetic",
            calibration=calibration,
            validation=validation,
            test=test,
            batch_size=batch_size,
            seed=seed,
            input_size=tuple(input_size),
            num_classes=num_classes,
        ),
    )
