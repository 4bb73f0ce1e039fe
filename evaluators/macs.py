"""MACs (multiply-accumulates); parameter counts are in :mod:`evaluators.params`.

fvcore's "flops" are MACs. It traces the model with TorchScript and counts matmuls,
convolutions, linear layers, norms, pooling and upsampling with its own handles. It has no
handle for ``aten::scaled_dot_product_attention``, which timm ViTs use by default, so this
module registers one: ``B * H * N * M * (d_qk + d_v)`` MACs for ``Q @ K^T`` and
``softmax(.) @ V``, and handles for the resampling it lacks (:data:`RESAMPLING_OPS`).

Ops that are ignored, and why (:data:`NO_MAC_OPS`, an explicit allow-list): element-wise
arithmetic and activations (``add``, ``mul``, ``addcmul``, ``div``, ``gelu``, ``relu``,
``hardtanh``, ``softmax``, ``sigmoid``, ...) are not multiply-accumulates in this convention
and are negligible next to the layers around them; max and windowed average pooling are
comparisons and additions; shape and scalar ops (``reshape_as``, ``ceil`` of TF-"same"
padding, ``pad``, ...) carry no compute. fvcore ignores further shape ops on its own
(``view``, ``cat``, ``expand``, ...). This matches the convention of the published figures
(resnet18 1.819 G, deit_tiny 1.258 G at 224 px). The list holds every such op that the zoo's
ResNets and ViTs, the tiny test anchors of every family and a sample of timm models
(EfficientNet-Lite, MobileNetV3, RegNet, GhostNet, DenseNet, MobileViT, Swin, EfficientViT,
LeViT, VGG, Inception) trace to.

**No silent zeros.** Any other operator fvcore has no handle for (its ``unsupported_ops()``)
would count as zero MACs, so :func:`count_macs` refuses it: :class:`UncountedOpsError` names
the operators and the model. Some do carry multiply-accumulates (ConvNeXt-V2's
``aten::linalg_vector_norm``, a sum of squares); a study that accepts counting them as zero
lists them (``macs: {allow_unsupported: [...]}``), and the trial records which it met
(:attr:`CandidateResult.macs_uncounted`). Only the fvcore backend checks.

``backend="torch"`` counts with ``torch.utils.flop_counter.FlopCounterMode`` instead
(``flops / 2``), given a mapping for the CPU attention kernel it does not know. It counts
only matrix products and convolutions (no norms, pooling or resampling), so it is a few
tenths of a percent below fvcore for ResNets and ViTs and a few percent below for
EfficientNet/MobileNet (squeeze-excitation pooling and BatchNorm); fvcore stays the
reference.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from space import InputError

if TYPE_CHECKING:
    from space import Anchor, StitchedNet

MacsBackend = Literal["fvcore", "torch"]

#: Operators fvcore has no handle for that carry no multiply-accumulates by nature (see the
#: module docstring); they count as zero without being reported.
NO_MAC_OPS = (
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
    "aten::addcmul",
    "aten::hardtanh",
    "aten::hardtanh_",
    "aten::max_pool1d",
    "aten::max_pool2d",
    "aten::max_pool3d",
    "aten::avg_pool1d",
    "aten::avg_pool2d",
    "aten::avg_pool3d",
    "aten::ceil",
    "aten::reshape_as",
    "aten::view_as",
)

#: ``allow_unsupported`` that accepts every operator: for re-measuring a figure a study has
#: already accepted (``--check`` of an export) or ranking anchors, never for a search.
ANY_OP = "*"


class UncountedOpsError(InputError):
    """fvcore has no handle for operators of a model, which would count as zero MACs."""


@dataclass(frozen=True)
class MacsCount:
    """An fvcore count and the operators it could not count.

    Attributes:
        total: Multiply-accumulates of the counted operators.
        uncounted: Operators fvcore has no handle for (counted as zero), outside
            :data:`NO_MAC_OPS`, with the number of calls of each.
    """

    total: int
    uncounted: Mapping[str, int]

    def check(self, allow: Collection[str], label: str) -> dict[str, int]:
        """The uncounted operators, when ``allow`` lists every one of them.

        Args:
            allow: Operators a study accepts counting as zero (:data:`ANY_OP`: all).
            label: The model, for the message (an anchor or candidate label).

        Returns:
            The uncounted operators with their calls (empty when there are none).

        Raises:
            UncountedOpsError: An uncounted operator that ``allow`` does not list.
        """
        refused = sorted(op for op in self.uncounted if op not in allow and ANY_OP not in allow)
        if refused:
            calls = ", ".join(f"{op} ({self.uncounted[op]} calls)" for op in refused)
            raise UncountedOpsError(
                f"MACs of {label}: fvcore has no handle for {calls}, which would count as "
                f"zero; if they carry no multiply-accumulates, allow them in the study with "
                f"macs: {{allow_unsupported: [{', '.join(refused)}]}}, else drop the anchor"
            )
        return dict(sorted(self.uncounted.items()))


def _resampling_handle(taps: int) -> Callable[[list[Any], list[Any]], int]:
    """A handle with fvcore's convention for ``upsample_bilinear2d``: ``taps`` MACs per output."""

    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        return taps * prod(outputs[0].type().sizes())

    return handle


#: Resampling operators fvcore has no handle for, priced as fvcore prices
#: ``aten::upsample_bilinear2d`` (4 MACs per output element; bicubic reads 16): a ViT built
#: with ``dynamic_img_size`` resamples its position embedding this way at another
#: resolution (``F.interpolate(..., antialias=True)``).
RESAMPLING_OPS: dict[str, Callable[[list[Any], list[Any]], int]] = {
    "aten::_upsample_bilinear2d_aa": _resampling_handle(4),
    "aten::upsample_bicubic2d": _resampling_handle(16),
    "aten::_upsample_bicubic2d_aa": _resampling_handle(16),
}


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
    allow_unsupported: Collection[str] = (),
    label: str | None = None,
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
        allow_unsupported: Operators without an fvcore handle that may count as zero
            (fvcore only; see the module docstring).
        label: Names the model in an :class:`UncountedOpsError` (default: its class).

    Returns:
        Multiply-accumulates for the whole batch.

    Raises:
        UncountedOpsError: fvcore met an operator it cannot count that neither
            :data:`NO_MAC_OPS` nor ``allow_unsupported`` lists.
    """
    if backend not in ("fvcore", "torch"):
        raise ValueError(f"backend must be 'fvcore' or 'torch', got {backend!r}")
    if backend == "torch":
        x, was_training = _zero_input(model, input_shape, device)
        try:
            return _count_macs_torch(model, x)
        finally:
            model.train(was_training)
    count = fvcore_macs(model, input_shape, device=device)
    count.check(allow_unsupported, label or type(model).__name__)
    return count.total


def _zero_input(
    model: nn.Module, input_shape: Sequence[int], device: torch.device | str | None
) -> tuple[torch.Tensor, bool]:
    """A zero input batch for ``model`` (see :func:`count_macs`); the model put in eval mode.

    Returns:
        The input and whether the model was training.
    """
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
    return x, was_training


def fvcore_macs(
    model: nn.Module, input_shape: Sequence[int], *, device: torch.device | str | None = None
) -> MacsCount:
    """The MACs fvcore counts in one forward pass, and the operators it could not count.

    Args:
        model: The module (run in eval mode, restored afterwards).
        input_shape: As for :func:`count_macs`.
        device: Where to trace (default: the model's device).

    Returns:
        The total and the uncounted operators outside :data:`NO_MAC_OPS`; nothing is
        refused (:meth:`MacsCount.check` decides).
    """
    with warnings.catch_warnings():  # fvcore's import touches the deprecated torch.jit
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    x, was_training = _zero_input(model, input_shape, device)
    # fvcore logs unsupported/uncalled ops at WARNING on every call; they are read below.
    logger = logging.getLogger("fvcore.nn.jit_analysis")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        # fvcore's tracer goes through torch.jit, which warns that it is deprecated.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            analysis = FlopCountAnalysis(model, x)
            analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_handle)
            analysis.set_op_handle(*[a for item in RESAMPLING_OPS.items() for a in item])
            analysis.set_op_handle(*[a for op in NO_MAC_OPS for a in (op, None)])
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = int(analysis.total())
            uncounted = {str(op): int(n) for op, n in analysis.unsupported_ops().items()}
    finally:
        logger.setLevel(level)
        model.train(was_training)
    return MacsCount(total=total, uncounted=uncounted)


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


def stitched_macs(
    net: StitchedNet, *, batch_size: int = 1, allow_unsupported: Collection[str] = ()
) -> dict[str, int]:
    """MACs of a stitched network's three parts, each counted on its own.

    Args:
        net: The stitched network.
        batch_size: Images per forward pass.
        allow_unsupported: As for :func:`count_macs`.

    Returns:
        ``{"front": ..., "stitch": ..., "back": ..., "total": ...}``; ``total`` is the sum,
        equal to :func:`count_macs` of the whole network.
    """
    k, j = net.config.front_block, net.config.back_block
    src = net.stitch.src.shape
    dst = net.stitch.dst.shape
    allow = allow_unsupported
    parts = {
        "front": count_macs(
            FrontPart(net.front, k),
            (batch_size, *net.input_size),
            allow_unsupported=allow,
            label=f"{net.front.name!r} blocks [0, {k})",
        ),
        "stitch": stitch_layer_macs(
            net.stitch, src, batch_size=batch_size, allow_unsupported=allow
        ),
        "back": count_macs(
            BackPart(net.back, j),
            (batch_size, *dst),
            allow_unsupported=allow,
            label=f"{net.back.name!r} blocks [{j}, end)",
        ),
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


def stitch_layer_macs(
    layer: nn.Module,
    src_shape: tuple[int, ...],
    *,
    batch_size: int = 1,
    allow_unsupported: Collection[str] = (),
) -> int:
    """MACs of a stitching layer on ``batch_size`` activations of its source cut's shape.

    Args:
        layer: The stitching layer.
        src_shape: Its input's shape without the batch dimension (``FeatureInfo.shape``).
        batch_size: Activations per forward pass.
        allow_unsupported: As for :func:`count_macs`.
    """
    return count_macs(
        _Wrapped(layer, 1 + len(src_shape)),
        (batch_size, *src_shape),
        allow_unsupported=allow_unsupported,
        label=f"the stitching layer {type(layer).__name__}",
    )
