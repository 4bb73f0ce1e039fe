"""Bad command-line input: one clear line on stderr, exit 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from search.run import main

STUDY = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def devices(tmp_path) -> Path:
    return _write(tmp_path / "devices.csv", "device,max_macs\nsmall,10M\n")


def _cases(tmp_path: Path, devices: Path):
    bad_csv = _write(tmp_path / "bad.csv", "device,max_macs\nsmall,ten\n")
    bad_col = _write(tmp_path / "col.csv", "device,max_macz\nsmall,10M\n")
    bad_study = _write(tmp_path / "s.yaml", STUDY.read_text().replace("trials: 8", "trials: -3"))
    missing_ckpt = _write(
        tmp_path / "ck.yaml",
        STUDY.read_text().replace(
            "    timm_kwargs: {num_classes: 4}",
            "    checkpoint: nope.safetensors\n    timm_kwargs: {num_classes: 4}",
        ),
    )
    unknown_model = _write(tmp_path / "m.yaml", STUDY.read_text().replace("resnet10t", "resnet10x"))
    bad_data = _write(
        tmp_path / "d.yaml",
        STUDY.read_text().replace(
            "dataset: synthetic", "dataset: fashion-mnist\n  root: /nonexistent"
        ),
    )
    d = str(devices)
    return [
        (["--budget-table", str(bad_csv)], "bad.csv:2: column 'max_macs'"),
        (["--budget-table", str(bad_col)], "max_macz"),
        (["--budget-table", str(tmp_path / "none.csv")], "none.csv"),
        (["--budget-table", d, "--study", str(bad_study)], "field 'trials'"),
        (["--budget-table", d, "--study", str(tmp_path / "x.yaml")], "x.yaml"),
        (["--budget-table", d, "--study", str(missing_ckpt)], "nope.safetensors"),
        (["--budget-table", d, "--study", str(unknown_model)], "resnet10x"),
        (["--budget-table", d, "--study", str(bad_data)], "/nonexistent"),
        (["--budget-table", d, "--study", str(STUDY), "--storage", "nonsense"], "--storage"),
        (["--budget-table", d, "--study", str(STUDY), "--storage", "mongodb://x/y"], "mongodb"),
        (
            [
                "--budget-table",
                d,
                "--study",
                str(STUDY),
                "--storage",
                "sqlite:////no/such/dir/s.db",
            ],
            "/no/such/dir",
        ),
        (["--budget-table", d, "--study", str(STUDY), "--out", d], "--out"),
    ]


def test_bad_inputs_exit_2_with_one_line(tmp_path, devices, capsys) -> None:
    for argv, needle in _cases(tmp_path, devices):
        out = tmp_path / "out"
        argv = [*argv, "--out", str(out)] if "--out" not in argv else argv
        rc = main(argv)
        err = capsys.readouterr().err.strip()
        assert rc == 2, (argv, err)
        assert len(err.splitlines()) == 1, err
        assert needle in err, (needle, err)
        assert "Traceback" not in err
        assert not out.exists(), f"{argv} wrote {out}"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([], "--budget-table"),
        (["--budget-table", "d.csv", "--trials", "0"], "--trials must be >= 1"),
        (["--budget-table", "d.csv", "--workers", "two"], "--workers must be a whole number"),
        (["--budget-table", "d.csv", "--seed", "x"], "--seed"),
        (["--budget-table", "d.csv", "--frobnicate"], "--frobnicate"),
    ],
)
def test_bad_flags(argv, needle, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_help_and_subprocess_error_has_no_traceback(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "search.run", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "--budget-table" in out.stdout and "--ray-address" in out.stdout
    bad = _write(tmp_path / "b.csv", "device,max_params\n,1M\n")
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "search.run",
            "--budget-table",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "b.csv:2" in res.stderr
    assert not (tmp_path / "o").exists()
