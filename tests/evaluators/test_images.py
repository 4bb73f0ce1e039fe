"""A folder of unlabelled images: discovery, deterministic splits and bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluators import DataError, DataRecipe, make_splits
from evaluators.data import UNLABELLED, find_images, image_splits
from tests.conftest import make_tiny


def write_pngs(root: Path, n: int, *, seed: int = 0, nested: bool = True) -> Path:
    """``n`` random 32x32 RGB PNGs under ``root``, half of them in a sub-folder."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "sub" / "deeper" if nested and i % 2 else root
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def resnet():
    return make_tiny("resnet")


def test_find_images_is_recursive_sorted_and_skips_other_files(tmp_path) -> None:
    write_pngs(tmp_path, 6)
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"ignored: hidden")
    found = find_images(tmp_path)
    assert len(found) == 6
    assert found == sorted(found)
    assert any(p.startswith("sub/deeper/") for p in found)
    assert not any(p.endswith(("README.txt", ".hidden.png")) for p in found)


def test_splits_are_disjoint_deterministic_and_unlabelled(tmp_path, resnet) -> None:
    write_pngs(tmp_path, 40)
    a = image_splits(tmp_path, resnet, validation=10, test=8, calibration=6, batch_size=7)
    b = image_splits(tmp_path, resnet, validation=10, test=8, calibration=6, batch_size=7)
    assert a.identity == b.identity
    assert (a.validation.num_images, a.test.num_images, a.calibration.num_images) == (10, 8, 6)
    val, test = set(a.validation.indices), set(a.test.indices)
    cal, train = set(a.calibration.indices), set(a.train.indices)
    assert not val & test and not (val | test) & train
    assert cal <= train and len(train) == 40 - 18
    x, y = next(iter(a.validation))
    assert tuple(x.shape[1:]) == (3, 32, 32)
    assert (y == UNLABELLED).all()
    assert a.num_classes == resnet.num_classes
    # The recipe rebuilds the same splits.
    assert make_splits(a.recipe, anchor=resnet).identity == a.identity
    other = image_splits(tmp_path, resnet, validation=10, test=8, calibration=6, seed=1)
    assert other.validation.indices != a.validation.indices


def test_empty_folder_names_the_folder(tmp_path, resnet) -> None:
    (tmp_path / "notes.txt").write_text("no pictures here")
    with pytest.raises(DataError, match=r"has no images \(1 other files\)"):
        image_splits(tmp_path, resnet)
    with pytest.raises(DataError, match="does not exist"):
        image_splits(tmp_path / "missing", resnet)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, b"text"])
def test_unreadable_image_names_the_file(tmp_path, resnet, content) -> None:
    write_pngs(tmp_path, 5)
    (tmp_path / "sub" / "broken.png").write_bytes(content)
    with pytest.raises(DataError, match=r"broken\.png' cannot be read.*remove or replace it"):
        image_splits(tmp_path, resnet, validation=1, test=1, calibration=1)


def test_truncated_png_is_refused(tmp_path, resnet) -> None:
    write_pngs(tmp_path, 5, nested=False)
    path = tmp_path / "img000.png"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DataError, match="img000.png"):
        image_splits(tmp_path, resnet, validation=1, test=1, calibration=1)


def test_sizes_that_do_not_fit_say_which_field(tmp_path, resnet) -> None:
    write_pngs(tmp_path, 10)
    with pytest.raises(DataError, match=r"has 10 images: data\.validation must be .* 1\.\.8"):
        image_splits(tmp_path, resnet, validation=2000)
    with pytest.raises(DataError, match=r"calibration .* must be in 1\.\.4, got 512"):
        image_splits(tmp_path, resnet, validation=3, test=3, calibration=512)


def test_recipe_round_trips_teacher_labels_and_rejects_bad_ones() -> None:
    labels = {"validation": (1, 2), "test": (0,)}
    recipe = DataRecipe("images", root="/x", teacher="t", teacher_labels=labels)
    doc = recipe.to_dict()
    assert doc["teacher_labels"] == {"validation": [1, 2], "test": [0]}
    assert DataRecipe.from_dict(doc) == recipe
    assert "teacher" not in DataRecipe("synthetic").to_dict()
    with pytest.raises(DataError, match="teacher_labels"):
        DataRecipe("images", root="/x", teacher_labels=labels)  # no teacher named
    with pytest.raises(DataError, match=r"teacher_labels\.test"):
        DataRecipe("images", root="/x", teacher="t", teacher_labels={**labels, "test": [-1]})
    with pytest.raises(DataError, match="only images data has a teacher"):
        DataRecipe("synthetic", teacher="t")


def test_zoo_anchors_see_png_folders_as_the_fashion_mnist_loader_does(tmp_path) -> None:
    """The zoo's recorded normalisation reaches image-folder data (it once got timm defaults)."""
    import torch

    from evaluators import load_fashion_mnist
    from evaluators.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
    from space import load_anchor

    x, _ = load_fashion_mnist(split="test")
    for i in range(64):
        Image.fromarray(x[i].numpy()).save(tmp_path / f"{i:05d}.png")
    small, large = load_anchor("zoo:resnet-s"), load_anchor("zoo:resnet-l")
    data = image_splits(tmp_path, [small, large], validation=40, test=16, calibration=8)
    got = torch.cat([batch for batch, _ in data.validation])
    want = (x[list(data.validation.indices)].float() / 255 - FMNIST_MEAN) / FMNIST_STD
    assert got.shape == (40, 1, 28, 28)
    torch.testing.assert_close(got, want.unsqueeze(1), atol=2e-3, rtol=0)
    # Two good anchors agree on such images far above chance (10%); with timm's default
    # normalisation the small one agreed with the large one on about 10%.
    with torch.inference_mode():
        agree = (small.model(got).argmax(1) == large.model(got).argmax(1)).float().mean()
    assert agree >= 0.75, float(agree)
