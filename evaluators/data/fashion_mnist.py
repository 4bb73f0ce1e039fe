"""Fashion-MNIST: finding and reading the IDX files, and its splits."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from evaluators.data.loaders import ArrayLoader, DataSplits
from evaluators.data.recipe import DataError, DataRecipe

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


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"Fashion-MNIST file {str(path)!r} is unreadable ({e})") from None
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"Fashion-MNIST file {str(path)!r} is not an IDX ubyte file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise DataError(
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
        DataError: None of the three worked; the message names all three and the fix.
    """
    configured = root if root is not None else os.environ.get(FMNIST_ENV)
    tried = []
    if configured is not None:
        path = Path(configured).expanduser()
        if _has_fmnist(path):
            return path
        if root is not None:
            # An explicitly configured directory that is wrong is an error, not a fallback.
            raise DataError(
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
    raise DataError(
        "Fashion-MNIST not found; tried " + "; ".join(tried) + ". Fix: `apt-get install "
        "dataset-fashion-mnist`, or pass the directory holding the IDX files (data.root in the "
        f"study, or ${FMNIST_ENV})"
    )


def load_fashion_mnist(
    root: str | Path | None = None, *, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reads one Fashion-MNIST split as ``(uint8 images (N, 28, 28), int64 labels (N,))``.

    Raises:
        DataError: The files cannot be found or read (see :func:`find_fashion_mnist`).
    """
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = find_fashion_mnist(root)
    img_stem, lbl_stem = _FMNIST_FILES[split]
    images = _read_idx(_idx_file(directory, img_stem))
    labels = _read_idx(_idx_file(directory, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST in {str(directory)!r}: {split} images and labels differ")
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
        DataError: Bad sizes, or the data cannot be found.
    """
    for what, n, top in (
        ("validation", validation, FMNIST_HOLDOUT),
        ("calibration", calibration, 60_000 - FMNIST_HOLDOUT),
        ("test", 10_000 if test is None else test, 10_000),
    ):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= top:
            raise DataError(f"Fashion-MNIST {what} size must be an integer in 1..{top}, got {n!r}")
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
        recipe=DataRecipe(
            "fashion-mnist",
            root=None if root is None else os.path.abspath(Path(root).expanduser()),
            calibration=calibration,
            validation=validation,
            test=n_test,
            batch_size=batch_size,
            seed=seed,
            input_size=tuple(input_size),
            num_classes=10,
        ),
    )
