"""ONNX export of an exported network, checked in onnxruntime against PyTorch.

:func:`write_onnx` writes ONNX (opset :data:`DEFAULT_OPSET` by default) with a dynamic batch
axis: input ``images`` ``(batch, C, H, W)``, output ``logits`` ``(batch, classes)``. It uses
PyTorch's TorchScript-based exporter (``dynamo=False``; the dynamo exporter needs
``onnxscript``) and checks the file in onnxruntime against PyTorch at batch sizes 1 and 3
(max absolute difference at most :data:`ONNX_ATOL`). Area resampling to a grid that does
not divide the source grid (``adaptive_avg_pool2d``, e.g. 7x7 -> 4x4 in a stitching layer),
which that exporter rejects, is written as two constant matrix products instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from space import EXPORT_FORMAT, LoadedExport, read_export
from space.files import atomic_path

#: ONNX opset written by default: 17 has LayerNormalization as one op (ViTs, ConvNeXt) and
#: is read by onnxruntime >= 1.13, TensorRT >= 8.6 and OpenVINO >= 2022.3.
DEFAULT_OPSET = 17

#: Largest absolute logit difference between onnxruntime and PyTorch that passes.
ONNX_ATOL = 1e-4

#: Batch sizes the ONNX file is checked at (two, to prove the batch axis is dynamic).
VERIFY_BATCHES = (1, 3)


def _pool_matrix(n: int, m: int, dtype: torch.dtype) -> torch.Tensor:
    """``(m, n)`` matrix of adaptive average pooling from ``n`` to ``m`` cells.

    Row ``i`` averages PyTorch's window ``[floor(i n / m), ceil((i + 1) n / m))``.
    """
    a = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        start, end = (i * n) // m, -((-(i + 1) * n) // m)
        a[i, start:end] = 1.0 / (end - start)
    return a.to(dtype)


_ONNX_DTYPES = {"Float": torch.float32, "Double": torch.float64, "Half": torch.float16}


def _adaptive_avg_pool2d(g: Any, x: Any, output_size: Any) -> Any:
    """ONNX for ``adaptive_avg_pool2d`` at any output size (the built-in needs divisors)."""
    from torch.onnx.symbolic_helper import _maybe_get_const

    out = _maybe_get_const(output_size, "is")
    if not isinstance(out, list | tuple) or len(out) != 2:
        raise RuntimeError("ONNX export of adaptive_avg_pool2d needs a constant output size")
    oh, ow = (int(v) for v in out)
    if (oh, ow) == (1, 1):
        return g.op("GlobalAveragePool", x)
    try:
        sizes = list(x.type().varyingSizes() or [])
    except RuntimeError:
        sizes = []
    if len(sizes) != 4 or None in sizes[2:]:
        raise RuntimeError(
            f"ONNX export of adaptive_avg_pool2d to {oh}x{ow} needs a static spatial input size"
        )
    h, w = sizes[2:]
    if h % oh == 0 and w % ow == 0:
        k = [h // oh, w // ow]
        return g.op("AveragePool", x, kernel_shape_i=k, strides_i=k)
    dtype = _ONNX_DTYPES.get(x.type().scalarType(), torch.float32)
    rows = g.op("Constant", value_t=_pool_matrix(h, oh, dtype))  # (oh, h)
    cols = g.op("Constant", value_t=_pool_matrix(w, ow, dtype).T.contiguous())  # (w, ow)
    return g.op("MatMul", g.op("MatMul", rows, x), cols)  # (B, C, oh, ow)


@contextlib.contextmanager
def _onnx_symbolics(opset: int) -> Iterator[None]:
    """Registers the any-size adaptive average pooling for one export, then removes it."""
    name = "aten::adaptive_avg_pool2d"
    torch.onnx.register_custom_op_symbolic(name, _adaptive_avg_pool2d, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(name, opset)


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    """Sends file descriptors 1 and 2 to a discarded file for the duration.

    PyTorch's TorchScript exporter always turns its C++ log on and dumps the whole TorchScript
    graph to stderr when an export fails; the error itself is still raised.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        for fd in saved:
            os.close(fd)


def export_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    *,
    input_size: Sequence[int],
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Writes a module as ONNX with a dynamic batch axis.

    Args:
        model: Images ``(B, C, H, W)`` -> logits; exported in eval mode on the CPU (a copy is
            not made: the module is moved to the CPU and set to eval mode).
        onnx_path: The ``.onnx`` file to write (replaced atomically).
        input_size: ``(C, H, W)`` of one image.
        opset: ONNX opset version (>= 14 for timm's attention).
        metadata: Key-value pairs stored in the file's ``metadata_props``.

    Returns:
        The written path.

    Raises:
        ValueError: A bad opset, or PyTorch could not export the module (the first line of
            its error).
    """
    try:
        import onnx
    except ImportError:
        raise ValueError(
            "the onnx package is not installed; pip install 'stitchsearch[onnx]'"
        ) from None
    if isinstance(opset, bool) or not isinstance(opset, int) or not 14 <= opset <= 20:
        raise ValueError(f"opset must be an integer in 14..20, got {opset!r}")
    onnx_path = Path(onnx_path)
    model = model.cpu().eval()
    x = torch.zeros((2, *input_size))  # batch 2, so that no size-1 broadcast gets baked in
    try:
        with atomic_path(onnx_path) as tmp:
            with warnings.catch_warnings(), _onnx_symbolics(opset), _quiet_fds(), torch.no_grad():
                warnings.simplefilter("ignore")  # TorchScript exporter deprecation, tracer notes
                torch.onnx.export(
                    model,
                    (x,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                    do_constant_folding=True,
                )
            proto = onnx.load(str(tmp))
            onnx.checker.check_model(proto)
            for key, value in (metadata or {}).items():
                entry = proto.metadata_props.add()
                entry.key, entry.value = key, str(value)
            onnx.save(proto, str(tmp))
    except Exception as e:
        if isinstance(e, ValueError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(
            f"ONNX export to {str(onnx_path)!r} failed ({type(e).__name__}: {first[:300]})"
        ) from None
    return onnx_path


def verify_onnx(
    model: nn.Module,
    onnx_path: str | Path,
    *,
    input_size: Sequence[int],
    batch_sizes: Sequence[int] = VERIFY_BATCHES,
    seed: int = 0,
) -> float:
    """Runs an ONNX file in onnxruntime and PyTorch on the same random images.

    Args:
        model: The PyTorch module the file was exported from.
        onnx_path: The ONNX file.
        input_size: ``(C, H, W)`` of one image.
        batch_sizes: Batch sizes to run (several prove the dynamic batch axis).
        seed: Seed of the random images.

    Returns:
        The largest absolute difference of the logits over all batch sizes.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError(
            "onnxruntime is not installed, so the ONNX file cannot be verified; "
            "pip install 'stitchsearch[onnx]' or skip the verification (--no-verify)"
        ) from None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    model = model.cpu().eval()
    for b in batch_sizes:
        x = torch.randn((b, *input_size), generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        (out,) = session.run(["logits"], {"images": x.numpy()})
        if out.shape != ref.shape:
            raise ValueError(
                f"ONNX {str(onnx_path)!r} returned logits {out.shape} for batch {b}, "
                f"PyTorch {ref.shape}"
            )
        worst = max(worst, float(abs(out - ref).max()))
    return worst


def onnx_metadata(loaded: LoadedExport) -> dict[str, str]:
    """The key-value pairs :func:`write_onnx` stores in the file's ``metadata_props``."""
    doc = loaded.manifest
    return {
        "stitchsearch.format": EXPORT_FORMAT,
        "stitchsearch.device": str(doc["device"]),
        "stitchsearch.label": str(doc["label"]),
        "stitchsearch.manifest": loaded.path.name,
        "stitchsearch.manifest_sha256": hashlib.sha256(loaded.path.read_bytes()).hexdigest(),
        "stitchsearch.input_size": ",".join(str(v) for v in loaded.input_size),
        "stitchsearch.data": str(doc["data"].get("name", "")),
    }


def write_onnx(
    export_json: str | Path,
    onnx_path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
) -> Path:
    """Writes the network of an export as ONNX with a dynamic batch axis.

    Args:
        export_json: The export's manifest (``exports/<device>.json``).
        onnx_path: The ``.onnx`` file to write.
        opset: ONNX opset version.
        verify: Check the file in onnxruntime against PyTorch at batch sizes 1 and 3.

    Returns:
        The written path.

    Raises:
        ExportError: The export is invalid (see :func:`space.load_export`).
        ValueError: The export to ONNX failed, or onnxruntime's logits differ from
            PyTorch's by more than :data:`ONNX_ATOL`.
    """
    loaded = read_export(export_json)
    size = loaded.input_size
    path = export_onnx(
        loaded.model, onnx_path, input_size=size, opset=opset, metadata=onnx_metadata(loaded)
    )
    if verify:
        diff = verify_onnx(loaded.model, path, input_size=size)
        if not diff <= ONNX_ATOL:
            raise ValueError(
                f"ONNX {str(path)!r}: onnxruntime's logits differ from PyTorch's by up to "
                f"{diff:.3g} (> {ONNX_ATOL:g}); the file is kept for inspection"
            )
    return path
