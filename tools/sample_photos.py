"""``python -m tools.sample_photos``: random crops of scikit-image's sample photos as PNG files.

::

    pip install -e '.[real]'   # scikit-image (its sample photos ship with the package)
    python -m tools.sample_photos --out runs/photos --count 600 --size 256 --seed 0

Writes ``--count`` random square crops (35-100% of the photo's short side, at a random
place, flipped left-right half of the time) of the natural photos in ``skimage.data``,
resized to ``--size`` px (bilinear, antialiased), as RGB PNG files ``00000.png``, ... into
``--out``: a folder of unlabelled images for a label-free study (``data: {dataset: images}``,
e.g. ``studies/efficientnet_lite.yaml``). Crops go round-robin over the photos; greyscale
photos are repeated to three channels. ``--photos calibration`` or ``evaluation`` uses one of
two disjoint sets of photos (:data:`CAL_PHOTOS`, :data:`EVAL_PHOTOS`; the default ``all``
uses both), as ``benchmarks/bench_real_pair.py`` does. The same arguments write the same
files.

``--out`` must be a new or empty folder: the files are written to a temporary folder beside
it, which is renamed to ``--out`` at the end, so an interrupted run leaves nothing. Bad
arguments print one line and exit 2, writing nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from space import InputError

#: Calibration and evaluation photos of ``skimage.data`` (natural photos, disjoint sets).
CAL_PHOTOS = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "grass",
    "brick",
    "moon",
    "coins",
)
EVAL_PHOTOS = ("chelsea", "coffee", "retina", "clock", "gravel", "cell")
#: ``--photos`` -> the photos it crops.
PHOTO_SETS: dict[str, tuple[str, ...]] = {
    "all": CAL_PHOTOS + EVAL_PHOTOS,
    "calibration": CAL_PHOTOS,
    "evaluation": EVAL_PHOTOS,
}
#: Smallest and largest ``--size`` (px) and the most ``--count`` crops.
MIN_SIZE, MAX_SIZE, MAX_COUNT = 8, 4096, 1_000_000


def photo(name: str) -> torch.Tensor:
    """A sample photo of ``skimage.data`` as ``(3, H, W)`` float in ``[0, 1]``.

    Greyscale photos are repeated to three channels, an alpha channel is dropped.
    """
    from skimage import data

    a = np.asarray(getattr(data, name)())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    a = a[..., :3]
    t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
    return t / 255.0 if a.dtype == np.uint8 else t.clamp(0, 1)


def iter_crops(names: Sequence[str], n: int, size: int, seed: int) -> Iterator[torch.Tensor]:
    """``n`` random square crops of the photos, ``size`` px, one ``(1, 3, size, size)`` at a time.

    Crop ``i`` comes from photo ``names[i % len(names)]``: a square of 35-100% of its short
    side at a random place, resized (bilinear, antialiased) and flipped left-right with
    probability 0.5, all drawn from ``numpy.random.default_rng(seed)``. Values in ``[0, 1]``.
    """
    rng = np.random.default_rng(seed)
    photos = [photo(p) for p in names]
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[1:]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        c = p[:, top : top + side, left : left + side][None]
        c = F.interpolate(c, size=(size, size), mode="bilinear", antialias=True)
        if rng.random() < 0.5:
            c = c.flip(-1)
        yield c


def crop_photos(names: Sequence[str], n: int, size: int, seed: int) -> torch.Tensor:
    """:func:`iter_crops` as one ``(n, 3, size, size)`` tensor in ``[0, 1]``."""
    return torch.cat(list(iter_crops(names, n, size, seed)))


def write_photos(
    out: str | Path, *, count: int, size: int, seed: int = 0, photos: str = "all"
) -> list[Path]:
    """Writes ``count`` crops (:func:`crop_photos`) as PNG files into the new folder ``out``.

    Returns:
        The files written, in order.

    Raises:
        InputError: Bad arguments, scikit-image missing, or ``out`` is a file or a folder
            that is not empty; nothing is written then.
    """
    from PIL import Image

    out = Path(out)
    _check(out, count=count, size=size, photos=photos)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        width = max(5, len(str(count - 1)))
        names = [f"{i:0{width}d}.png" for i in range(count)]
        crops = iter_crops(PHOTO_SETS[photos], count, size, seed)
        for name, c in zip(names, crops, strict=True):
            a = (c[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(a).save(tmp / name)
        if out.is_dir():
            out.rmdir()  # empty, checked above; the rename needs the name free
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out / name for name in names]


def _check(out: Path, *, count: int, size: int, photos: str) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise InputError(f"--count: {count} crops; give a number from 1 to {MAX_COUNT}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"--size: {size} px; give a side from {MIN_SIZE} to {MAX_SIZE} px")
    if photos not in PHOTO_SETS:
        raise InputError(f"--photos: {photos!r}; choose one of {', '.join(PHOTO_SETS)}")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {str(out)!r} is a file; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise InputError(
            f"--out: folder {str(out)!r} is not empty; give a new or empty folder (a label-free "
            "study reads every image in it)"
        )
    if importlib.util.find_spec("skimage") is None:
        raise InputError(
            "scikit-image is not installed (its sample photos are the source); "
            "pip install scikit-image, or pip install -e '.[real]'"
        )


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2: bad input, one line on stderr)."""
    parser = _OneLineParser(
        prog="python -m tools.sample_photos",
        description="Write random crops of scikit-image's sample photos as PNG files.",
    )
    parser.add_argument("--out", required=True, help="a new or empty folder for the PNG files")
    parser.add_argument("--count", type=int, default=600, help="crops to write (default 600)")
    parser.add_argument("--size", type=int, default=256, help="crop side in px (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the crops (default 0)")
    parser.add_argument(
        "--photos",
        default="all",
        help="which photos: all (default), calibration or evaluation (disjoint sets)",
    )
    args = parser.parse_args(argv)
    try:
        files = write_photos(
            args.out, count=args.count, size=args.size, seed=args.seed, photos=args.photos
        )
    except InputError as e:
        print(f"python -m tools.sample_photos: error: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(files)} crops of {len(PHOTO_SETS[args.photos])} scikit-image photos "
        f"({args.size} px PNG, seed {args.seed}) to {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
