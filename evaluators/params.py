"""Parameter counts of anchors and stitched networks.

**Parameters of a stitched network** (:func:`stitched_param_counts`) are those its forward
pass actually uses: the front anchor's stem and blocks ``[0, k)``, the stitching layer, the
back anchor's blocks ``[j, n)`` and head. The front anchor's head and the back anchor's
stem do not count. "Used" is decided structurally, by which parameters receive a gradient
(``autograd.grad(..., allow_unused=True)``) from one forward pass of each part, so it holds
for every timm family without per-family bookkeeping; a tensor used by both halves of a
self-stitch counts once.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from evaluators.macs import BackPart, FrontPart

if TYPE_CHECKING:
    from space import Anchor, StitchedNet


def count_params(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Counts parameters, each shared tensor once.

    Args:
        model: The module.
        trainable_only: Count only parameters with ``requires_grad``.
    """
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def used_parameters(model: nn.Module, inputs: torch.Tensor) -> list[nn.Parameter]:
    """The parameters of ``model`` that one forward pass on ``inputs`` actually uses.

    A parameter is used when the output depends on it structurally (it gets a gradient,
    possibly zero). ``requires_grad`` is switched on for the pass and restored afterwards;
    values are never touched.
    """
    params = list(dict.fromkeys(model.parameters()))
    flags = [p.requires_grad for p in params]
    was_training = model.training
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = model(inputs)
            outs = [t for t in (out if isinstance(out, tuple | list) else [out])]
            total = sum(t.float().sum() for t in outs if isinstance(t, torch.Tensor))
            grads = torch.autograd.grad(total, params, allow_unused=True)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return [p for p, g in zip(params, grads, strict=True) if g is not None]


# Per anchor object: (side, cut, input shape) -> names of the used parameters.
_USED: weakref.WeakKeyDictionary[Any, dict[tuple, frozenset[str]]] = weakref.WeakKeyDictionary()


def _used_names(anchor: Anchor, side: str, cut: int) -> frozenset[str]:
    per = _USED.setdefault(anchor, {})
    key = (side, cut, tuple(anchor.input_size))
    if key not in per:
        param = next(anchor.model.parameters())
        if side == "front":
            part: nn.Module = FrontPart(anchor, cut)
            shape = anchor.input_size
        else:
            part = BackPart(anchor, cut)
            shape = anchor.feature_info(cut).shape
        x = torch.zeros((1, *shape), dtype=param.dtype, device=param.device)
        used = {id(p) for p in used_parameters(part, x)}
        per[key] = frozenset(n for n, p in anchor.model.named_parameters() if id(p) in used)
    return per[key]


def _named(anchor: Anchor, names: frozenset[str]) -> list[nn.Parameter]:
    return [p for n, p in anchor.model.named_parameters() if n in names]


def anchor_used_parameters(anchor: Anchor) -> list[nn.Parameter]:
    """Parameters an anchor's own forward pass uses (stem, all blocks, head)."""
    names = _used_names(anchor, "front", anchor.num_blocks)
    names |= _used_names(anchor, "back", anchor.num_blocks)
    return _named(anchor, names)


def anchor_param_count(anchor: Anchor) -> int:
    """Number of parameters an anchor's own forward pass uses."""
    return sum(p.numel() for p in anchor_used_parameters(anchor))


def stitched_parameters(net: StitchedNet) -> list[nn.Parameter]:
    """Parameters a stitched network's forward pass uses, each once (see the module docs)."""
    k, j = net.config.front_block, net.config.back_block
    params = _named(net.front, _used_names(net.front, "front", k))
    params += list(net.stitch.parameters())
    params += _named(net.back, _used_names(net.back, "back", j))
    return list(dict.fromkeys(params))


def stitched_param_counts(net: StitchedNet) -> dict[str, int]:
    """Parameters of a stitched network that its forward pass uses, by part.

    See the module docstring for what counts.

    Returns:
        ``{"front": ..., "stitch": ..., "back": ..., "total": ...}``; for a self-stitch whose
        halves share tensors, ``total`` counts each once (so it can be below the sum).
    """
    k, j = net.config.front_block, net.config.back_block
    return {
        "front": sum(p.numel() for p in _named(net.front, _used_names(net.front, "front", k))),
        "stitch": count_params(net.stitch),
        "back": sum(p.numel() for p in _named(net.back, _used_names(net.back, "back", j))),
        "total": sum(p.numel() for p in stitched_parameters(net)),
    }
