"""Loading anchors: timm models by name, zoo anchors, and local checkpoint files.

:func:`load_anchor` builds a timm model (seeded, so that every process builds the same
weights), loads a checkpoint into it when one is given and wraps it as a frozen
:class:`space.Anchor`. Checkpoints are read by :func:`read_state_dict`, which never executes
pickled code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from space import zoo
from space.anchor import Anchor, anchor_id_problem
from space.errors import InputError, close_matches
from space.families import family_names, family_of

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")


def read_state_dict(path: str | Path, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Reads a ``.safetensors`` or ``.pth`` state dict without executing pickled code.

    ``.pth`` files are read with ``torch.load(weights_only=True)``; a checkpoint that wraps
    its state dict (``{"state_dict": ...}``, ``{"model": ...}``) is unwrapped and a
    ``module.`` prefix (DataParallel) is stripped.

    Args:
        path: The file.
        what: How to call the file in error messages.

    Raises:
        InputError: The file is missing, unreadable, carries code, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist; pass the path of a local file")
    if path.suffix == ".safetensors":
        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise InputError(
                f"{what} {str(path)!r} is not a readable safetensors file ({e}); is it truncated?"
            ) from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise InputError(
                f"{what} {str(path)!r} was refused: it holds pickled objects other than "
                f"tensors, and loading it could execute code ({first[:160]}); re-save it "
                "as a plain state dict or .safetensors"
            ) from None
        except Exception as e:  # torch raises many types for bad files
            raise InputError(
                f"{what} {str(path)!r} could not be read ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:160] if str(e) else ''}); is it truncated or not a "
                "PyTorch checkpoint?"
            ) from None
    for _ in range(3):
        if isinstance(obj, dict):
            wrapped = [k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)]
            if wrapped:
                obj = obj[wrapped[0]]
    if not isinstance(obj, dict) or not obj:
        raise InputError(f"{what} {str(path)!r} holds no state dict")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"{what} {str(path)!r}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        state[key.removeprefix("module.")] = value
    return state


def _fit_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path
) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        model.load_state_dict(state, strict=True)
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatches (e.g. {'; '.join(mismatched[:3])})")
    hint = "check the model name and timm kwargs (num_classes, img_size, in_chans)"
    head = getattr(model, "default_cfg", {}).get("classifier") or ""
    if mismatched and all(m.startswith(head) for m in mismatched) and head:
        n = state.get(f"{head}.weight")
        if n is not None:
            hint = f"pass num_classes={n.shape[0]}"
    raise InputError(
        f"checkpoint {str(path)!r} does not fit model {name!r}: {'; '.join(parts)}; {hint}"
    )


def load_anchor(
    name: str,
    *,
    anchor_id: str | None = None,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    input_size: tuple[int, int, int] | None = None,
    seed: int | None = 0,
    **timm_kwargs: Any,
) -> Anchor:
    """Loads a timm model as a stitchable :class:`Anchor`.

    Args:
        name: A timm model name (``"resnet18"``, ``"deit_tiny_patch16_224"``, ...) or a zoo
            anchor (``"zoo:resnet-s"``; see ``python -m space.zoo list``).
        anchor_id: The anchor's id (:attr:`Anchor.name`): what keys, labels and exports call
            it, so that two checkpoints of one architecture can be told apart (default:
            ``name``). Not passed to timm.
        checkpoint: A local ``.safetensors`` or ``.pth`` file with timm key names. Pickled
            code is never executed.
        pretrained: Load timm's pretrained weights (needs the model hub).
        input_size: ``(C, H, W)`` the anchor runs at, when not the model's default (CNNs run
            at any size; ViTs take ``img_size=`` in ``timm_kwargs`` instead). Not passed to
            timm.
        seed: Seed of the random initialisation, so that every process builds the same
            weights for an anchor without checkpoint or pretrained weights (``None``: the
            global RNG). Not passed to timm.
        **timm_kwargs: Passed to ``timm.create_model`` (``num_classes``, ``img_size``,
            ``in_chans``, ``depth``, ...).

    Returns:
        The anchor, in eval mode.

    Raises:
        InputError: Unknown model or zoo name (close matches are suggested), unsupported
            family, bad timm kwargs, missing, unreadable or altered checkpoint, or a
            checkpoint that does not fit, or an invalid ``anchor_id``.
    """
    if anchor_id is not None and (problem := anchor_id_problem(anchor_id)) is not None:
        raise InputError(f"model {name!r}: anchor_id {problem}")
    if name.startswith(zoo.PREFIX):
        if checkpoint is not None or pretrained or timm_kwargs or input_size is not None:
            raise InputError(
                f"zoo anchor {name!r} takes no checkpoint, pretrained or timm kwargs; its "
                "weights ship with the package"
            )
        entry = zoo.resolve(name)
        return _create(
            entry.timm_name,
            anchor_name=anchor_id or entry.name,
            model_name=entry.name,
            checkpoint=entry.checkpoint,
            checkpoint_sha256=entry.sha256,
            pretrained=False,
            input_size=entry.input_size,
            seed=0,
            timm_kwargs=entry.timm_kwargs,
            data_config={**entry.data_config, "input_size": entry.input_size},
        )
    return _create(
        name,
        anchor_name=anchor_id or name,
        model_name=name,
        checkpoint=checkpoint,
        checkpoint_sha256=None,
        pretrained=pretrained,
        input_size=input_size,
        seed=seed,
        timm_kwargs=timm_kwargs,
    )


def _create(
    name: str,
    *,
    anchor_name: str,
    model_name: str,
    checkpoint: str | Path | None,
    checkpoint_sha256: str | None,
    pretrained: bool,
    input_size: tuple[int, int, int] | None,
    seed: int | None,
    timm_kwargs: dict[str, Any],
    data_config: dict[str, Any] | None = None,
) -> Anchor:
    """Builds timm model ``name`` and wraps it as the anchor ``anchor_name`` (its id).

    ``model_name`` is the name it was loaded by (``name``, or a zoo anchor's ``zoo:<name>``).

    ``data_config`` (timm data-config entries such as ``mean`` and ``std``) overrides the
    model's ``pretrained_cfg``, which timm's ``resolve_data_config`` reads.
    """
    base = name.split(".", 1)[0]
    if not timm.is_model(name) and not timm.is_model(base):
        raise InputError(
            f"unknown model {name!r}: not in timm's registry"
            + close_matches(base, timm.list_models())
        )
    if checkpoint is not None and pretrained:
        raise InputError(f"model {name!r}: pass either checkpoint= or pretrained=True, not both")
    state = None
    if checkpoint is not None:
        state = read_state_dict(checkpoint)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained, **timm_kwargs)
    except TypeError as e:
        raise InputError(f"model {name!r}: bad timm kwargs {sorted(timm_kwargs)} ({e})") from None
    except (OSError, RuntimeError) as e:
        if pretrained:
            raise InputError(
                f"model {name!r}: timm could not fetch its pretrained weights ({e}); without "
                "internet access pass checkpoint=PATH to a local file instead"
            ) from None
        raise
    if family_of(model) is None:
        raise InputError(
            f"model {name!r} ({type(model).__name__}) is not a supported family; supported: "
            f"{', '.join(family_names())}"
        )
    if state is not None:
        _fit_state_dict(model, state, name, Path(checkpoint))
    if data_config:
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **data_config}
    for p in model.parameters():
        p.requires_grad_(False)
    return Anchor(
        anchor_name,
        model,
        checkpoint=checkpoint,
        pretrained=pretrained,
        timm_kwargs=timm_kwargs,
        checkpoint_sha256=checkpoint_sha256,
        input_size=input_size,
        model_name=model_name,
    )
