"""``python -m search.export``: turn an export into ONNX, or check it against its manifest.

::

    python -m search.export runs/default/exports/edge.json --onnx edge.onnx
    python -m search.export --check runs/default/exports/edge.json [--data DIR]

``--onnx`` writes ONNX (opset :data:`DEFAULT_OPSET` by default) with a dynamic batch axis:
input ``images`` ``(batch, C, H, W)``, output ``logits`` ``(batch, classes)``. It uses
PyTorch's TorchScript-based exporter (``dynamo=False``; the dynamo exporter needs
``onnxscript``) and checks the file in onnxruntime against PyTorch at batch sizes 1 and 3
(max absolute difference at most :data:`ONNX_ATOL`). Area resampling to a grid that does
not divide the source grid (``adaptive_avg_pool2d``, e.g. 7x7 -> 4x4 in a stitching layer),
which that exporter rejects, is written as two constant matrix products instead.

``--check`` rebuilds the network (verifying every file by SHA-256), re-measures test and
validation accuracy on the export's dataset, MACs and parameters, compares them with the
manifest and the device's budget, prints expected vs measured, and exits 1 when anything
differs or does not fit. Latency and memory are not re-measured (they depend on the
machine): the recorded values are checked against the budget. Bad input (a missing file, an
invalid manifest) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from space import EXPORT_FORMAT, ExportError, LoadedExport, check_fields, read_export
from space._io import atomic_path

if TYPE_CHECKING:
    from evaluators import DataSplits
    from search.budgets import DeviceBudget

#: ONNX opset written by default: 17 has LayerNormalization as one op (ViTs, ConvNeXt) and
#: is read by onnxruntime >= 1.13, TensorRT >= 8.6 and OpenVINO >= 2022.3.
DEFAULT_OPSET = 17

#: Largest absolute logit difference between onnxruntime and PyTorch that passes.
ONNX_ATOL = 1e-4

#: Batch sizes the ONNX file is checked at (two, to prove the batch axis is dynamic).
VERIFY_BATCHES = (1, 3)


# ---------------------------------------------------------------------------- ONNX
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


def _onnx_metadata(loaded: LoadedExport) -> dict[str, str]:
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
        loaded.model, onnx_path, input_size=size, opset=opset, metadata=_onnx_metadata(loaded)
    )
    if verify:
        diff = verify_onnx(loaded.model, path, input_size=size)
        if not diff <= ONNX_ATOL:
            raise ValueError(
                f"ONNX {str(path)!r}: onnxruntime's logits differ from PyTorch's by up to "
                f"{diff:.3g} (> {ONNX_ATOL:g}); the file is kept for inspection"
            )
    return path


# ---------------------------------------------------------------------------- check
_DATA_FIELDS = frozenset({"name", "identity", "validation_images", "test_images", "input_size"})
# Optional data fields a newer writer may add: they make the check exact in more cases.
_DATA_OPTIONAL = frozenset({"calibration_images", "batch_size", "seed"})
_METRIC_FIELDS = frozenset(
    {
        "validation",
        "validation_remeasured",
        "test",
        "macs",
        "params",
        "latency_ms",
        "memory_mb",
        "cka",
    }
)
# evaluators.synthetic_splits' identity: classes, (C, H, W), calibration, validation, test, seed.
_SYNTHETIC = re.compile(r"^synthetic-(\d+)-\((\d+), (\d+), (\d+)\)-(\d+)-(\d+)-(\d+)-(-?\d+)$")


@dataclass
class CheckRow:
    """One line of the check's table.

    Attributes:
        metric: What is compared.
        expected: The manifest's value.
        measured: The re-measured value, or None when not re-measured.
        limit: The device's budget for it, or None.
        status: ``"ok"``, ``"DIFFERS"``, ``"OVER BUDGET"`` or ``"recorded"`` (not
            re-measured, within budget).
    """

    metric: str
    expected: float | None
    measured: float | None
    limit: float | None
    status: str


@dataclass
class CheckResult:
    """What ``--check`` found.

    Attributes:
        path: The manifest.
        device: The target device.
        label: The candidate.
        rows: The compared figures.
        problems: One line per figure that differs or does not fit (empty: all good).
    """

    path: Path
    device: str
    label: str
    rows: list[CheckRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether every figure matches and fits the budget."""
        return not self.problems

    def table(self) -> str:
        """The rows as a plain-text table."""

        def fmt(v: float | None, metric: str) -> str:
            if v is None:
                return "-"
            if metric.startswith(("test", "validation")):
                return f"{v:.4f}"
            if float(v).is_integer():
                return str(int(v))
            return f"{v:.4g}"

        lines = [["metric", "manifest", "measured", "budget", "status"]]
        for r in self.rows:
            measured = "not re-measured" if r.status == "recorded" else fmt(r.measured, r.metric)
            lines.append(
                [
                    r.metric,
                    fmt(r.expected, r.metric),
                    measured,
                    fmt(r.limit, r.metric),
                    r.status if r.status != "recorded" else "ok",
                ]
            )
        widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
        out = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(line.rstrip() for line in out)


def _number(path: Path, value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ExportError(path, f"must be a finite number or null, got {value!r}", field=where)
    return value


def _budget(path: Path, doc: Mapping[str, Any]) -> DeviceBudget:
    from search.budgets import BUDGET_COLUMNS, DeviceBudget

    row = doc["budget"]
    check_fields(path, row, frozenset({"device", *BUDGET_COLUMNS}), "budget")
    try:
        budget = DeviceBudget(**row)
    except ValueError as e:
        raise ExportError(path, str(e), field="budget") from None
    if budget.device != doc["device"]:
        raise ExportError(
            path,
            f"is {budget.device!r} but the export is for {doc['device']!r}",
            field="budget.device",
        )
    return budget


def _metrics(path: Path, doc: Mapping[str, Any]) -> dict[str, Any]:
    m = doc["metrics"]
    check_fields(path, m, _METRIC_FIELDS, "metrics")
    for split in ("validation", "validation_remeasured", "test"):
        check_fields(path, m[split], frozenset({"top1", "top5"}), f"metrics.{split}")
        for k in ("top1", "top5"):
            _number(path, m[split][k], f"metrics.{split}.{k}")
    for k in ("macs", "params", "latency_ms", "memory_mb", "cka"):
        _number(path, m[k], f"metrics.{k}")
    return m


def _count(path: Path, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ExportError(path, f"must be an integer >= 1, got {value!r}", field=where)
    return value


def load_data(
    loaded: LoadedExport, data_dir: str | Path | None = None, *, batch_size: int | None = None
) -> DataSplits:
    """The validation and test splits an export was measured on.

    Args:
        loaded: The export.
        data_dir: Fashion-MNIST IDX folder (optional; found as in ``search.run`` otherwise)
            or the ImageFolder root (required for ``imagefolder`` exports).
        batch_size: Evaluation batch size (default: the recorded one, else 256).

    Raises:
        ExportError: The data section is invalid or cannot be reproduced.
        ValueError: The data cannot be found or does not fit (from the loaders).
    """
    from evaluators import fashion_mnist_splits, imagefolder_splits, synthetic_splits

    path, doc = loaded.path, loaded.manifest
    data = doc["data"]
    check_fields(path, data, _DATA_FIELDS, "data", _DATA_OPTIONAL)
    name = data["name"]
    n_val = _count(path, data["validation_images"], "data.validation_images")
    n_test = _count(path, data["test_images"], "data.test_images")
    size = data["input_size"]
    if not (isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size)):
        raise ExportError(path, f"must be [C, H, W], got {size!r}", field="data.input_size")
    bs = batch_size or data.get("batch_size") or 256
    cal = data.get("calibration_images")
    if cal is not None:
        cal = _count(path, cal, "data.calibration_images")
    seed = data.get("seed", 0)
    if name == "synthetic":
        m = _SYNTHETIC.match(str(data["identity"]))
        if m is None:
            raise ExportError(
                path,
                f"cannot reproduce synthetic data from identity {data['identity']!r}",
                field="data.identity",
            )
        n_cls, c, h, w, n_cal, v, t, s = (int(g) for g in m.groups())
        splits = synthetic_splits(
            num_classes=n_cls,
            input_size=(c, h, w),
            calibration=n_cal,
            validation=v,
            test=t,
            batch_size=bs,
            seed=s,
        )
    elif name == "fashion-mnist":
        splits = fashion_mnist_splits(
            data_dir,
            calibration=cal or 1,
            validation=n_val,
            test=n_test,
            batch_size=bs,
            input_size=tuple(size),
            seed=seed,
        )
    elif isinstance(name, str) and name.startswith("imagefolder:"):
        if data_dir is None:
            raise ExportError(
                path,
                f"is {name!r}: the check needs the ImageFolder root",
                field="data.name",
                fix="pass --data DIR (the folder holding train/ and val/)",
            )
        splits = imagefolder_splits(
            data_dir,
            loaded.anchors["front"],
            calibration=cal,
            validation=n_val,
            test=n_test,
            seed=seed,
            batch_size=bs,
        )
    else:
        raise ExportError(
            path,
            f"unknown dataset {name!r}",
            field="data.name",
            fix="expected 'synthetic', 'fashion-mnist' or 'imagefolder:<name>'",
        )
    exact_identity = name == "synthetic" or cal is not None
    if exact_identity and splits.identity != data["identity"]:
        raise ExportError(
            path,
            f"the rebuilt {name} data has identity {splits.identity!r}, the export records "
            f"{data['identity']!r}",
            field="data.identity",
            fix="check --data: it must be the dataset the search ran on",
        )
    for what, loader, n in (
        ("validation", splits.validation, n_val),
        ("test", splits.test, n_test),
    ):
        if loader.num_images != n:
            raise ExportError(
                path,
                f"records {n} images but the data gives {loader.num_images}",
                field=f"data.{what}_images",
            )
    return splits


def check_export(
    export: str | Path | LoadedExport,
    *,
    data_dir: str | Path | None = None,
    tolerance: float = 0.0,
    batch_size: int | None = None,
) -> CheckResult:
    """Re-measures an export and compares it with its manifest and its device's budget.

    Accuracy (test and validation, top-1 and top-5) is re-measured on the export's dataset,
    MACs with :func:`evaluators.count_macs` at the front anchor's input size, parameters as
    the search counts them (the parameters the forward pass uses). Latency and memory are
    not re-measured; their recorded values are checked against the budget.

    Args:
        export: The export's manifest, or an export already read with
            :func:`space.read_export`.
        data_dir: See :func:`load_data`.
        tolerance: Largest accepted difference of accuracies, in percentage points (0:
            exactly equal). MACs and parameters must always be equal.
        batch_size: Evaluation batch size.

    Returns:
        The comparison; ``result.ok`` says whether everything matched and fits.

    Raises:
        ExportError: The export is invalid, its files missing or altered.
        ValueError: The data cannot be found.
    """
    from evaluators import accuracy, anchor_param_count, count_macs, stitched_param_counts

    loaded = export if isinstance(export, LoadedExport) else read_export(export)
    path, doc = loaded.path, loaded.manifest
    budget = _budget(path, doc)
    m = _metrics(path, doc)
    splits = load_data(loaded, data_dir, batch_size=batch_size)
    model, size = loaded.model, loaded.input_size
    test = accuracy(model, splits.test, input_size=size)
    val = accuracy(model, splits.validation, input_size=size)
    macs = count_macs(model, size)
    if loaded.is_stitch:
        params = stitched_param_counts(model)["total"]
    else:
        params = anchor_param_count(loaded.anchors["front"])
    result = CheckResult(path=path, device=budget.device, label=str(doc["label"]))
    limits = budget.limits()

    def compare(metric: str, expected: Any, measured: Any, tol: float, limit_key: str | None):
        limit = limits.get(limit_key) if limit_key else None
        same = expected == measured or (
            expected is not None and measured is not None and abs(expected - measured) <= tol
        )
        status = "ok" if same else "DIFFERS"
        if not same:
            result.problems.append(
                f"{metric}: the manifest records {expected}, the artifact measures {measured}"
            )
        if limit is not None and (measured is None or measured > limit):
            status = "OVER BUDGET" if same else status
            result.problems.append(
                f"{metric}: {measured} exceeds the budget {limit:g} of device {budget.device!r}"
            )
        result.rows.append(CheckRow(metric, expected, measured, limit, status))

    compare("test top-1 (%)", m["test"]["top1"], test.top1, tolerance, None)
    compare("test top-5 (%)", m["test"]["top5"], test.top5, tolerance, None)
    val_expected = m["validation_remeasured"]
    compare("validation top-1 (%)", val_expected["top1"], val.top1, tolerance, None)
    compare("validation top-5 (%)", val_expected["top5"], val.top5, tolerance, None)
    compare("MACs", m["macs"], macs, 0, "macs")
    compare("params", m["params"], params, 0, "params")
    for metric in ("latency_ms", "memory_mb"):
        limit = limits.get(metric)
        recorded = m[metric]
        status = "recorded"
        if limit is not None and (recorded is None or recorded > limit):
            status = "OVER BUDGET"
            result.problems.append(
                f"{metric} (recorded): {recorded} exceeds the budget {limit:g} of device "
                f"{budget.device!r}"
            )
        result.rows.append(CheckRow(f"{metric} (recorded)", recorded, None, limit, status))
    return result


# ---------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    """argparse that reports an error as one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = _Parser(
        prog="python -m search.export",
        description="Write an export as ONNX, or check it against its manifest and budget.",
        epilog="Examples: python -m search.export exports/edge.json --onnx edge.onnx; "
        "python -m search.export --check exports/edge.json",
    )
    p.add_argument(
        "export", metavar="EXPORT.json", help="an export manifest (exports/<device>.json)"
    )
    p.add_argument("--onnx", metavar="OUT.onnx", help="write the network as ONNX")
    p.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset version (default {DEFAULT_OPSET})",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip running the ONNX file in onnxruntime against PyTorch",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="re-measure accuracy, MACs and params; compare with the manifest and the budget",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="dataset folder for --check: the ImageFolder root (required for imagefolder "
        "exports) or the Fashion-MNIST IDX folder",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        metavar="POINTS",
        help="accepted accuracy difference in percentage points for --check (default 0: exact)",
    )
    return p


class _InputError(Exception):
    """Bad input: one line on stderr, exit 2."""


class _Failed(Exception):
    """The ONNX export failed: one line on stderr, exit 1."""


def _run_onnx(args: argparse.Namespace, loaded: LoadedExport) -> int:
    size = loaded.input_size
    try:
        path = export_onnx(
            loaded.model,
            args.onnx,
            input_size=size,
            opset=args.opset,
            metadata=_onnx_metadata(loaded),
        )
    except ValueError as e:
        raise _Failed(str(e)) from None
    note = ""
    if not args.no_verify:
        try:
            diff = verify_onnx(loaded.model, path, input_size=size)
        except ValueError as e:
            raise _Failed(str(e)) from None
        if not diff <= ONNX_ATOL:
            raise _Failed(
                f"ONNX {str(path)!r}: onnxruntime's logits differ from PyTorch's by up to "
                f"{diff:.3g} (> {ONNX_ATOL:g})"
            )
        batches = " and ".join(str(b) for b in VERIFY_BATCHES)
        note = f"; onnxruntime matches PyTorch at batch {batches}, max |diff| {diff:.2g}"
    c, h, w = size
    print(f"onnx: {path} (opset {args.opset}, input 'images' [batch, {c}, {h}, {w}]{note})")
    return 0


def _run_check(args: argparse.Namespace, loaded: LoadedExport) -> int:
    try:
        result = check_export(loaded, data_dir=args.data, tolerance=args.tolerance)
    except ExportError:
        raise
    except ValueError as e:  # the data cannot be found or does not fit
        raise _InputError(str(e)) from None
    print(f"check: {result.path} (device {result.device!r}: {result.label})")
    print(result.table())
    if result.ok:
        print(f"OK: the artifact reproduces its manifest and fits device {result.device!r}")
        return 0
    for line in result.problems:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code.

    0: all good; 1: the check found differences or the ONNX export failed; 2: bad input.
    """
    args = build_parser().parse_args(argv)
    if not args.onnx and not args.check:
        print(
            "python -m search.export: error: give --onnx OUT.onnx and/or --check (see --help)",
            file=sys.stderr,
        )
        return 2
    if not 14 <= args.opset <= 20:
        print(f"error: --opset must be in 14..20, got {args.opset}", file=sys.stderr)
        return 2
    if not (math.isfinite(args.tolerance) and args.tolerance >= 0):
        print(f"error: --tolerance must be a number >= 0, got {args.tolerance}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            # e.g. fvcore's import-time `torch.jit.script` deprecation: noise for this CLI.
            warnings.simplefilter("ignore", FutureWarning)
            loaded = read_export(args.export)
            rc = _run_check(args, loaded) if args.check else 0
            if args.onnx:
                rc = max(rc, _run_onnx(args, loaded))
    except (ExportError, _InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
