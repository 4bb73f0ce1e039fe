"""``python -m search.export``: ONNX (onnxruntime vs PyTorch) and ``--check``, on real exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors import safe_open

from search.delivery import DEFAULT_OPSET, ONNX_ATOL, check_export, export_onnx, write_onnx
from search.delivery.exports import EXPORT_FORMAT as WRITTEN_FORMAT
from search.export import main
from space import EXPORT_FORMAT, ExportError, build_stitched, load_export, read_export
from tests.space.test_export import _add, build_exports, copy_export, edit, make_export

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory)


def test_the_writer_writes_the_format_the_reader_reads(exports, tmp_path) -> None:
    # What search.delivery's writer put in the manifest and the stitch weights' metadata...
    path, _, _ = exports["cnn_vit"]
    doc = json.loads(path.read_text())
    with safe_open(str(path.parent / doc["stitch"]["weights"]), "pt") as f:
        weights_format = f.metadata()["format"]
    assert doc["format"] == weights_format == WRITTEN_FORMAT
    # ...is what the reader accepts, and the reader checks it: another format is refused.
    assert read_export(path).manifest["format"] == EXPORT_FORMAT
    other = edit(copy_export(path, tmp_path / "other"), lambda d: d.update(format="x/9"))
    with pytest.raises(ExportError, match="x/9"):
        read_export(other)


# ---------------------------------------------------------------------- ONNX
def _run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


@pytest.mark.parametrize(
    "key",
    [
        "cnn_cnn",  # homogeneous; its stitch area-resamples 7x7 -> 4x4 (not a divisor)
        "cnn_vit",  # heterogeneous
        "vit_cnn",  # heterogeneous
    ],
)
def test_onnx_matches_pytorch_at_two_batch_sizes(exports, tmp_path, key) -> None:
    path, _, _ = exports[key]
    out = write_onnx(path, tmp_path / f"{key}.onnx", verify=False)
    model = load_export(path)
    size = tuple(json.loads(path.read_text())["anchors"][0]["input_size"])
    g = torch.Generator().manual_seed(1)
    for batch in (1, 3):
        x = torch.randn((batch, *size), generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = _run_onnx(out, x)
        assert got.shape == ref.shape == (batch, 10)
        assert np.abs(got - ref).max() <= ONNX_ATOL
    proto = onnx.load(str(out))
    assert proto.opset_import[0].version == DEFAULT_OPSET
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param == "batch" and not dim.dim_value
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["stitchsearch.label"] == json.loads(path.read_text())["label"]
    assert meta["stitchsearch.input_size"] == ",".join(map(str, size))


def test_onnx_vit_to_vit_stitch(tiny_anchor, tmp_path) -> None:
    from space import StitchConfig

    vit, deit = tiny_anchor("vit"), tiny_anchor("deit")
    net = build_stitched(
        deit, vit, StitchConfig(deit.name, vit.name, 1, 2), calibration=torch.randn(8, 3, 32, 32)
    )
    out = export_onnx(net, tmp_path / "vv.onnx", input_size=(3, 32, 32))
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            ref = net(x).numpy()
        assert np.abs(_run_onnx(out, x) - ref).max() <= ONNX_ATOL


def test_cli_onnx_writes_and_verifies(exports, tmp_path, capsys) -> None:
    path, _, _ = exports["cnn_vit"]
    out = tmp_path / "sub" / "net.onnx"
    assert main([str(path), "--onnx", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.is_file()
    assert f"opset {DEFAULT_OPSET}" in printed and "batch 1 and 3" in printed


def test_failed_onnx_export_is_one_line_and_leaves_nothing(tmp_path, capfd) -> None:
    class Unsupported(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.svdvals(x.flatten(1)[:, :4].reshape(-1, 2, 2))

    with pytest.raises(ValueError, match="ONNX export") as info:
        export_onnx(Unsupported(), tmp_path / "bad.onnx", input_size=(1, 2, 2))
    assert "\n" not in str(info.value)
    out, err = capfd.readouterr()
    assert "graph" not in out + err  # the exporter's TorchScript dump is swallowed
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- --check
@pytest.mark.parametrize("key", ["cnn_vit", "cnn_cnn", "anchor"])
def test_check_passes_on_a_faithful_export(exports, key, capsys) -> None:
    path, result, _ = exports[key]
    assert main(["--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    for metric in ("test top-1 (%)", "MACs", "params", "latency_ms (recorded)"):
        assert metric in out
    assert str(result.macs) in out and f"{result.test_acc:.4f}" in out


def test_check_result_rows(exports) -> None:
    path, result, _ = exports["vit_cnn"]
    res = check_export(path)
    assert res.ok
    rows = {r.metric: r for r in res.rows}
    assert rows["test top-1 (%)"].measured == result.test_acc
    assert rows["MACs"].measured == result.macs
    assert rows["params"].measured == result.params
    assert rows["latency_ms (recorded)"].status == "recorded"


def test_check_reports_differing_figures(exports, tmp_path, capsys) -> None:
    path, result, _ = exports["cnn_vit"]
    p = copy_export(path, tmp_path)

    def tamper(d):
        d["metrics"]["test"]["top1"] += 1.0
        d["metrics"]["macs"] += 1

    edit(p, tamper)
    assert main(["--check", str(p)]) == 1
    captured = capsys.readouterr()
    assert "DIFFERS" in captured.out
    err = captured.err
    assert f"test top-1 (%): the manifest records {result.test_acc + 1.0}" in err
    assert f"measures {result.test_acc}" in err
    assert (
        f"MACs: the manifest records {result.macs + 1}, the artifact measures {result.macs}" in err
    )
    assert "params" not in err
    # A tolerance in points covers the accuracy, never MACs.
    assert main(["--check", str(p), "--tolerance", "1.0"]) == 1
    err = capsys.readouterr().err
    assert "test top-1" not in err and "MACs" in err


def test_check_reports_a_blown_budget(exports, tmp_path, capsys) -> None:
    path, result, _ = exports["cnn_vit"]
    p = edit(copy_export(path, tmp_path), _add(["budget"], "max_params", result.params - 1))
    edit(p, _add(["budget"], "max_latency_ms", 1.0))  # the recorded latency is 1.5 ms
    assert main(["--check", str(p)]) == 1
    captured = capsys.readouterr()
    assert "OVER BUDGET" in captured.out
    assert f"params: {result.params} exceeds the budget {result.params - 1}" in captured.err
    assert "latency_ms (recorded): 1.5 exceeds the budget 1" in captured.err


def _legacy_imagefolder(doc: dict) -> None:
    """An ImageFolder export written before ``data.recipe``: the check needs ``--data``."""
    doc["data"]["name"] = "imagefolder:pets"
    doc["data"].pop("recipe", None)


def _one_line_exit_2(args: list[str], capsys, *words: str) -> str:
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    return err


def test_check_bad_input_exits_2(exports, tmp_path, capsys) -> None:
    _one_line_exit_2(["--check", str(tmp_path / "none.json")], capsys, "none.json", "no such file")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    _one_line_exit_2(["--check", str(bad)], capsys, "bad.json", "not valid JSON")
    p = edit(copy_export(exports["cnn_vit"][0], tmp_path / "a"), _add(["metrics"], "macs", "many"))
    _one_line_exit_2(["--check", str(p)], capsys, "field 'metrics.macs'", "'many'")
    p = edit(copy_export(exports["cnn_vit"][0], tmp_path / "b"), _add(["budget"], "max_gpus", 1))
    _one_line_exit_2(["--check", str(p)], capsys, "field 'budget.max_gpus'")
    p = edit(copy_export(exports["cnn_vit"][0], tmp_path / "c"), _legacy_imagefolder)
    _one_line_exit_2(["--check", str(p)], capsys, "field 'data.name'", "--data")
    _one_line_exit_2([str(p)], capsys, "--onnx", "--check")


def test_cli_missing_file_as_a_process(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "search.export", "--check", str(tmp_path / "missing.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "missing.json" in proc.stderr and "Traceback" not in proc.stderr


def test_write_onnx_raises_export_error_for_an_invalid_export(exports, tmp_path) -> None:
    p = edit(
        copy_export(exports["cnn_vit"][0], tmp_path), _add(["stitch"], "weights", "/x.safetensors")
    )
    with pytest.raises(ExportError, match="stitch.weights"):
        write_onnx(p, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------- Fashion-MNIST
def test_check_on_fashion_mnist_with_a_zoo_anchor(tmp_path, capsys) -> None:
    from evaluators import fashion_mnist_splits
    from space import Candidate, load_anchor
    from space.zoo import zoo_names

    try:
        if "resnet-s" not in zoo_names():
            pytest.skip("zoo anchor resnet-s is not installed")
        anchor = load_anchor("zoo:resnet-s")
        data = fashion_mnist_splits(calibration=16, validation=64, test=96, batch_size=64)
    except ValueError as e:
        pytest.skip(f"zoo or Fashion-MNIST unavailable: {e}")
    path, result = make_export(
        tmp_path, "fm", Candidate(anchor.name, anchor.name), {anchor.name: (anchor, {})}, data
    )
    assert main(["--check", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{result.test_acc:.4f}" in out and result.test_acc > 50  # a trained anchor


# ---------------------------------------------------------------------- data.recipe
def _with_recipe(path: Path, data, dest: Path) -> Path:
    """A copy of an export whose manifest carries ``data.recipe`` (as the search writes it)."""
    return edit(copy_export(path, dest), _add(["data"], "recipe", data.recipe.to_dict()))


def _without_recipe(path: Path, dest: Path) -> Path:
    """A copy of an export as written before ``data.recipe`` existed."""
    return edit(copy_export(path, dest), lambda d: d["data"].pop("recipe", None))


def _no_legacy(monkeypatch) -> None:
    import search.delivery.check

    def fail(*_a, **_k):
        raise AssertionError("a manifest with data.recipe must not need the legacy path")

    monkeypatch.setattr(search.delivery.check, "_legacy_recipe", fail)


@pytest.mark.parametrize("key", ["cnn_vit", "cnn_cnn"])
def test_check_rebuilds_the_data_from_the_recipe(exports, tmp_path, key, capsys, monkeypatch):
    path, result, data = exports[key]
    p = _with_recipe(path, data, tmp_path)
    assert json.loads(p.read_text())["data"]["recipe"]["dataset"] == "synthetic"
    _no_legacy(monkeypatch)
    res = check_export(p)
    assert res.ok, res.problems
    assert {r.metric: r for r in res.rows}["test top-1 (%)"].measured == result.test_acc
    assert main(["--check", str(p)]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_of_an_old_export_uses_the_legacy_recipe(exports, tmp_path, monkeypatch) -> None:
    import search.delivery.check

    path, result, _ = exports["vit_cnn"]
    p = _without_recipe(path, tmp_path)
    calls = []
    legacy = search.delivery.check._legacy_recipe

    def spy(*a, **k):
        calls.append(a)
        return legacy(*a, **k)

    monkeypatch.setattr(search.delivery.check, "_legacy_recipe", spy)
    res = check_export(p)
    assert res.ok and len(calls) == 1
    assert {r.metric: r for r in res.rows}["test top-1 (%)"].measured == result.test_acc


def test_check_bad_recipe_exits_2(exports, tmp_path, capsys) -> None:
    path, _, data = exports["cnn_vit"]
    recipe = data.recipe.to_dict()
    p = edit(copy_export(path, tmp_path / "a"), _add(["data"], "recipe", {**recipe, "seed": 5}))
    _one_line_exit_2(["--check", str(p)], capsys, "field 'data.identity'", "--data")
    p = edit(
        copy_export(path, tmp_path / "b"), _add(["data"], "recipe", {**recipe, "batch_size": 0})
    )
    _one_line_exit_2(["--check", str(p)], capsys, "field 'data.recipe.batch_size'", "0")
    p = edit(copy_export(path, tmp_path / "c"), _add(["data"], "recipe", {**recipe, "x": 1}))
    _one_line_exit_2(["--check", str(p)], capsys, "field 'data.recipe.x'", "unknown")
    p = edit(copy_export(path, tmp_path / "d"), _add(["data"], "recipe", [1]))
    _one_line_exit_2(["--check", str(p)], capsys, "field 'data.recipe'", "must be a JSON object")
    fm = {**recipe, "dataset": "fashion-mnist", "num_classes": 10}
    p = edit(copy_export(path, tmp_path / "e"), _add(["data"], "recipe", fm))
    _one_line_exit_2(["--check", str(p)], capsys, "field 'data.recipe.dataset'", "'synthetic'")


# ---------------------------------------------------------------------- ImageFolder
def _tree(root: Path, classes: int = 10, train: int = 3, val: int = 2) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = (torch.rand(32, 32, 3, generator=g) * 255).to(torch.uint8)
                Image.fromarray(arr.numpy()).save(d / f"{i}.png")


def test_check_of_an_imagefolder_export_with_and_without_recipe(tmp_path, capsys) -> None:
    from evaluators import DataRecipe, make_splits
    from space import Candidate
    from tests.space.test_export import _checkpointed

    tree = tmp_path / "pets"
    _tree(tree)
    anchor, kw = _checkpointed("resnet", tmp_path, "safetensors")
    data = make_splits(
        DataRecipe("imagefolder", root=str(tree), calibration=4, validation=6, batch_size=8),
        anchor=anchor,
    )
    assert data.recipe.root == os.path.abspath(tree) and data.recipe.test == 20
    path, result = make_export(
        tmp_path, "if", Candidate(anchor.name, anchor.name), {anchor.name: (anchor, kw)}, data
    )
    # New manifests: the recorded root is enough.
    p = _with_recipe(path, data, tmp_path / "new")
    assert main(["--check", str(p)]) == 0
    assert f"{result.test_acc:.4f}" in capsys.readouterr().out
    # Old manifests: the root comes from --data, as before.
    p = _without_recipe(path, tmp_path / "old")
    _one_line_exit_2(["--check", str(p)], capsys, "field 'data.name'", "--data")
    assert main(["--check", str(p), "--data", str(tree)]) == 0
    capsys.readouterr()
    # --data overrides the recorded root.
    p = _with_recipe(path, data, tmp_path / "moved")
    _one_line_exit_2(
        ["--check", str(p), "--data", str(tmp_path / "gone")], capsys, "gone", "does not exist"
    )
