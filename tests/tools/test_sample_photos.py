"""tools.sample_photos: random crops of scikit-image's sample photos as PNG files.

The tests that write crops need scikit-image (the optional extra ``real``) and skip without
it; the bad-argument tests need nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tools.sample_photos import CAL_PHOTOS, EVAL_PHOTOS, PHOTO_SETS, crop_photos, main


def test_writes_the_crops_as_png_and_is_deterministic(tmp_path, capsys) -> None:
    pytest.importorskip("skimage")
    out = tmp_path / "photos"
    assert main(["--out", str(out), "--count", "5", "--size", "24", "--seed", "3"]) == 0
    assert "wrote 5 crops of 15 scikit-image photos" in capsys.readouterr().out
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"{i:05d}.png" for i in range(5)]
    first = [np.asarray(Image.open(f)) for f in files]
    assert all(a.shape == (24, 24, 3) and a.dtype == np.uint8 for a in first)
    # The PNG files are the crops, rounded to 8 bits.
    crops = crop_photos(PHOTO_SETS["all"], 5, 24, seed=3)
    expected = (crops.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(np.stack(first), expected)
    # The same arguments give the same files; another seed other crops.
    again = tmp_path / "again"
    assert main(["--out", str(again), "--count", "5", "--size", "24", "--seed", "3"]) == 0
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted(again.iterdir())]
    other = tmp_path / "other"
    assert main(["--out", str(other), "--count", "5", "--size", "24", "--seed", "4"]) == 0
    assert files[0].read_bytes() != (other / "00000.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other", "photos"]  # no temp


def test_photo_sets_are_disjoint() -> None:
    assert not set(CAL_PHOTOS) & set(EVAL_PHOTOS)
    assert PHOTO_SETS["all"] == CAL_PHOTOS + EVAL_PHOTOS


def test_evaluation_photos_into_an_existing_empty_folder(tmp_path) -> None:
    pytest.importorskip("skimage")
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["--out", str(out), "--count", "2", "--size", "16", "--photos", "evaluation"]) == 0
    assert len(list(out.iterdir())) == 2


def _spoil_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return ["--out", str(tmp_path / "f")]


def _spoil_full(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.png").write_bytes(b"")
    return ["--out", str(tmp_path / "full")]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda t: ["--out", str(t / "o"), "--count", "0"], "--count: 0 crops; give a number"),
        (lambda t: ["--out", str(t / "o"), "--size", "4"], "--size: 4 px; give a side from 8"),
        (lambda t: ["--out", str(t / "o"), "--photos", "dogs"], "--photos: 'dogs'; choose one"),
        (lambda t: ["--out", str(t / "o"), "--count", "many"], "argument --count: invalid int"),
        (lambda t: ["--count", "3"], "the following arguments are required: --out"),
        (_spoil_file, "is a file; give a new or empty folder"),
        (_spoil_full, "is not empty; give a new or empty folder"),
    ],
    ids=["count", "size", "photos", "count-not-int", "no-out", "out-file", "out-not-empty"],
)
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, make, needle) -> None:
    argv = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written
