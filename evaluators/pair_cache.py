"""One disk cache for what is computed per ordered anchor pair: CKA matrices, pruning signals.

An **entry** is a file of named matrices (``.npy`` for one matrix, ``.npz`` for several)
plus a ``.json`` sidecar saying what was computed, both written atomically. Its file name
holds the two anchors' names and a digest of its **key**: everything the result depends on
(a version bumped when the computation changes, both anchors' identities, the input sizes
the pair runs at, the data's identity, the number of images and the batch size, and what
the caller adds). A damaged entry, or one of another shape, reads as missing, so it is
recomputed and overwritten.

Identities: :func:`anchor_identity` names an anchor's architecture and weights,
:func:`loader_identity` an in-memory loader's images; without a data identity the cache is
off.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from space import Anchor, back_input_size
from space.files import atomic_path, atomic_write

#: What a damaged entry raises when read.
_DAMAGED = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/stitchsearch/cka`` (``~/.cache/stitchsearch/cka`` by default)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "stitchsearch" / "cka"


def loader_identity(loader: Any) -> str | None:
    """A content hash of an in-memory loader (images, labels, settings), else its ``identity``.

    Returns ``None`` when the loader can be identified by neither (caching is then off).
    """
    ident = getattr(loader, "identity", None)
    if isinstance(ident, str):
        return ident
    images = getattr(loader, "images", None)
    if not isinstance(images, torch.Tensor):
        return None
    h = hashlib.sha256()
    for t in (images, getattr(loader, "labels", torch.zeros(0))):
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for attr in ("mean", "std", "input_size", "batch_size", "shuffle"):
        h.update(f"{attr}={getattr(loader, attr, None)!r}".encode())
    return "arrays-" + h.hexdigest()[:24]


_IDENTITIES: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def anchor_identity(anchor: Anchor) -> str:
    """:attr:`space.Anchor.identity` (name and checkpoint or weights SHA-256), kept per anchor.

    Hashing an anchor's weights takes a while; the result is cached per anchor object.
    """
    if anchor not in _IDENTITIES:
        _IDENTITIES[anchor] = anchor.identity
    return _IDENTITIES[anchor]


def cached_data_identity(
    loader: Any, data_identity: str | None, use_cache: bool = True
) -> str | None:
    """The data identity an entry is keyed by: the given one, else the loader's.

    Returns ``None`` when the cache is off (``use_cache`` false, or no identity).
    """
    if not use_cache:
        return None
    return data_identity if data_identity is not None else loader_identity(loader)


def pair_key(
    front: Anchor,
    back: Anchor,
    *,
    version: int,
    data_identity: str,
    num_images: int | None,
    batch_size: int | None,
    **fields: Any,
) -> dict[str, Any]:
    """The key of an ordered pair's entry: what every entry depends on, and ``fields``."""
    return {
        "version": version,
        "front": anchor_identity(front),
        "back": anchor_identity(back),
        "front_input": list(front.input_size),
        "back_input": list(back_input_size(front, back)),
        "data": data_identity,
        "num_images": num_images,
        "batch_size": batch_size,
        **fields,
    }


def entry_path(
    cache_dir: str | Path | None, name_parts: Sequence[str], key: Mapping[str, Any], suffix: str
) -> Path:
    """``<cache_dir>/<part>--<part>--...--<digest of key><suffix>``.

    Args:
        cache_dir: The cache directory (default :func:`default_cache_dir`).
        name_parts: What the file name starts with (the anchors' names, made safe).
        key: The entry's key (:func:`pair_key`); JSON with sorted keys is hashed.
        suffix: ``".npy"`` (one matrix) or ``".npz"`` (several).
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return directory / f"{'--'.join([*name_parts, digest])}{suffix}"


def read_entry(
    path: Path, names: Sequence[str], shape: tuple[int, int], *, finite: bool = False
) -> dict[str, np.ndarray] | None:
    """The matrices of an entry as float64, or ``None`` when it is missing or unusable.

    Args:
        path: The entry (``.npy``: one matrix, read as ``names[0]``; ``.npz``: by name).
        names: The matrices wanted.
        shape: The shape each must have.
        finite: Also refuse an entry with a NaN or infinite value.

    Returns:
        Name -> matrix; ``None`` for a missing, damaged or misshapen entry (it is then
        recomputed and overwritten).
    """
    if not path.is_file():
        return None
    try:
        if path.suffix == ".npy":
            out = {names[0]: np.asarray(np.load(path, allow_pickle=False), dtype=float)}
        else:
            with np.load(path, allow_pickle=False) as z:
                out = {name: np.asarray(z[name], dtype=float) for name in names}
    except _DAMAGED:
        return None
    if any(m.shape != shape or (finite and not np.isfinite(m).all()) for m in out.values()):
        return None
    return out


def entry_meta(front: Anchor, back: Anchor, data_identity: str, **fields: Any) -> dict[str, Any]:
    """An entry's sidecar: both anchors' identities, the data's, then ``fields`` in order."""
    return {
        "front": anchor_identity(front),
        "back": anchor_identity(back),
        "data": data_identity,
        **fields,
    }


def write_entry(path: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Writes an entry's matrices and its ``.json`` sidecar (:func:`entry_meta`), atomically.

    A ``.npy`` entry holds the one matrix of ``arrays``; a ``.npz`` entry all of them.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".npy":
            (matrix,) = arrays.values()
            np.save(f, matrix, allow_pickle=False)
        else:
            np.savez(f, **arrays)
    atomic_write(path.with_suffix(".json"), json.dumps(dict(meta), indent=1))
