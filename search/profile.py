"""``python -m search.profile``: profile a target device once, for every candidate of a study.

Run on the device itself, with only this package installed (no dataset, no database, no
Ray): it loads the study's anchors, enumerates every candidate of its search space, and
times the pieces they are made of, in context: each anchor end to end, each prefix (stem
and blocks ``[0, k)``) and suffix (blocks ``[j, n)`` and head) a stitch cuts it at, and
every stitching layer by kind and shape, at batch 1 and at the study's ``latency_batch``,
in PyTorch and, when installed, in onnxruntime (the export format); then it fits the
per-call overhead on stitched networks and anchors measured end to end
(:mod:`evaluators.latency_table`). Everything is timed in interleaved rounds (every part
once per round, shuffled), so a slow minute hits every part alike; the run measures and
prints its own noise floor, and warns with advice when it is worse than ±5%. ``--threads``
and ``--cpus`` (CPU affinity) are applied and recorded; ``--device-type cuda`` times a GPU
with CUDA events. The table is written atomically: an interrupted run (Ctrl-C) leaves no
file. Bad input prints one line and exits 2, writing nothing.

Name the table in the budget CSV's ``latency_table`` column to have the search predict
that device's latency from it.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from evaluators import (
    LatencyTable,
    apply_timing,
    count_steps,
    noise_advice,
    noise_line,
    parse_cpus,
    profile_parts,
    torch_runner,
)
from search.core import OneLineParser, one_line
from search.delivery import export_onnx
from search.execution import SignalGuard
from search.inputs import load_anchors, load_study, study_space
from space import InputError
from space.files import atomic_write

RUNTIMES = ("torch", "onnxruntime")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = OneLineParser(
        prog="python -m search.profile",
        description="Time the anchors, their prefixes and suffixes at every stitch cut and "
        "the stitching layers of a study on this device, and write a latency table for the "
        "budget CSV's latency_table column.",
        epilog="Example: python -m search.profile --study studies/default.yaml "
        "--device raspberry-pi-4 --out tables/rpi4.json",
    )
    p.add_argument("--study", required=True, metavar="YAML", help="the study definition")
    p.add_argument("--device", required=True, metavar="NAME", help="the device's name in the CSV")
    p.add_argument("--out", required=True, metavar="JSON", help="the table to write")
    p.add_argument(
        "--runtimes",
        default=None,
        metavar="LIST",
        help="comma-separated runtimes to time: torch, onnxruntime (default: both when "
        "onnxruntime is installed, else torch)",
    )
    p.add_argument(
        "--predict-with",
        default="torch",
        choices=RUNTIMES,
        help="the runtime the search predicts latency with (default: torch, as the search "
        "measures on its host)",
    )
    p.add_argument(
        "--device-type",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where to time: cpu (default) or cuda (a GPU, timed with CUDA events; torch only)",
    )
    p.add_argument("--threads", type=_count("--threads", 1), default=None, help="torch threads")
    p.add_argument(
        "--cpus",
        default=None,
        metavar="LIST",
        help="pin the profiler to these CPUs (e.g. 0 or 0-3; recorded in the table), where "
        "the OS allows it",
    )
    p.add_argument(
        "--batch-sizes",
        default=None,
        metavar="LIST",
        help="comma-separated batch sizes (default: 1 and the study's latency_batch)",
    )
    p.add_argument("--warmup", type=_count("--warmup", 0), default=3, help="untimed calls")
    p.add_argument(
        "--rounds",
        type=_count("--rounds", 2),
        default=20,
        help="interleaved rounds: every part is timed once per round, in a shuffled order "
        "(default 20)",
    )
    p.add_argument("--seed", type=_count("--seed", 0), default=0, help="seeds the round order")
    p.add_argument(
        "--calibration",
        type=_count("--calibration", 0),
        default=12,
        help="stitched networks timed end to end (besides the anchors) to fit the overhead",
    )
    return p


def _count(flag: str, least: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a whole number, got {text!r}"
            ) from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{flag} must be >= {least}, got {value}")
        return value

    return parse


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _runtimes(text: str | None, predict_with: str) -> list[str]:
    if text is None:
        names = ["torch", "onnxruntime"] if _has_onnxruntime() else ["torch"]
    else:
        names = [n.strip() for n in text.split(",") if n.strip()]
        for n in names:
            if n not in RUNTIMES:
                raise InputError(
                    f"--runtimes: unknown runtime {n!r}; choose from {', '.join(RUNTIMES)}"
                )
        if not names:
            raise InputError("--runtimes: empty; give torch and/or onnxruntime")
        if "onnxruntime" in names and not _has_onnxruntime():
            raise InputError(
                "--runtimes: onnxruntime is not installed; pip install 'stitchsearch[onnx]' "
                "or leave it out"
            )
    if predict_with not in names:
        raise InputError(
            f"--predict-with {predict_with}: that runtime is not timed (--runtimes "
            f"{','.join(names)}); add it to --runtimes"
        )
    return list(dict.fromkeys(names))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def host_identity(threads: int) -> dict[str, Any]:
    """The device's identity as a table records it."""
    return {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "system": platform.platform(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "onnxruntime": _version("onnxruntime"),
        "stitchsearch": _version("stitchsearch"),
    }


class _OneInput(nn.Module):
    """``module(x)`` with nothing else traced (timm blocks' default arguments would be)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


class OnnxRunners:
    """Exports each part to ONNX (into a temporary folder) and runs it in onnxruntime.

    Args:
        folder: Where the ``.onnx`` files go.
        threads: onnxruntime's intra-op threads.
    """

    def __init__(self, folder: Path, threads: int) -> None:
        import onnxruntime as ort

        self.ort = ort
        self.folder = folder
        self.threads = threads
        self.count = 0

    def __call__(self, module: nn.Module, shape: tuple[int, ...]) -> Callable[[], object]:
        self.count += 1
        path = self.folder / f"part{self.count}.onnx"
        export_onnx(_OneInput(module), path, input_size=shape[1:])
        options = self.ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        session = self.ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        x = torch.randn(shape).numpy()
        name = session.get_inputs()[0].name
        return lambda: session.run(None, {name: x})


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code (0, 2 on bad input, 130 when interrupted)."""
    args = build_parser().parse_args(argv)
    try:
        device = args.device.strip()
        if not device or not device.isprintable():
            raise InputError(
                f"--device: {args.device!r} is not a device name; use the device's name in "
                "the budget CSV"
            )
        out = Path(args.out)
        if out.is_dir():
            raise InputError(f"--out: {str(out)!r} is a folder; give the table's file path")
        study_path = Path(args.study)
        cpus = _cpus(args.cpus)
        _check_device_type(args.device_type, args.runtimes)
        study = load_study(study_path)
        names = _runtimes(args.runtimes or _default_runtimes(args.device_type), args.predict_with)
        batches = _batch_sizes(args.batch_sizes, study.latency_batch)
        anchors, _ = load_anchors(study, study_path)
    except InputError as e:
        print(f"python -m search.profile: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    threads = args.threads or torch.get_num_threads()
    with apply_timing({"threads": threads, "affinity": cpus}):
        return _profile(args, device, out, study, study_path, anchors, names, batches, cpus)


def _profile(
    args: argparse.Namespace,
    device: str,
    out: Path,
    study: Any,
    study_path: Path,
    anchors: dict[str, Any],
    names: list[str],
    batches: list[int],
    cpus: list[int] | None,
) -> int:
    """Profiles under the threads and CPUs given (:func:`main` has checked the input)."""
    threads = torch.get_num_threads()
    for a in anchors.values():
        a.model.to(args.device_type).eval()
    candidates = study_space(study, anchors, study_path).all_candidates()
    total = count_steps(
        anchors,
        candidates,
        runtimes=len(names),
        batch_sizes=batches,
        calibration=args.calibration,
        rounds=args.rounds,
    )
    where = "CUDA " + torch.cuda.get_device_name() if args.device_type == "cuda" else "CPU"
    pinned = f", CPUs {','.join(map(str, cpus))}" if cpus is not None else ""
    print(
        f"profiling {device!r} for study {study.name!r} on the {where}: {len(candidates)} "
        f"candidates, runtimes {', '.join(names)}, batch sizes {batches}, {threads} "
        f"thread(s){pinned}, {args.rounds} interleaved rounds",
        file=sys.stderr,
    )
    bar = tqdm(total=total, desc="profile", unit="part", file=sys.stderr, mininterval=0.5)
    try:
        with SignalGuard(), tempfile.TemporaryDirectory(prefix="stitchsearch-profile-") as tmp:
            runners: dict[str, Any] = {
                "torch": functools.partial(torch_runner, device=args.device_type)
            }
            if "onnxruntime" in names:
                runners["onnxruntime"] = OnnxRunners(Path(tmp), threads)
            table = profile_parts(
                anchors,
                candidates,
                device=device,
                study_name=study.name,
                host=host_identity(threads),
                runtimes={n: runners[n] for n in names},
                batch_sizes=batches,
                warmup=args.warmup,
                rounds=args.rounds,
                calibration=args.calibration,
                predict_runtime=args.predict_with,
                device_type=args.device_type,
                seed=args.seed,
                on_step=lambda _: bar.update(1),
            )
            table.created = datetime.now(UTC).isoformat(timespec="seconds")
            bar.close()
            atomic_write(out, table.to_json())
    except KeyboardInterrupt as e:
        bar.close()
        print(f"interrupted ({e or 'SIGINT'}): no table written", file=sys.stderr)
        return 130
    except ValueError as e:  # an ONNX export that failed
        bar.close()
        print(f"python -m search.profile: error: {one_line(str(e))}", file=sys.stderr)
        return 1
    for line in fit_lines(table):
        print(line, file=sys.stderr)
    print(
        f"latency table: {out} ({table.profile_seconds:.1f}s); name it in the budget CSV's "
        f"latency_table column for device {device!r}"
    )
    return 0


def fit_lines(table: LatencyTable) -> list[str]:
    """Lines on the overhead fit, the noise floor and any fallback of each runtime and batch.

    Then one warning with advice when a noise floor is worse than ±5%.
    """
    lines = []
    worst: dict[str, Any] | None = None
    for rt, batches_of in table.runtimes.items():
        for batch, entry in batches_of.items():
            fit, noise = entry["fit"], entry["noise"]
            lines.append(
                f"{rt} batch {batch}: {len(entry['parts'])} parts, overhead "
                f"{entry['overhead_ms']:+.3f} ms, fit on {len(fit['networks'])} networks: "
                f"median error {fit['median_abs_error_pct']:.1f}%, max "
                f"{fit['max_abs_error_pct']:.1f}%, leave-one-out {fit['residual_pct']:.1f}%"
            )
            lines.append(f"{rt} batch {batch}: {noise_line(noise)}")
            if fit.get("fallback"):
                lines.append(f"warning: {rt} batch {batch}: {fit['fallback']}")
            if worst is None or noise["floor_pct"] > worst["floor_pct"]:
                worst = noise
    advice = noise_advice(worst) if worst is not None else None
    if advice:
        lines.append(advice)
    return lines


def _cpus(text: str | None) -> list[int] | None:
    """The ``--cpus`` list (None: not given)."""
    if text is None:
        return None
    if not hasattr(os, "sched_setaffinity"):
        raise InputError(
            f"--cpus: this OS ({platform.system()}) does not let a process pin its CPUs; "
            "leave --cpus out"
        )
    try:
        return parse_cpus(text)
    except ValueError as e:
        raise InputError(f"--cpus: {e}") from None


def _check_device_type(device_type: str, runtimes: str | None) -> None:
    """A CUDA profile needs a GPU here and times torch only."""
    if device_type != "cuda":
        return
    if not torch.cuda.is_available():
        raise InputError(
            "--device-type cuda: no CUDA device is visible to PyTorch here; run on the GPU "
            "machine (with a CUDA build of torch) or use --device-type cpu"
        )
    if runtimes is not None and "onnxruntime" in runtimes:
        raise InputError(
            "--runtimes: onnxruntime is profiled on the CPU only; use --runtimes torch with "
            "--device-type cuda"
        )


def _default_runtimes(device_type: str) -> str | None:
    return "torch" if device_type == "cuda" else None


def _batch_sizes(text: str | None, latency_batch: int) -> list[int]:
    """``--batch-sizes`` (batch 1 always included), else 1 and the study's latency_batch."""
    if text is None:
        return sorted({1, latency_batch})
    sizes = set()
    for piece in (p.strip() for p in text.split(",")):
        if not piece.isdigit() or int(piece) < 1:
            raise InputError(
                f"--batch-sizes: {piece!r} is not a batch size; give whole numbers >= 1 such "
                "as 1,64"
            )
        sizes.add(int(piece))
    return sorted(sizes | {1})


if __name__ == "__main__":
    sys.exit(main())
