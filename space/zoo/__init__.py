"""The default anchor zoo: timm models trained on Fashion-MNIST, shipped with the package.

Zoo anchors are loaded by name wherever an anchor name is accepted: ``zoo:resnet-s``,
``zoo:resnet-l``, ``zoo:vit-s``, ``zoo:vit-l``. ``python -m space.zoo list`` prints them;
``python -m tools.train_zoo`` reproduces them.

This package only reads the zoo's manifest: :func:`resolve` turns ``zoo:<name>`` into a
:class:`ZooEntry` (architecture and verified weights) and :func:`space.load_anchor` builds the
anchor from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from space.errors import InputError, close_matches
from space.files import file_sha256

ZOO_DIR = Path(__file__).resolve().parent
MANIFEST = ZOO_DIR / "manifest.json"

#: The prefix of zoo anchor names.
PREFIX = "zoo:"

#: The command that (re)trains the zoo.
TRAIN_COMMAND = "python -m tools.train_zoo"


@dataclass(frozen=True)
class ZooEntry:
    """One zoo anchor: what :func:`space.load_anchor` needs to build it.

    Attributes:
        name: The anchor's name, ``zoo:<name>``.
        family: The family recorded in the manifest (``"resnet"``, ``"vit"``).
        timm_name: The timm model name.
        timm_kwargs: Keyword arguments for ``timm.create_model`` (JSON lists as tuples).
        input_size: ``(C, H, W)`` the anchor runs at.
        checkpoint: The weights file (``.safetensors``).
        sha256: The weights' SHA-256, checked against the file by :func:`resolve`.
        data_config: How the anchor's inputs are prepared, as timm data-config entries
            (``mean``, ``std``, ``crop_pct``, ``interpolation``): the training data's
            normalisation, set as the model's ``pretrained_cfg`` so that image-folder data is
            prepared as in training. Empty for a manifest that records none.
    """

    name: str
    family: str
    timm_name: str
    timm_kwargs: dict[str, Any]
    input_size: tuple[int, int, int]
    checkpoint: Path
    sha256: str
    data_config: dict[str, Any]


@lru_cache(maxsize=1)
def _read_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(
            f"the zoo manifest {str(path)!r} is missing; reinstall stitchsearch or run "
            f"`{TRAIN_COMMAND}`"
        )
    return json.loads(path.read_text())


def manifest() -> dict[str, Any]:
    """The zoo manifest: per anchor its timm architecture, kwargs, metrics and sha256."""
    return _read_manifest(MANIFEST)


def zoo_names() -> list[str]:
    """Names of the zoo anchors (without the ``zoo:`` prefix)."""
    return sorted(manifest()["anchors"])


def resolve(name: str) -> ZooEntry:
    """The zoo entry of ``zoo:<name>``, its weights verified by SHA-256.

    Args:
        name: ``zoo:<name>`` (the bare ``<name>`` is accepted too).

    Raises:
        InputError: Unknown name (close matches suggested), or weights that are missing or
            do not match the manifest.
    """
    short = name.removeprefix(PREFIX)
    entries = manifest()["anchors"]
    if short not in entries:
        known = [f"{PREFIX}{n}" for n in sorted(entries)]
        raise InputError(
            f"unknown zoo anchor '{PREFIX}{short}'; the zoo has {', '.join(known)}"
            + close_matches(f"{PREFIX}{short}", known)
        )
    entry = entries[short]
    weights = ZOO_DIR / entry["weights"]
    digest = file_sha256(weights) if weights.is_file() else None
    if digest != entry["sha256"]:
        raise InputError(
            f"zoo weights {str(weights)!r} are missing or altered (sha256 {digest} != manifest "
            f"{entry['sha256']}); reinstall stitchsearch or run `{TRAIN_COMMAND}`"
        )
    return ZooEntry(
        name=f"{PREFIX}{short}",
        family=entry["family"],
        timm_name=entry["timm_name"],
        timm_kwargs={
            k: tuple(v) if isinstance(v, list) else v for k, v in entry["timm_kwargs"].items()
        },
        input_size=tuple(entry["input_size"]),
        checkpoint=weights,
        sha256=digest,
        data_config={
            k: tuple(v) if isinstance(v, list) else v
            for k, v in entry.get("data_config", {}).items()
        },
    )
