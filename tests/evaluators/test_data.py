from __future__ import annotations

import pytest
import torch

import evaluators.data as data_mod
from evaluators import (
    ArrayLoader,
    DatasetLoader,
    fashion_mnist_splits,
    find_fashion_mnist,
    imagefolder_splits,
    synthetic_splits,
)
from space import load_anchor

needs_fmnist = pytest.mark.skipif(
    not data_mod._has_fmnist(data_mod.FMNIST_DEBIAN_DIR),
    reason="Debian's dataset-fashion-mnist is not installed",
)


@needs_fmnist
def test_fashion_mnist_splits_small() -> None:
    data = fashion_mnist_splits(calibration=32, validation=64, test=48, batch_size=16)
    assert data.num_classes == 10 and data.input_size == (1, 28, 28)
    assert (data.calibration.num_images, data.validation.num_images, data.test.num_images) == (
        32,
        64,
        48,
    )
    x, y = next(iter(data.validation))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 < float(x.mean()) < 1.0 and 0.5 < float(x.std()) < 2.0  # normalised
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    # Seeded: same seed, same images and identity; another seed, other ones.
    again = fashion_mnist_splits(calibration=32, validation=64, test=48, batch_size=16)
    other = fashion_mnist_splits(calibration=32, validation=64, test=48, batch_size=16, seed=1)
    assert torch.equal(again.validation.images, data.validation.images)
    assert again.identity == data.identity != other.identity
    assert not torch.equal(other.validation.images, data.validation.images)
    # RGB anchors at another size get adapted images.
    rgb = fashion_mnist_splits(calibration=8, validation=8, test=8, input_size=(3, 32, 32))
    assert next(iter(rgb.calibration))[0].shape == (8, 3, 32, 32)


@needs_fmnist
def test_fashion_mnist_bad_sizes() -> None:
    with pytest.raises(ValueError, match=r"validation size must be an integer in 1\.\.10000"):
        fashion_mnist_splits(validation=20_000)


def test_fashion_mnist_missing_names_all_three_places(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data_mod, "FMNIST_DEBIAN_DIR", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(data_mod.FMNIST_ENV, raising=False)
    with pytest.raises(ValueError) as err:
        find_fashion_mnist(download=False)
    msg = str(err.value)
    assert "configured directory" in msg and str(tmp_path / "debian") in msg
    assert "torchvision download" in msg and "apt-get install dataset-fashion-mnist" in msg
    with pytest.raises(ValueError, match="does not hold the four IDX files"):
        find_fashion_mnist(tmp_path)


def test_synthetic_splits_are_seeded() -> None:
    a = synthetic_splits(num_classes=3, calibration=8, validation=8, test=8)
    b = synthetic_splits(num_classes=3, calibration=8, validation=8, test=8)
    assert torch.equal(a.validation.images, b.validation.images)
    assert a.validation.labels.max() <= 2
    assert isinstance(a.calibration, ArrayLoader) and a.calibration.subset(4).num_images == 4


def _tree(root, classes=("ant", "bee", "cat"), train=8, val=3, size=(20, 24)) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8)
                Image.fromarray(arr.numpy()).save(d / f"{i}.png")


def _anchor(num_classes: int, in_chans: int = 3):
    torch.manual_seed(0)
    return load_anchor(
        "resnet10t", num_classes=num_classes, in_chans=in_chans, input_size=(in_chans, 32, 32)
    )


def test_imagefolder_splits(tmp_path) -> None:
    _tree(tmp_path)
    anchor = _anchor(3)
    data = imagefolder_splits(tmp_path, anchor, calibration=6, validation=5, seed=0, batch_size=4)
    assert data.num_classes == 3 and data.input_size == (3, 32, 32)
    assert (data.validation.num_images, data.calibration.num_images, data.test.num_images) == (
        5,
        6,
        9,
    )
    assert isinstance(data.validation, DatasetLoader)
    # Validation and calibration are carved from train/ without overlap.
    assert not set(data.validation.indices) & set(data.calibration.indices)
    assert set(data.calibration.indices) <= set(data.train.indices)
    x, y = next(iter(data.test))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64
    assert abs(float(x.mean())) < 2.0  # normalised by the timm transform
    with torch.no_grad():
        assert anchor.model(x).shape == (4, 3)
    again = imagefolder_splits(tmp_path, anchor, calibration=6, validation=5, seed=0)
    other = imagefolder_splits(tmp_path, anchor, calibration=6, validation=5, seed=1)
    assert again.validation.indices == data.validation.indices
    assert again.identity == data.identity != other.identity
    # Defaults: 10% for validation (at least 1), the rest up to 512 for calibration.
    auto = imagefolder_splits(tmp_path, [anchor, anchor])
    assert auto.validation.num_images == 2 and auto.calibration.num_images == 22


def test_imagefolder_grayscale_anchor_and_test_folder(tmp_path) -> None:
    _tree(tmp_path)
    (tmp_path / "val").rename(tmp_path / "test")
    data = imagefolder_splits(tmp_path, _anchor(3, in_chans=1), calibration=4, validation=4)
    x, _ = next(iter(data.test))
    assert x.shape[1:] == (1, 32, 32)


def test_imagefolder_data_config_mapping(tmp_path) -> None:
    _tree(tmp_path)
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 1.0}
    data = imagefolder_splits(tmp_path, cfg, calibration=4, validation=4, num_classes=3)
    assert next(iter(data.validation))[0].shape[1:] == (3, 16, 16)
    with pytest.raises(
        ValueError, match="has 3 classes but the anchors' heads have num_classes: 5"
    ):
        imagefolder_splits(tmp_path, cfg, num_classes=5)


def test_imagefolder_class_count_mismatch_names_directory_and_counts(tmp_path, tiny_anchor) -> None:
    _tree(tmp_path)
    anchor = tiny_anchor("resnet")  # 10 classes
    with pytest.raises(ValueError) as err:
        imagefolder_splits(tmp_path, anchor)
    msg = str(err.value)
    assert str(tmp_path / "train") in msg and "3 classes" in msg and f"{anchor.name}: 10" in msg


def test_imagefolder_without_images(tmp_path) -> None:
    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
    with pytest.raises(ValueError) as err:
        imagefolder_splits(tmp_path, _anchor(2))
    msg = str(err.value)
    assert str(tmp_path / "train") in msg and "2 class folders and 0 images" in msg


def test_imagefolder_bad_layout_and_sizes(tmp_path) -> None:
    _tree(tmp_path)
    with pytest.raises(ValueError, match="must hold train/ and val/"):
        imagefolder_splits(tmp_path / "train", _anchor(3))
    with pytest.raises(ValueError, match=r"has 24 images: validation size must be an integer"):
        imagefolder_splits(tmp_path, _anchor(3), validation=30)
    with pytest.raises(ValueError, match="does not exist"):
        imagefolder_splits(tmp_path / "nope", _anchor(3))


def test_imagefolder_splits_pickle_for_ray(tmp_path) -> None:
    import pickle

    _tree(tmp_path, train=4, val=2)
    data = imagefolder_splits(tmp_path, _anchor(3), calibration=4, validation=2)
    copy = pickle.loads(pickle.dumps(data))
    x0, _ = next(iter(data.calibration))
    x1, _ = next(iter(copy.calibration))
    assert torch.equal(x0, x1) and copy.identity == data.identity
