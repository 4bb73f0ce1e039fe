"""``python -m search.export``: turn an export into ONNX, or check it against its manifest.

::

    python -m search.export runs/default/exports/edge.json --onnx edge.onnx
    python -m search.export --check runs/default/exports/edge.json [--data DIR]

``--onnx`` writes ONNX with a dynamic batch axis and checks it in onnxruntime against
PyTorch (see :mod:`search.delivery.onnx`).

``--check`` rebuilds the network (verifying every file by SHA-256), re-measures test and
validation accuracy on the export's dataset, MACs and parameters, compares them with the
manifest and the device's budget, prints expected vs measured, and exits 1 when anything
differs or does not fit (see :mod:`search.delivery.check`). Latency and memory are not re-measured
(they depend on the machine): the recorded values are checked against the budget. Bad
input (a missing file, an invalid manifest, data that cannot be found) prints one line and
exits 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from search.core import OneLineParser
from search.delivery import (
    DEFAULT_OPSET,
    ONNX_ATOL,
    VERIFY_BATCHES,
    check_export,
    check_family,
    export_onnx,
    onnx_metadata,
    verify_onnx,
)
from space import FAMILY_FORMAT, ExportError, InputError, LoadedExport, read_export
from space.manifest import read_json_object


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = OneLineParser(
        prog="python -m search.export",
        description="Write an export as ONNX, or check it against its manifest and budget.",
        epilog="Examples: python -m search.export exports/edge.json --onnx edge.onnx; "
        "python -m search.export --check exports/edge.json",
    )
    p.add_argument(
        "export",
        metavar="EXPORT.json",
        help="an export manifest (exports/<device>.json), or the family (exports/family.json; "
        "--check only)",
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
        help="re-measure accuracy (label-free exports: agreement with the teacher), MACs and "
        "params; compare with the manifest and the budget",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="dataset folder for --check: the ImageFolder root (required for imagefolder "
        "exports), the image folder of a label-free export, or the Fashion-MNIST IDX folder",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        metavar="POINTS",
        help="accepted accuracy difference in percentage points for --check (default 0: exact)",
    )
    return p


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
            metadata=onnx_metadata(loaded),
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
    result = check_export(loaded, data_dir=args.data, tolerance=args.tolerance)
    print(f"check: {result.path} (device {result.device!r}: {result.label})")
    if result.measure != "accuracy":
        print(
            f"label-free: top-1/top-5 are {result.measure} (its recorded predictions on the "
            "same images), not accuracy"
        )
    print(result.table())
    if result.ok:
        what = "" if result.measure == "accuracy" else f" ({result.measure})"
        print(f"OK: the artifact reproduces its manifest{what} and fits device {result.device!r}")
        return 0
    for line in result.problems:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1


def _run_family_check(args: argparse.Namespace) -> int:
    result = check_family(args.export, data_dir=args.data, tolerance=args.tolerance)
    print(f"check: {result.path} (the family: {result.label})")
    if result.measure != "accuracy":
        print(f"label-free: top-1 is {result.measure}, not accuracy")
    print(result.table())
    if result.ok:
        print(f"OK: every member reproduces its record ({result.label})")
        return 0
    for line in result.problems:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1


def _is_family(path: str) -> bool:
    """Whether ``path`` is a family's JSON (a bad or missing file is left to the readers)."""
    try:
        return read_json_object(Path(path)).get("format") == FAMILY_FORMAT
    except (InputError, ExportError):
        return False


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
            if _is_family(args.export):
                if args.onnx:
                    print(
                        f"error: {args.export} is a family of stitched networks; write one "
                        "device's export (exports/<device>.json) as ONNX",
                        file=sys.stderr,
                    )
                    return 2
                return _run_family_check(args)
            loaded = read_export(args.export)
            rc = _run_check(args, loaded) if args.check else 0
            if args.onnx:
                rc = max(rc, _run_onnx(args, loaded))
    # ExportError is named until space makes it an InputError subclass.
    except (InputError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except _Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
