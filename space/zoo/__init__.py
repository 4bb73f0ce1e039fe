"""The default anchor zoo: timm models trained on Fashion-MNIST, shipped with the package.

Zoo anchors are loaded by name wherever an anchor name is accepted: ``zoo:resnet-s``,
``zoo:resnet-l``, ``zoo:vit-s``, ``zoo:vit-l``. ``python -m space.zoo list`` prints them;
``python -m space.zoo train`` reproduces them (see :mod:`space.zoo.recipes`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from space.errors import close_matches

ZOO_DIR = Path(__file__).resolve().parent
MANIFEST = ZOO_DIR / "manifest.json"


@lru_cache(maxsize=1)
def _read_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(
            f"the zoo manifest {str(path)!r} is missing; reinstall stitchsearch or run "
            "`python -m space.zoo train`"
        )
    return json.loads(path.read_text())


def manifest() -> dict[str, Any]:
    """The zoo manifest: per anchor its timm architecture, kwargs, metrics and sha256."""
    return _read_manifest(MANIFEST)


def zoo_names() -> list[str]:
    """Names of the zoo anchors (without the ``zoo:`` prefix)."""
    return sorted(manifest()["anchors"])


def load_zoo_anchor(name: str):
    """Loads zoo anchor ``name`` (without ``zoo:``), verifying its weights' sha256.

    Raises:
        ValueError: Unknown name (close matches suggested) or weights that do not match the
            manifest.
    """
    from space.anchor import file_sha256, load_anchor

    entries = manifest()["anchors"]
    if name not in entries:
        known = [f"zoo:{n}" for n in sorted(entries)]
        raise ValueError(
            f"unknown zoo anchor 'zoo:{name}'; the zoo has {', '.join(known)}"
            + close_matches(f"zoo:{name}", known)
        )
    entry = entries[name]
    weights = ZOO_DIR / entry["weights"]
    digest = file_sha256(weights) if weights.is_file() else None
    if digest != entry["sha256"]:
        raise ValueError(
            f"zoo weights {str(weights)!r} are missing or altered (sha256 {digest} != manifest "
            f"{entry['sha256']}); reinstall stitchsearch or run `python -m space.zoo train`"
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in entry["timm_kwargs"].items()}
    anchor = load_anchor(
        entry["timm_name"], checkpoint=weights, input_size=tuple(entry["input_size"]), **kwargs
    )
    anchor.name = f"zoo:{name}"
    anchor._checkpoint_sha256 = digest
    return anchor
