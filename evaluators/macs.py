"""MACs (multiply-accumulates) and parameter counts.

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

``backend="torch"`` counts with ``torch.utils.flop_counter.FlopCounterMode`` instead
(``flops / 2``), given a mapping for the CPU attention kernel it does not know. It counts
only matrix products and convolutions (no norms, pooling or resampling), so it is a few
tenths of a percent below fvcore for ResNets and ViTs and a few percent below for
EfficientNet/MobileNet (squeeze-excitation pooling and BatchNorm); fvcore stays the
reference.

**Parameters of a stitched network** (:func:`stitched_param_counts`) are those its forward
pass actually uses: the front anchor's stem and blocks ``[0, k)``, the stitching layer, the
back anchor's blocks ``[j, n)`` and head. The front anchor's head and the back anchor's
stem do not count. "Used" is decided structurally, by which parameters receive a gradient
(``autograd.grad(..., allow_unused=True)``) from one forward pass of each part, so it holds
for every timm family without per-family bookkeeping; a tensor used by both halves of a
self-stitch counts once.
"""

from __future__ import annotations

import logging
import warnings
import weakref
from collections.abc import Sequence
from math import prod
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from space import Anchor, StitchedNet

MacsBackend = Literal["fvcore", "torch"]

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


def _sdpa_cpu_flops(
    q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int], *args: Any, **kw: Any
) -> int:
    batch = prod(q_shape[:-2])
    n, d_qk = q_shape[-2], q_shape[-1]
    return int(2 * batch * n * k_shape[-2] * (d_qk + v_shape[-1]))


def _count_macs_torch(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        model(x)
    return int(counter.get_total_flops()) // 2


def count_macs(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    device: torch.device | str | None = None,
    backend: MacsBackend = "fvcore",
) -> int:
    """Counts the MACs of one forward pass.

    Works on any module, a :class:`space.StitchedNet` included (the stitching layer and only
    the blocks that actually run are counted).

    Args:
        model: The module; it is run in eval mode and restored to its mode afterwards.
        input_shape: ``(B, C, H, W)`` or ``(C, H, W)`` (batch 1). Modules with an
            ``input_rank`` attribute (:class:`BackPart` at a token cut) take ``(L, C)`` or
            ``(B, L, C)``.
        device: Where to trace (default: the model's device).
        backend: ``"fvcore"`` (the reference) or ``"torch"`` (FlopCounterMode; see the
            module docstring).

    Returns:
        Multiply-accumulates for the whole batch.
    """
    with warnings.catch_warnings():  # fvcore's import touches the deprecated torch.jit
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    if backend not in ("fvcore", "torch"):
        raise ValueError(f"backend must be 'fvcore' or 'torch', got {backend!r}")
    shape = tuple(input_shape)
    if _needs_batch(model, shape):
        shape = (1, *shape)
    param = next(model.parameters(), None)
    if device is None:
        device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    x = torch.zeros(shape, device=device, dtype=dtype)
    was_training = model.training
    model.eval()
    if backend == "torch":
        try:
            return _count_macs_torch(model, x)
        finally:
            model.train(was_training)
    # fvcore logs unsupported/uncalled ops at WARNING on every call.
    logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # fvcore's tracer goes through torch.jit, which warns that it is deprecated.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
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


def _needs_batch(model: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` lacks the batch dimension.

    Modules with an ``input_rank`` attribute (the part wrappers below, whose inputs may be
    token sequences) say how many dimensions a batched input has; for any other module a
    3-dim shape is ``(C, H, W)``.
    """
    rank = getattr(model, "input_rank", None)
    if rank is not None:
        return len(shape) == rank - 1
    return len(shape) == 3


class FrontPart(nn.Module):
    """The front half of a stitch: an anchor's stem and blocks ``[0, k)`` (for counting).

    Args:
        anchor: The anchor.
        k: The cut.
    """

    def __init__(self, anchor: Anchor, k: int) -> None:
        super().__init__()
        self.model = anchor.model
        self._anchor = anchor
        self.k = k
        self.input_rank = 4
        self.eval()  # so that helpers restoring "the previous mode" keep the anchor in eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._anchor.forward_front(x, self.k)


class BackPart(nn.Module):
    """The back half of a stitch: an anchor's blocks ``[j, n)`` and head (for counting).

    Args:
        anchor: The anchor.
        j: The cut.
    """

    def __init__(self, anchor: Anchor, j: int) -> None:
        super().__init__()
        self.model = anchor.model
        self._anchor = anchor
        self.j = j
        self.input_rank = 1 + len(anchor.feature_info(j).shape)
        self.eval()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self._anchor.forward_back(h, self.j)


def stitched_macs(net: StitchedNet, *, batch_size: int = 1) -> dict[str, int]:
    """MACs of a stitched network's three parts, each counted on its own.

    Args:
        net: The stitched network.
        batch_size: Images per forward pass.

    Returns:
        ``{"front": ..., "stitch": ..., "back": ..., "total": ...}``; ``total`` is the sum,
        equal to :func:`count_macs` of the whole network.
    """
    k, j = net.config.front_block, net.config.back_block
    src = net.stitch.src.shape
    dst = net.stitch.dst.shape
    parts = {
        "front": count_macs(FrontPart(net.front, k), (batch_size, *net.input_size)),
        "stitch": stitch_layer_macs(net.stitch, src, batch_size=batch_size),
        "back": count_macs(BackPart(net.back, j), (batch_size, *dst)),
    }
    parts["total"] = sum(parts.values())
    return parts


class _Wrapped(nn.Module):
    def __init__(self, module: nn.Module, rank: int) -> None:
        super().__init__()
        self.module = module
        self.input_rank = rank
        self.train(module.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def stitch_layer_macs(layer: nn.Module, src_shape: tuple[int, ...], *, batch_size: int = 1) -> int:
    """MACs of a stitching layer on ``batch_size`` activations of its source cut's shape.

    Args:
        layer: The stitching layer.
        src_shape: Its input's shape without the batch dimension (``FeatureInfo.shape``).
        batch_size: Activations per forward pass.
    """
    return count_macs(_Wrapped(layer, 1 + len(src_shape)), (batch_size, *src_shape))


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
