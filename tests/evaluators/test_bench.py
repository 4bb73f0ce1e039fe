from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.bench_evaluators import load_anchors
from evaluators import stitched_macs
from space import StitchConfig, build_stitched

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_writes_json_and_table(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_evaluators.py"),
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    # The quick sizes were used, and the MACs are the stitched network's (its three parts
    # counted apart here).
    assert results["quick"] is True
    assert (results["cka_images"], results["ls_images"], results["val_images"]) == (128, 64, 256)
    # The same anchors again (without the zoo, the script's seeded random-init timm models).
    front, back, _ = load_anchors("zoo" if results["anchors"] == "zoo" else "timm")
    k, j = max(1, front.num_blocks // 2), max(1, back.num_blocks // 2)
    config = StitchConfig(front.name, back.name, k, j)
    assert results["config"] == str(config)
    assert results["macs"] == stitched_macs(build_stitched(front, back, config))["total"]
    # End to end holds the fit and the evaluation, and costs more than the bare forward passes.
    parts = results["candidate_fit_seconds"] + results["candidate_eval_seconds"]
    assert results["candidate_seconds"] >= parts > 0
    ratio = results["candidate_seconds"] / results["pure_forward_seconds"]
    assert results["candidate_ratio"] == pytest.approx(ratio) and ratio > 1
    assert 0 <= results["cka_at_stitch"] <= 1 and 0 <= results["val_acc"] <= 100
    small, large = results["cka_tensor_peak_mb"]
    assert 0 < large <= small * 1.05  # CKA memory does not grow with the number of images
    assert "| measurement | value |" in proc.stdout and "end to end / pure forward" in proc.stdout
