"""MACs (multiply-accumulates) and parameter counts with fvcore.

fvcore's "flops" are MACs. It traces the model with TorchScript and counts matmuls,
convolutions, linear layers, norms, pooling and upsampling with its own handles. It has no
handle for ``aten::scaled_dot_product_attention``, which timm ViTs use by default, so this
module registers one: ``B * H * N * M * (d_qk + d_v)`` MACs for ``Q @ K^T`` and
``softmax(.) @ V``.

Ops that remain ignored, and why: element-wise arithmetic and activations (``add``, ``mul``,
``div``, ``gelu``, ``relu``, ``softmax``, ``sigmoid``, ...) are not multiply-accumulates and
are negligible next to the layers around them; shape ops (``reshape``, ``cat``, ``expand``,
...) carry no compute. This matches the convention of the published figures (resnet18
1.819 G, deit_tiny 1.258 G at 224 px).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from math import prod
from typing import Any

import torch
from torch import nn

_IGNORED_OPS = (
    "aten::add",
    "aten::add_",
    "aten::mul",
    "aten::mul_",
    "aten::div",
    "aten::sub",
    "aten::rsub",
    "aten::gelu",
    "aten::relu",
    "aten::relu_",
    "aten::silu",
    "aten::silu_",
    "aten::hardswish",
    "aten::hardswish_",
    "aten::hardsigmoid",
    "aten::sigmoid",
    "aten::softmax",
    "aten::mean",
    "aten::dropout",
    "aten::clamp_min",
    "aten::expand_as",
    "aten::pad",
)


def _sdpa_handle(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(inputs[i]) for i in range(3))
    batch = prod(q[:-2])
    n, d_qk = q[-2], q[-1]
    m, d_v = k[-2], v[-1]
    return int(batch * n * m * (d_qk + d_v))


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> int:
    """Counts the MACs of one forward pass with fvcore.

    Works on any module, a :class:`space.StitchedNet` included (the stitching layer and only
    the blocks that actually run are counted).

    Args:
        model: The module; it is run in eval mode and restored to its mode afterwards.
        input_shape: ``(B, C, H, W)`` or ``(C, H, W)`` (batch 1).
        device: Where to trace (default: the model's device).

    Returns:
        Multiply-accumulates for the whole batch.
    """
    from fvcore.nn import FlopCountAnalysis

    shape = tuple(input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    # fvcore logs unsupported/uncalled ops at WARNING on every call.
    logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad():
            analysis = FlopCountAnalysis(model, x)
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
            analysis.set_op_handle(*[a for op in _IGNORED_OPS for a in (op, None)])
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = int(analysis.total())
    finally:
        logger.setLevel(level)
        model.train(was_training)
    return total


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
