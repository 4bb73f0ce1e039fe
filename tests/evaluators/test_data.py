from __future__ import annotations

import dataclasses
import pickle

import pytest
import torch

import evaluators.data.fashion_mnist as data_mod
from evaluators import (
    ArrayLoader,
    DataError,
    DataRecipe,
    DatasetLoader,
    RecipeError,
    fashion_mnist_splits,
    find_fashion_mnist,
    imagefolder_splits,
    make_splits,
    synthetic_splits,
)
from space import InputError, load_anchor

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


# ---------------------------------------------------------------------- DataRecipe
def test_recipe_json_round_trip() -> None:
    import json

    recipe = DataRecipe(
        "imagefolder",
        root="/data/pets",
        calibration=8,
        validation=4,
        test=None,
        batch_size=2,
        seed=3,
        input_size=[3, 32, 32],
        num_classes=37,
    )
    assert recipe.input_size == (3, 32, 32)
    doc = json.loads(json.dumps(recipe.to_dict()))
    assert doc["input_size"] == [3, 32, 32] and doc["test"] is None
    assert DataRecipe.from_dict(doc) == recipe
    assert DataRecipe.from_dict({"dataset": "synthetic"}) == DataRecipe("synthetic")


@pytest.mark.parametrize(
    ("doc", "field", "word"),
    [
        ({"dataset": "cifar"}, "dataset", "'cifar'"),
        ({}, "dataset", "missing"),
        ({"dataset": "synthetic", "colour": 1}, "colour", "unknown"),
        ({"dataset": "synthetic", "validation": 0}, "validation", "0"),
        ({"dataset": "synthetic", "batch_size": True}, "batch_size", "True"),
        ({"dataset": "synthetic", "test": "all"}, "test", "'all'"),
        ({"dataset": "synthetic", "seed": 1.5}, "seed", "1.5"),
        ({"dataset": "synthetic", "input_size": [3, 32]}, "input_size", "[C, H, W]"),
        ({"dataset": "imagefolder", "root": ""}, "root", "''"),
        ({"dataset": "fashion-mnist", "num_classes": 5}, "num_classes", "10 classes"),
    ],
)
def test_recipe_rejects_bad_fields(doc, field, word) -> None:
    with pytest.raises(RecipeError) as err:
        DataRecipe.from_dict(doc)
    assert err.value.field == field and word in str(err.value)
    assert f"field {field!r}" in str(err.value)
    assert isinstance(err.value, InputError)
    again = pickle.loads(pickle.dumps(err.value))  # errors cross Ray as pickles
    assert str(again) == str(err.value) and again.field == field


def test_recipe_from_a_non_mapping() -> None:
    with pytest.raises(DataError, match="must be a mapping, got list"):
        DataRecipe.from_dict([1])


def test_user_data_errors_are_input_errors(tmp_path) -> None:
    with pytest.raises(InputError, match="does not hold the four IDX files"):
        find_fashion_mnist(tmp_path)
    with pytest.raises(InputError, match="ImageFolder root .* does not exist"):
        imagefolder_splits(tmp_path / "nope", {"input_size": (3, 8, 8)})


def test_make_splits_synthetic() -> None:
    recipe = DataRecipe(
        "synthetic", calibration=8, validation=12, input_size=(1, 16, 16), num_classes=3
    )
    data = make_splits(recipe)
    same = synthetic_splits(
        num_classes=3, input_size=(1, 16, 16), calibration=8, validation=12, test=12
    )
    assert data.identity == same.identity and data.recipe == same.recipe
    assert torch.equal(data.test.images, same.test.images)
    # The recorded recipe is complete: test = validation for synthetic data, the default batch.
    assert data.recipe == DataRecipe(
        "synthetic",
        calibration=8,
        validation=12,
        test=12,
        batch_size=64,
        seed=0,
        input_size=(1, 16, 16),
        num_classes=3,
    )
    again = make_splits(DataRecipe.from_dict(data.recipe.to_dict()))
    assert again.identity == data.identity
    assert torch.equal(again.validation.images, data.validation.images)
    assert (
        make_splits(DataRecipe("synthetic", seed=1)).identity
        != make_splits(DataRecipe("synthetic")).identity
    )


@needs_fmnist
def test_make_splits_fashion_mnist(tmp_path, monkeypatch) -> None:
    recipe = DataRecipe(
        "fashion-mnist", calibration=16, validation=24, test=32, batch_size=8, seed=2
    )
    data = make_splits(recipe)
    same = fashion_mnist_splits(calibration=16, validation=24, test=32, batch_size=8, seed=2)
    assert data.identity == same.identity and data.num_classes == 10
    assert torch.equal(data.validation.images, same.validation.images)
    assert data.recipe == DataRecipe(
        "fashion-mnist",
        calibration=16,
        validation=24,
        test=32,
        batch_size=8,
        seed=2,
        input_size=(1, 28, 28),
        num_classes=10,
    )
    # A relative root is recorded absolute, so the recipe works from any directory.
    monkeypatch.chdir(data_mod.FMNIST_DEBIAN_DIR.parent)
    rel = make_splits(DataRecipe("fashion-mnist", root="fashion-mnist", validation=8, test=8))
    assert rel.recipe.root == str(data_mod.FMNIST_DEBIAN_DIR)
    assert rel.recipe.calibration == 512 and rel.recipe.test == 8
    monkeypatch.chdir(tmp_path)
    assert make_splits(rel.recipe).identity == rel.identity
    with pytest.raises(DataError, match=r"validation size must be an integer in 1\.\.10000"):
        make_splits(DataRecipe("fashion-mnist", validation=20_000))
    with pytest.raises(DataError, match="does not hold the four IDX files"):
        make_splits(DataRecipe("fashion-mnist", root=str(tmp_path)))


def test_make_splits_imagefolder(tmp_path) -> None:
    _tree(tmp_path)
    anchor = _anchor(3)
    recipe = DataRecipe("imagefolder", root=str(tmp_path), calibration=6, validation=5, seed=1)
    data = make_splits(recipe, anchor=anchor)
    same = imagefolder_splits(tmp_path, anchor, calibration=6, validation=5, seed=1)
    assert data.identity == same.identity and data.validation.indices == same.validation.indices
    assert data.recipe == DataRecipe(
        "imagefolder",
        root=str(tmp_path),
        calibration=6,
        validation=5,
        test=9,
        batch_size=64,
        seed=1,
        input_size=(3, 32, 32),
        num_classes=3,
    )
    assert make_splits(data.recipe, anchor=anchor).identity == data.identity
    # Bare data configs give no anchor to rebuild the transform with: no recipe.
    cfg = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3}
    assert imagefolder_splits(tmp_path, cfg, calibration=4, validation=4).recipe is None
    with pytest.raises(DataError, match="needs a root directory"):
        make_splits(DataRecipe("imagefolder"), anchor=anchor)
    with pytest.raises(ValueError, match="needs the anchor"):
        make_splits(recipe)
    small = DataRecipe("imagefolder", root=str(tmp_path), input_size=(3, 64, 64))
    with pytest.raises(DataError, match=r"made at input size \(3, 64, 64\) but anchor"):
        make_splits(small, anchor=anchor)
    with pytest.raises(DataError, match="has 3 classes but the anchors' heads have"):
        make_splits(DataRecipe("imagefolder", root=str(tmp_path)), anchor=_anchor(5))
    with pytest.raises(DataError, match="num_classes: 4"):
        make_splits(dataclasses.replace(data.recipe, num_classes=4), anchor=anchor)
