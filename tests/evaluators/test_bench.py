from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    for key in ("cka_seconds", "macs_seconds", "ls_seconds", "val_seconds", "candidate_ratio"):
        assert results[key] > 0, key
    assert results["quick"] is True and results["macs"] > 0
    small, large = results["cka_tensor_peak_mb"]
    assert 0 < large <= small * 1.05  # CKA memory does not grow with the number of images
    assert "| measurement | value |" in proc.stdout and "end to end / pure forward" in proc.stdout
