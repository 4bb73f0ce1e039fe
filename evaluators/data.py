"""Data: calibration, validation and test splits for stitch fitting and evaluation.

Splits follow one rule for every dataset: **validation** and **calibration** are carved from
the *training* split with a seeded permutation, validation is what the search optimises, and
the **test** split is touched only for final reporting. For Fashion-MNIST the first
:data:`FMNIST_HOLDOUT` images of the permutation (seed 0) are held out of anchor training
(the default zoo is trained on the other 50,000), so validation images were never seen by the
shipped anchors; calibration images come from the training remainder.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from space import adapt_images

if TYPE_CHECKING:
    from space import Anchor

FMNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_ENV = "STITCHSEARCH_FASHION_MNIST"
FMNIST_HOLDOUT = 10_000
FMNIST_SPLIT_SEED = 0
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530
FMNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


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
    """

    name: str
    calibration: ArrayLoader | DatasetLoader
    validation: ArrayLoader | DatasetLoader
    test: ArrayLoader | DatasetLoader
    num_classes: int
    input_size: tuple[int, int, int]
    identity: str
    train: ArrayLoader | DatasetLoader | None = field(default=None, repr=False)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"Fashion-MNIST file {str(path)!r} is unreadable ({e})") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"Fashion-MNIST file {str(path)!r} is not an IDX ubyte file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise ValueError(
            f"Fashion-MNIST file {str(path)!r} holds {len(data) - offset} bytes, expected "
            f"{expected} for shape {dims}; is it truncated?"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def _has_fmnist(root: Path) -> bool:
    return all(_idx_file(root, s) for pair in _FMNIST_FILES.values() for s in pair)


def find_fashion_mnist(root: str | Path | None = None, *, download: bool = True) -> Path:
    """Finds the Fashion-MNIST IDX files.

    Tried in order: ``root`` (or the ``STITCHSEARCH_FASHION_MNIST`` environment variable),
    Debian's ``dataset-fashion-mnist`` under ``/usr/share/datasets/fashion-mnist``, then
    torchvision's download into ``~/.cache/stitchsearch/fashion-mnist`` when online.

    Args:
        root: A configured directory holding the four IDX files (``.gz`` or raw).
        download: Allow torchvision's download as the last resort.

    Returns:
        The directory holding the files.

    Raises:
        ValueError: None of the three worked; the message names all three and the fix.
    """
    configured = root if root is not None else os.environ.get(FMNIST_ENV)
    tried = []
    if configured is not None:
        path = Path(configured).expanduser()
        if _has_fmnist(path):
            return path
        if root is not None:
            # An explicitly configured directory that is wrong is an error, not a fallback.
            raise ValueError(
                f"Fashion-MNIST directory {str(path)!r} does not hold the four IDX files "
                f"(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                f"t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz])"
            )
        tried.append(f"${FMNIST_ENV}={str(path)!r}: files missing")
    else:
        tried.append("configured directory: none given")
    if _has_fmnist(FMNIST_DEBIAN_DIR):
        return FMNIST_DEBIAN_DIR
    tried.append(f"{FMNIST_DEBIAN_DIR}: not installed")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stitchsearch"
    target = cache / "fashion-mnist"
    if _has_fmnist(target / "FashionMNIST" / "raw"):
        return target / "FashionMNIST" / "raw"
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(target), train=True, download=True)
            FashionMNIST(str(target), train=False, download=True)
            if _has_fmnist(target / "FashionMNIST" / "raw"):
                return target / "FashionMNIST" / "raw"
            tried.append("torchvision download: files missing afterwards")
        except Exception as e:  # no network raises URLError, RuntimeError, ...
            tried.append(f"torchvision download: failed ({type(e).__name__})")
    else:
        tried.append("torchvision download: disabled")
    raise ValueError(
        "Fashion-MNIST not found; tried " + "; ".join(tried) + ". Fix: `apt-get install "
        "dataset-fashion-mnist`, or pass the directory holding the IDX files (data.root in the "
        f"study, or ${FMNIST_ENV})"
    )


def load_fashion_mnist(
    root: str | Path | None = None, *, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads one Fashion-MNIST split as ``(uint8 images (N, 28, 28), int64 labels (N,))``."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = find_fashion_mnist(root)
    img_stem, lbl_stem = _FMNIST_FILES[split]
    images = _read_idx(_idx_file(directory, img_stem))
    labels = _read_idx(_idx_file(directory, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"Fashion-MNIST in {str(directory)!r}: {split} images and labels differ")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_mnist_splits(
    root: str | Path | None = None,
    *,
    calibration: int = 512,
    validation: int = 5000,
    test: int | None = None,
    batch_size: int = 256,
    input_size: tuple[int, int, int] = (1, 28, 28),
    seed: int = FMNIST_SPLIT_SEED,
) -> DataSplits:
    """Fashion-MNIST calibration, validation and test loaders.

    Args:
        root: Directory of the IDX files (see :func:`find_fashion_mnist`).
        calibration: Calibration images, from the training remainder.
        validation: Validation images, from the held-out part of the training split
            (at most :data:`FMNIST_HOLDOUT` so that the zoo never trained on them).
        test: Test images (default: all 10,000).
        batch_size: Batch size of every loader.
        input_size: ``(C, H, W)`` to adapt images to (for anchors that expect RGB or
            another resolution).
        seed: Permutation seed of the training split.

    Raises:
        ValueError: Bad sizes, or the data cannot be found.
    """
    for what, n, top in (
        ("validation", validation, FMNIST_HOLDOUT),
        ("calibration", calibration, 60_000 - FMNIST_HOLDOUT),
        ("test", 10_000 if test is None else test, 10_000),
    ):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
            raise ValueError(f"Fashion-MNIST {what} size must be an integer in 1..{top}, got {n!r}")
    x, y = load_fashion_mnist(root, split="train")
    xt, yt = load_fashion_mnist(root, split="test")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held, rest = perm[:FMNIST_HOLDOUT], perm[FMNIST_HOLDOUT:]
    n_test = len(xt) if test is None else test
    common = {"batch_size": batch_size, "mean": FMNIST_MEAN, "std": FMNIST_STD}
    common["input_size"] = input_size
    identity = hashlib.sha256(
        f"fashion-mnist|seed={seed}|cal={calibration}|val={validation}|test={n_test}|"
        f"size={tuple(input_size)}|mean={FMNIST_MEAN}|std={FMNIST_STD}".encode()
    ).hexdigest()[:16]
    return DataSplits(
        name="fashion-mnist",
        calibration=ArrayLoader(x[rest[:calibration]], y[rest[:calibration]], **common),
        validation=ArrayLoader(x[held[:validation]], y[held[:validation]], **common),
        test=ArrayLoader(xt[:n_test], yt[:n_test], **common),
        num_classes=10,
        input_size=tuple(input_size),
        identity=f"fashion-mnist-{identity}",
        train=ArrayLoader(x[rest], y[rest], **common),
    )


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
    models separate the classes easily.
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
    kw = {"batch_size": batch_size}
    return DataSplits(
        name="synthetic",
        calibration=ArrayLoader(*parts["cal"], **kw),
        validation=ArrayLoader(*parts["val"], **kw),
        test=ArrayLoader(*parts["test"], **kw),
        num_classes=num_classes,
        input_size=tuple(input_size),
        identity=f"synthetic-{num_classes}-{input_size}-{calibration}-{validation}-{test}-{seed}",
    )


# ---------------------------------------------------------------------- ImageFolder
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
        raise ValueError(f"ImageFolder directory {str(directory)!r} does not exist")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    try:
        ds = ImageFolder(
            str(directory), transform=transform, loader=_PILLoader("L" if channels == 1 else "RGB")
        )
    except FileNotFoundError as e:
        raise ValueError(
            f"ImageFolder {str(directory)!r} has no images: found {len(classes)} class "
            f"folders and 0 images ({e})"
        ) from None
    if len(ds) == 0:
        raise ValueError(
            f"ImageFolder {str(directory)!r} has no images: found {len(ds.classes)} class "
            "folders and 0 images"
        )
    return ds


def _data_config(
    source: Anchor | Sequence[Anchor] | Mapping[str, Any],
) -> tuple[dict[str, Any], list[Anchor]]:
    from timm.data import resolve_data_config

    from space import Anchor

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
        The splits; ``train`` holds the remainder after validation.

    Raises:
        ValueError: Missing folders, an ImageFolder with no images, class counts that differ
            from the anchors' heads or between ``train/`` and ``val/``, or split sizes that do
            not fit (each message names the directory and the counts).
    """
    from timm.data import create_transform

    root = Path(root).expanduser()
    if not root.is_dir():
        raise ValueError(f"ImageFolder root {str(root)!r} does not exist")
    cfg, anchors = _data_config(anchor_or_data_config)
    train_dir = root / "train"
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise ValueError(
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
        raise ValueError(
            f"ImageFolder {str(train_dir)!r} has {n_cls} classes but {str(test_dir)!r} has "
            f"{len(test_ds.classes)}, or their names differ; both need the same class folders"
        )
    expected = [(a.name, a.num_classes) for a in anchors]
    if num_classes is not None:
        expected.append(("num_classes", int(num_classes)))
    wrong = [(name, n) for name, n in expected if n != n_cls]
    if wrong:
        heads = ", ".join(f"{name}: {n}" for name, n in wrong)
        raise ValueError(
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
            raise ValueError(
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
    return DataSplits(
        name=f"imagefolder:{root.name}",
        calibration=DatasetLoader(
            train_ds, rest[:calibration], identity=f"{identity}-cal", **common
        ),
        validation=DatasetLoader(train_ds, val_idx, identity=f"{identity}-val", **common),
        test=DatasetLoader(test_ds, range(n_test), identity=f"{identity}-test", **common),
        num_classes=n_cls,
        input_size=tuple(int(v) for v in cfg["input_size"]),
        identity=identity,
        train=DatasetLoader(train_ds, rest, identity=f"{identity}-train", **common),
    )
