"""Loaders over in-memory images and over datasets, and the :class:`DataSplits` value."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from space import adapt_images

if TYPE_CHECKING:
    from evaluators.data.recipe import DataRecipe


class ArrayLoader:
    """A re-iterable loader over in-memory images that yields normalised float batches.

    Much cheaper than a ``DataLoader`` over per-item datasets for data that fits in memory.

    Args:
        images: ``(N, H, W)`` or ``(N, C, H, W)`` uint8 or float images.
        labels: ``(N,)`` int64 labels.
        batch_size: Images per batch.
        mean: Per-dataset mean subtracted after scaling uint8 to [0, 1].
        std: Per-dataset standard deviation.
        input_size: ``(C, H, W)`` to adapt the images to (channel repeat, bilinear resize).
        shuffle: Shuffle every epoch (seeded by ``seed`` and the epoch count).
        seed: Shuffle seed.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int = 256,
        mean: float = 0.0,
        std: float = 1.0,
        input_size: tuple[int, int, int] | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if images.ndim == 3:
            images = images[:, None]
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.batch_size = int(batch_size)
        self.mean = mean
        self.std = std
        self.input_size = tuple(input_size) if input_size else tuple(images.shape[1:])
        self.shuffle = shuffle
        self.seed = seed
        self._epoch = 0

    def __len__(self) -> int:
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    @property
    def num_images(self) -> int:
        """Number of images."""
        return len(self.images)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        x = (x - self.mean) / self.std
        if tuple(x.shape[1:]) != self.input_size:
            x = adapt_images(x, self.input_size)
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.images)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self._epoch)
            order = torch.randperm(n, generator=g)
            self._epoch += 1
        else:
            order = None
        for start in range(0, n, self.batch_size):
            idx = slice(start, start + self.batch_size) if order is None else None
            if order is None:
                xb, yb = self.images[idx], self.labels[idx]
            else:
                sel = order[start : start + self.batch_size]
                xb, yb = self.images[sel], self.labels[sel]
            yield self._prepare(xb), yb

    def subset(self, n: int) -> ArrayLoader:
        """The first ``n`` images as a loader with the same settings."""
        return ArrayLoader(
            self.images[:n],
            self.labels[:n],
            batch_size=self.batch_size,
            mean=self.mean,
            std=self.std,
            input_size=self.input_size,
        )


class DatasetLoader:
    """A re-iterable loader over a subset of a map-style dataset (e.g. an ImageFolder).

    Mirrors :class:`ArrayLoader`'s interface (``num_images``, ``subset``, ``batch_size``,
    ``identity``) on top of ``torch.utils.data.DataLoader``.

    Args:
        dataset: A map-style dataset yielding ``(image tensor, label)``.
        indices: Which items, in order.
        batch_size: Images per batch.
        num_workers: DataLoader worker processes.
        identity: A string identifying the images and transform (for caches).
    """

    def __init__(
        self,
        dataset: Any,
        indices: Sequence[int],
        *,
        batch_size: int = 64,
        num_workers: int = 0,
        identity: str = "",
    ) -> None:
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.identity = identity

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    @property
    def num_images(self) -> int:
        """Number of images."""
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader, Subset

        loader = DataLoader(
            Subset(self.dataset, self.indices),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
        for x, y in loader:
            yield x, torch.as_tensor(y, dtype=torch.int64)

    def subset(self, n: int) -> DatasetLoader:
        """The first ``n`` images as a loader with the same settings."""
        return DatasetLoader(
            self.dataset,
            self.indices[:n],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            identity=f"{self.identity}|first={n}",
        )


@dataclass
class DataSplits:
    """Calibration, validation and test loaders of one dataset.

    Attributes:
        name: Dataset name.
        calibration: Images for least-squares stitch fitting and CKA.
        validation: What the search optimises (carved from the training split).
        test: Final reporting only.
        num_classes: Number of classes.
        input_size: ``(C, H, W)`` of the produced batches.
        identity: A string identifying the data and split settings (for caches).
        train: The training remainder (for training anchors), when available.
        recipe: How to rebuild these splits with :func:`evaluators.make_splits` (every
            size filled in), or None when built from a timm data config mapping.
    """

    name: str
    calibration: ArrayLoader | DatasetLoader
    validation: ArrayLoader | DatasetLoader
    test: ArrayLoader | DatasetLoader
    num_classes: int
    input_size: tuple[int, int, int]
    identity: str
    train: ArrayLoader | DatasetLoader | None = field(default=None, repr=False)
    recipe: DataRecipe | None = None
