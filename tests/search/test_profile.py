"""``python -m search.profile`` end to end on the tiny study (real timings, few repeats)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from evaluators import (
    TABLE_FORMAT,
    LatencyTable,
    anchor_key,
    part_keys,
    prefix_key,
    suffix_key,
)
from search.core import SearchSpace
from search.inputs import load_anchors, load_study
from search.profile import fit_lines, main

DATA = Path(__file__).resolve().parent / "data"
STUDY = DATA / "tiny_study.yaml"
ROOT = Path(__file__).resolve().parents[2]
FAST = ["--rounds", "2", "--warmup", "1", "--calibration", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("profile") / "tables" / "dev.json"
    rc = main(["--study", str(STUDY), "--device", "dev", "--out", str(out), *FAST])
    return out, rc


def test_profile_times_every_part_of_every_candidate(profiled) -> None:
    out, rc = profiled
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["format"] == TABLE_FORMAT and doc["device"] == "dev"
    assert doc["host"]["cpu"] and doc["host"]["threads"] == 1 and doc["host"]["torch"]
    assert doc["created"].endswith("+00:00")
    table = LatencyTable.read(out)
    study = load_study(STUDY)
    anchors, _ = load_anchors(study, STUDY)
    candidates = SearchSpace({n: a.num_blocks for n, a in anchors.items()}).all_candidates()
    assert table.study["name"] == "tiny"
    assert [a["name"] for a in table.study["anchors"]] == list(anchors)
    assert table.missing_parts(candidates) == []
    for name, a in anchors.items():
        parts = table.runtimes["torch"]["1"]["parts"]
        assert all(prefix_key(name, k) in parts for k in range(1, a.num_blocks + 1))
        assert all(suffix_key(name, j) in parts for j in range(a.num_blocks))
        # A bare anchor is predicted as its own end-to-end measurement.
        bare = next(c for c in candidates if c.is_anchor and c.front == name)
        assert table.predict(bare) == parts[anchor_key(name)]["median_ms"]
    # A stitch: the fitted scale and overhead on its prefix + stitching layer + suffix.
    entry = table.runtimes["torch"]["1"]
    for c in [c for c in candidates if not c.is_anchor][::5]:
        keys = part_keys(c, table.anchors)
        assert keys[0] == prefix_key(c.front, c.front_block)
        assert keys[2] == suffix_key(c.back, c.back_block)
        total = sum(entry["parts"][k]["median_ms"] for k in keys)
        expected = max(entry["scale"] * total + entry["overhead_ms"], 0.0)
        assert table.predict(c) == pytest.approx(expected)
    # Both runtimes (onnxruntime is installed with the dev extra), with spread and fit.
    assert set(table.runtimes) == {"torch", "onnxruntime"}
    for rt in table.runtimes.values():
        entry = rt["1"]
        stitches = [k for k in entry["parts"] if k.startswith("stitch|")]
        assert {k.split("|")[1] for k in stitches} == {"cnn->vit", "vit->cnn"}
        assert all(t["median_ms"] > 0 and t["iqr_ms"] >= 0 for t in entry["parts"].values())
        assert len(entry["fit"]["networks"]) == 2 + 2  # both anchors and two stitches
    assert all(table.predict(c) > 0 for c in candidates)


def test_a_table_is_not_written_over_by_a_bad_command(tmp_path, capsys) -> None:
    cases = [
        (["--study", str(tmp_path / "none.yaml")], "none.yaml"),
        (["--study", str(STUDY), "--runtimes", "tflite"], "--runtimes: unknown runtime 'tflite'"),
        (["--study", str(STUDY), "--runtimes", "onnxruntime"], "--predict-with torch"),
        (["--study", str(STUDY), "--device", " "], "--device"),
        (["--study", str(STUDY), "--out", str(tmp_path)], "is a folder"),
        (["--study", str(STUDY), "--cpus", "9999"], "--cpus: CPU(s) [9999] are not available"),
        (["--study", str(STUDY), "--cpus", "a-b"], "--cpus: 'a-b' is not a CPU list"),
        (["--study", str(STUDY), "--batch-sizes", "1,0"], "--batch-sizes: '0' is not a batch"),
        (["--study", str(STUDY), "--rounds", "1"], "--rounds must be >= 2, got 1"),
    ]
    if not torch.cuda.is_available():
        cases.append(
            (["--study", str(STUDY), "--device-type", "cuda"], "--device-type cuda: no CUDA")
        )
    for argv, needle in cases:
        full = ["--device", "d", "--out", str(tmp_path / "t.json"), *argv]
        try:
            rc = main(full)
        except SystemExit as e:
            rc = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and needle in err[0], (argv, err)
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_leaves_no_table(tmp_path) -> None:
    out = tmp_path / "t.json"
    cmd = [sys.executable, "-m", "search.profile", "--study", str(STUDY), "--device", "d"]
    cmd += ["--out", str(out), "--runtimes", "torch", "--rounds", "400", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    seen = ""
    while "profile:" not in seen:  # the progress bar has started: parts are being timed
        line = proc.stderr.readline()
        assert line, f"profile ended early: {seen}"
        seen += line
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "no table written" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_fallback_is_recorded_in_the_table_and_printed_once(profiled) -> None:
    out, rc = profiled
    assert rc == 0
    table = LatencyTable.from_json(out.read_text())
    entry = table.runtimes["torch"]["1"]
    fallback = entry["fit"]["fallback"]  # recorded: None when the least-squares fit was used
    assert fallback is None or "scale 1 and the median difference" in fallback
    # A table whose fit fell back: recorded in the file, one warning line per entry.
    doc = json.loads(table.to_json())
    doc["runtimes"]["torch"]["1"]["fit"]["fallback"] = "the fitted scale 9 is outside [0.5, 2]"
    for batches in doc["runtimes"].values():  # a quiet machine: no noise warning
        for entry in batches.values():
            entry["noise"]["floor_pct"] = 1.0
    again = LatencyTable.from_json(json.dumps(doc))
    assert again.runtimes["torch"]["1"]["fit"]["fallback"].startswith("the fitted scale 9")
    lines = fit_lines(again)
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings == ["warning: torch batch 1: the fitted scale 9 is outside [0.5, 2]"]
    # Two lines per runtime and batch: the fit, and the noise floor.
    assert len(lines) == len(warnings) + 2 * sum(len(b) for b in again.runtimes.values())
    # A noisy machine: one more warning, with advice, after the lines.
    doc["runtimes"]["onnxruntime"]["1"]["noise"]["floor_pct"] = 12.5
    noisy = fit_lines(LatencyTable.from_json(json.dumps(doc)))
    assert len(noisy) == len(lines) + 1 and "onnxruntime batch 1: noise floor ±12.5%" in noisy[4]
    assert noisy[-1].startswith("warning: this machine's timings are noisy (floor ±12.5% > ±5%)")


def test_the_run_prints_its_settings_and_noise_floor(tmp_path, capsys) -> None:
    out = tmp_path / "t.json"
    argv = ["--study", str(STUDY), "--device", "d", "--out", str(out), "--runtimes", "torch"]
    before = os.sched_getaffinity(0)
    cpu = str(min(before))
    argv += ["--rounds", "3", "--warmup", "1", "--calibration", "2", "--threads", "1"]
    rc = main([*argv, "--cpus", cpu, "--batch-sizes", "2"])
    err = capsys.readouterr().err
    assert rc == 0
    assert f"1 thread(s), CPUs {cpu}, 3 interleaved rounds" in err
    assert "batch sizes [1, 2]" in err
    table = LatencyTable.read(out)
    assert table.settings["affinity"] == [int(cpu)] and table.settings["threads"] == 1
    assert set(table.runtimes["torch"]) == {"1", "2"}
    for batch in ("1", "2"):
        noise = table.runtimes["torch"][batch]["noise"]
        assert f"torch batch {batch}: noise floor ±{noise['floor_pct']:.1f}%:" in err
    # Called in-process, main gives the CPUs back when done.
    assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_is_profiled_with_cuda_events(tmp_path, capsys) -> None:
    out = tmp_path / "gpu.json"
    argv = ["--study", str(STUDY), "--device", "gpu", "--out", str(out), "--device-type", "cuda"]
    rc = main([*argv, "--rounds", "4", "--warmup", "1", "--calibration", "2", "--batch-sizes", "8"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "on the CUDA " in err
    table = LatencyTable.read(out)
    assert table.settings["device_type"] == "cuda" and set(table.runtimes) == {"torch"}
    assert set(table.runtimes["torch"]) == {"1", "8"}
    parts = table.runtimes["torch"]["8"]["parts"]
    assert all(p["median_ms"] > 0 for p in parts.values())
