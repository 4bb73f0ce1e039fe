"""Loading exports: real exports written by ``search.delivery.write_export`` from tiny anchors.

:func:`build_exports` is shared with ``tests/search/test_export_cli.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from evaluators import CandidateResult, DataSplits, accuracy, evaluate_candidate, synthetic_splits
from search.core import DeviceBudget
from search.delivery import write_export
from space import (
    Anchor,
    Candidate,
    ExportError,
    StitchedNet,
    file_sha256,
    load_anchor,
    load_export,
    read_export,
)
from tests.conftest import TINY, make_tiny


# ---------------------------------------------------------------------- building exports
def _checkpointed(
    family: str, root: Path, fmt: str, size: tuple[int, int, int] | None = None
) -> tuple[Anchor, dict[str, Any]]:
    """A tiny anchor saved as a checkpoint and loaded back from it, with its load kwargs."""
    name, kwargs, default = TINY[family]
    size = size or default
    base = make_tiny(family)
    ckpt = root / f"{family}-{size[1]}px.{fmt}"
    state = {k: v.contiguous() for k, v in base.model.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(ckpt))
    else:
        torch.save(state, ckpt)
    kw = {"checkpoint": str(ckpt), "input_size": size, **kwargs}
    return load_anchor(name, **kw), kw


def make_export(
    root: Path,
    device: str,
    candidate: Candidate,
    anchors: dict[str, tuple[Anchor, dict[str, Any]]],
    data: DataSplits,
) -> tuple[Path, CandidateResult]:
    """Evaluates a candidate as the search does (test included) and writes its export."""
    loaded = {n: a for n, (a, _) in anchors.items()}
    result = evaluate_candidate(
        candidate.config,
        loaded,
        data,
        measure_latency=False,
        test=True,
        threads=1,
        resolution=candidate.resolution,
    )
    attrs = {
        "config": candidate.to_dict(),
        "val_acc": result.val_acc,
        "val_top5": result.val_top5,
        "macs": result.macs,
        "params": result.params,
        "latency_ms": 1.5,  # latency is machine-dependent: the check only reads it back
        "memory_mb": 2.0,
        "cka": None,
    }
    trial = SimpleNamespace(number=3, user_attrs=attrs)
    plan = SimpleNamespace(
        anchors=loaded,
        anchor_kwargs={n: kw for n, (_, kw) in anchors.items()},
        data=data,
        study=SimpleNamespace(
            name="unit",
            objectives=["accuracy", "macs"],
            data=SimpleNamespace(calibration=data.calibration.num_images, batch_size=64),
            fit=SimpleNamespace(steps=0, lr=1e-3),
        ),
        storage_url="sqlite:////tmp/unit.db",
    )
    budget = DeviceBudget(
        device, max_macs=2 * result.macs, max_params=2 * result.params, max_latency_ms=10.0
    )
    out = root / "exports"
    out.mkdir(parents=True, exist_ok=True)
    path = write_export(out, budget, trial, result, plan, taken=set(), n_evaluated=4)
    return path, result


def _data(size: tuple[int, int, int]) -> DataSplits:
    return synthetic_splits(
        num_classes=10, input_size=size, calibration=32, validation=48, test=64, batch_size=32
    )


_BUILT: dict[str, Any] = {}


def build_exports(tmp_path_factory) -> dict[str, tuple[Path, CandidateResult, DataSplits]]:
    """Four real exports (built once per session), by key.

    ``cnn_vit`` and ``vit_cnn``: heterogeneous stitches; ``cnn_cnn``: a ResNet self-stitch at
    28 px whose stitch resamples 7x7 -> 4x4; ``anchor``: the bare ViT.
    """
    if "exports" in _BUILT:
        return _BUILT["exports"]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("exports")
        resnet = _checkpointed("resnet", root, "safetensors")
        vit = _checkpointed("vit", root, "pth")
        resnet28 = _checkpointed("resnet", root, "safetensors", (3, 28, 28))
        pair = {resnet[0].name: resnet, vit[0].name: vit}
        d32, d28 = _data((3, 32, 32)), _data((3, 28, 28))
        r, v = resnet[0].name, vit[0].name
        built = {}
        for key, cand, anchors, data in (
            ("cnn_vit", Candidate(r, v, 2, 1), pair, d32),
            ("vit_cnn", Candidate(v, r, 2, 2), pair, d32),
            ("cnn_cnn", Candidate(r, r, 1, 2), {r: resnet28}, d28),
            ("anchor", Candidate(v, v), pair, d32),
        ):
            path, result = make_export(root, key.replace("_", "-"), cand, anchors, data)
            built[key] = (path, result, data)
    finally:
        torch.set_num_threads(before)
    _BUILT["exports"] = built
    return built


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return build_exports(tmp_path_factory)


def copy_export(path: Path, dest: Path) -> Path:
    """Copies an export's manifest and stitch weights into ``dest``; returns the new manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    doc = json.loads(path.read_text())
    shutil.copy(path, dest / path.name)
    if doc["stitch"] is not None:
        shutil.copy(path.parent / doc["stitch"]["weights"], dest / doc["stitch"]["weights"])
    return dest / path.name


def edit(path: Path, change) -> Path:
    """Applies ``change(doc)`` to a manifest in place."""
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc, indent=2))
    return path


# ---------------------------------------------------------------------- loading
@pytest.mark.parametrize("key", ["cnn_vit", "vit_cnn", "cnn_cnn", "anchor"])
def test_load_export_reproduces_exported_test_accuracy(exports, key) -> None:
    path, result, data = exports[key]
    model = load_export(path)
    assert not model.training
    doc = json.loads(path.read_text())
    assert doc["metrics"]["test"]["top1"] == result.test_acc
    assert accuracy(model, data.test).top1 == result.test_acc
    x = next(iter(data.test))[0][:4]
    with torch.no_grad():
        assert torch.equal(model(x), result.net(x))
    # A fresh network: nothing is shared with the one the search fitted.
    ours = {id(p) for p in model.parameters()}
    assert not ours & {id(p) for p in result.net.parameters()}


def test_loaded_stitch_is_a_stitched_net_and_anchor_is_the_timm_model(exports) -> None:
    net = load_export(exports["cnn_vit"][0])
    assert isinstance(net, StitchedNet)
    assert (net.config.front_block, net.config.back_block) == (2, 1)
    assert type(net.stitch).__name__ == "ConvToToken"
    assert net.input_size == (3, 32, 32)
    model = load_export(exports["anchor"][0])
    assert not isinstance(model, StitchedNet)
    assert type(model).__name__ == "VisionTransformer"


def test_self_stitch_loads_one_shared_anchor(exports) -> None:
    loaded = read_export(exports["cnn_cnn"][0])
    assert loaded.anchors["front"] is loaded.anchors["back"]
    assert loaded.model.front_model is loaded.model.back.model
    assert loaded.input_size == (3, 28, 28)
    assert loaded.is_stitch


def test_checkpoint_is_found_next_to_a_moved_export(exports, tmp_path) -> None:
    path, result, data = exports["cnn_vit"]
    moved = copy_export(path, tmp_path / "moved")
    doc = json.loads(moved.read_text())
    for i, rec in enumerate(doc["anchors"]):
        shutil.copy(rec["checkpoint"], moved.parent)

        def gone(d, i=i):
            d["anchors"][i]["checkpoint"] = str(
                tmp_path / "elsewhere" / Path(d["anchors"][i]["checkpoint"]).name
            )

        edit(moved, gone)
    assert accuracy(load_export(moved), data.test).top1 == result.test_acc


# ---------------------------------------------------------------------- bad input
def _raises(path: Path, field: str | None, *words: str) -> ExportError:
    with pytest.raises(ExportError) as info:
        load_export(path)
    err = info.value
    text = str(err)
    assert isinstance(err, ValueError)
    assert "\n" not in text
    assert str(path) in text
    assert err.field == field
    if field is not None:
        assert f"field {field!r}" in text
    for w in words:
        assert w in text, (w, text)
    return err


def test_missing_manifest(tmp_path) -> None:
    _raises(tmp_path / "nope.json", None, "no such file")


def test_invalid_json(exports, tmp_path) -> None:
    p = copy_export(exports["cnn_vit"][0], tmp_path)
    p.write_text(p.read_text()[:200])
    _raises(p, None, "not valid JSON", "line")


def test_manifest_not_an_object(tmp_path) -> None:
    p = tmp_path / "list.json"
    p.write_text("[1, 2]")
    _raises(p, None, "JSON object")


def test_wrong_format_version(exports, tmp_path) -> None:
    p = edit(
        copy_export(exports["cnn_vit"][0], tmp_path),
        lambda d: d.update(format="stitchsearch-export/2"),
    )
    _raises(p, "format", "stitchsearch-export/2", "stitchsearch-export/1")


def _drop(where: list, key: str):
    def change(d):
        obj = d
        for part in where:
            obj = obj[part]
        del obj[key]

    return change


def _add(where: list, key: str, value: Any = 1):
    def change(d):
        obj = d
        for part in where:
            obj = obj[part]
        obj[key] = value

    return change


@pytest.mark.parametrize(
    ("change", "field", "word"),
    [
        (_drop([], "stitch"), "stitch", "missing"),
        (_drop([], "anchors"), "anchors", "missing"),
        (_add([], "onnx"), "onnx", "unknown"),
        (_drop(["anchors", 1], "checkpoint_sha256"), "anchors[1].checkpoint_sha256", "missing"),
        (_add(["anchors", 0], "bogus"), "anchors[0].bogus", "unknown"),
        (_add(["stitch"], "bias"), "stitch.bias", "unknown"),
        (_drop(["stitch", "src"], "channels"), "stitch.src.channels", "missing"),
        (_add(["candidate"], "kind", "cascade"), "candidate.kind", "cascade"),
        (_add(["candidate"], "front_block", 99), "candidate", "out of range"),
        (_add(["anchors", 0], "num_blocks", 3), "anchors[0].num_blocks", "3"),
        (_add(["anchors", 1], "input_size", [3, 32]), "anchors[1].input_size", "[C, H, W]"),
        (_add(["anchors", 0], "checkpoint_sha256", "abc"), "anchors[0].checkpoint_sha256", "abc"),
        (_add(["anchors", 1], "role", "front"), "anchors[1].role", "'back'"),
        (_add(["stitch", "src"], "channels", 7), "stitch.src", "channels=7"),
        (_add(["stitch"], "layer", "TokenStitch"), "stitch.layer", "ConvToToken"),
        (_add(["stitch"], "sha256", "0" * 64), "stitch.sha256", "altered"),
    ],
)
def test_bad_fields(exports, tmp_path, change, field, word) -> None:
    p = edit(copy_export(exports["cnn_vit"][0], tmp_path), change)
    _raises(p, field, word)


def test_missing_checkpoint(exports, tmp_path) -> None:
    p = edit(
        copy_export(exports["cnn_vit"][0], tmp_path),
        _add(["anchors", 0], "checkpoint", str(tmp_path / "gone" / "missing.safetensors")),
    )
    _raises(p, "anchors[0].checkpoint", "missing.safetensors", "does not exist")


def test_altered_checkpoint(exports, tmp_path) -> None:
    p = copy_export(exports["cnn_vit"][0], tmp_path)
    doc = json.loads(p.read_text())
    ckpt = tmp_path / "front.safetensors"
    shutil.copy(doc["anchors"][0]["checkpoint"], ckpt)
    data = bytearray(ckpt.read_bytes())
    data[-1] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    edit(p, _add(["anchors", 0], "checkpoint", str(ckpt)))
    _raises(p, "anchors[0].checkpoint_sha256", "altered", file_sha256(ckpt))


def test_altered_stitch_weights(exports, tmp_path) -> None:
    p = copy_export(exports["cnn_vit"][0], tmp_path)
    weights = tmp_path / json.loads(p.read_text())["stitch"]["weights"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    _raises(p, "stitch.sha256", "altered")


def test_random_anchor_with_weights_sha256_is_rebuilt_and_verified(exports, tmp_path) -> None:
    # The tiny ViT's checkpoint holds exactly load_anchor's seeded initialisation, so the
    # export can drop the checkpoint and keep only the state dict's hash.
    path, result, data = exports["cnn_vit"]
    digest = read_export(path).anchors["back"].weights_sha256
    p = copy_export(path, tmp_path / "ok")

    def random_init(d, digest=digest):
        d["anchors"][1].update(checkpoint=None, checkpoint_sha256=None, weights_sha256=digest)

    edit(p, random_init)
    assert accuracy(load_export(p), data.test).top1 == result.test_acc
    edit(p, _add(["anchors", 1], "weights_sha256", "0" * 64))
    _raises(p, "anchors[1].weights_sha256", "0" * 64)


def test_random_anchor_cannot_be_rebuilt(exports, tmp_path) -> None:
    p = edit(copy_export(exports["cnn_vit"][0], tmp_path), _add(["anchors", 1], "checkpoint", None))
    edit(p, _add(["anchors", 1], "checkpoint_sha256", None))
    edit(p, _drop(["anchors", 1], "weights_sha256"))
    _raises(p, "anchors[1].checkpoint", "random initialisation")


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "backslash", "symlink", "pickle"])
def test_stitch_weights_must_stay_in_the_export_folder(exports, tmp_path, kind) -> None:
    src = exports["cnn_vit"][0]
    p = copy_export(src, tmp_path / "export")
    doc = json.loads(p.read_text())
    real = src.parent / doc["stitch"]["weights"]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(real, outside)
    name = {
        "absolute": str(outside),
        "dotdot": "../outside.safetensors",
        "backslash": "..\\outside.safetensors",
        "symlink": "link.safetensors",
        "pickle": "weights.pth",
    }[kind]
    if kind == "symlink":
        os.symlink(outside, p.parent / name)
    if kind == "pickle":
        shutil.copy(real, p.parent / name)
    edit(p, _add(["stitch"], "weights", name))
    word = {
        "absolute": "absolute",
        "dotdot": "leaves",
        "backslash": "leaves",
        "symlink": "outside the export's folder",
        "pickle": ".safetensors",
    }[kind]
    _raises(p, "stitch.weights", word)


class _Evil:
    """Unpickling this creates a file: proof that pickled code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_checkpoint_is_never_run(exports, tmp_path) -> None:
    p = copy_export(exports["cnn_vit"][0], tmp_path)
    doc = json.loads(p.read_text())
    marker = tmp_path / "pwned"
    state = dict(torch.load(doc["anchors"][1]["checkpoint"], weights_only=True))
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": state, "payload": _Evil(marker)}, evil)
    edit(p, _add(["anchors", 1], "checkpoint", str(evil)))
    edit(p, _add(["anchors", 1], "checkpoint_sha256", file_sha256(evil)))
    _raises(p, "anchors[1]", "refused", "pickled")
    assert not marker.exists()


# ---------------------------------------------------------------------- zoo anchors
def _zoo_export(tmp_path: Path) -> tuple[Path, CandidateResult, DataSplits]:
    from space.zoo import zoo_names

    try:
        if "resnet-s" not in zoo_names():
            pytest.skip("zoo anchor resnet-s is not installed")
        anchor = load_anchor("zoo:resnet-s")
    except ValueError as e:
        pytest.skip(f"zoo unavailable: {e}")
    data = synthetic_splits(
        num_classes=10, input_size=(1, 28, 28), calibration=16, validation=32, test=48
    )
    path, result = make_export(
        tmp_path, "zoo", Candidate(anchor.name, anchor.name), {anchor.name: (anchor, {})}, data
    )
    return path, result, data


def test_zoo_export_loads_and_checks_the_exported_sha256(tmp_path) -> None:
    path, result, data = _zoo_export(tmp_path)
    doc = json.loads(path.read_text())
    assert "timm_kwargs" not in doc["anchors"][0]
    assert accuracy(load_export(path), data.test).top1 == result.test_acc
    edit(path, _add(["anchors", 0], "checkpoint_sha256", "f" * 64))
    _raises(path, "anchors[0].checkpoint_sha256", "installed zoo", "f" * 64)


# ---------------------------------------------------------------------- switchable networks
def test_switchable_network_saves_loads_and_switches(tmp_path) -> None:
    from space import (
        StitchConfig,
        SwitchableStitchedNet,
        build_stitched,
        load_switchable,
        save_switchable,
    )

    resnet, _ = _checkpointed("resnet", tmp_path, "safetensors")
    vit, _ = _checkpointed("vit", tmp_path, "pth")
    calib = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    nets = {
        name: build_stitched(
            resnet, vit, StitchConfig(resnet.name, vit.name, k, j), calibration=calib
        )
        for name, k, j in (("shallow", 1, 0), ("mid", 2, 1), ("deep", 3, 2))
    }
    net = SwitchableStitchedNet.from_stitched(nets, active="mid")
    assert net.names == ["shallow", "mid", "deep"] and net.active == "mid"
    # The anchors are held once; each stitch point adds only its layer.
    anchor_params = {id(p) for p in resnet.model.parameters()} | {
        id(p) for p in vit.model.parameters()
    }
    extra = [p for p in net.parameters() if id(p) not in anchor_params]
    assert len(extra) == sum(len(list(n.stitch.parameters())) for n in nets.values())

    saved = save_switchable(net, tmp_path / "art" / "pair.json")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["pair.json", "pair.safetensors"]
    loaded = load_switchable(saved)
    assert loaded.active == "mid" and not loaded.training
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for name, ref in nets.items():
            assert torch.equal(loaded.switch(name)(x), ref(x))
            assert torch.equal(net.switch(name)(x), ref(x))
        assert not torch.equal(loaded.switch("shallow")(x), loaded.switch("deep")(x))
        assert torch.equal(loaded.as_stitched("mid")(x), nets["mid"](x))
    with pytest.raises(ValueError, match="did you mean 'deep'"):
        loaded.switch("dep")

    # Altered weights are refused, naming the file and field.
    weights = saved.parent / "pair.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="field 'sha256'") as info:
        load_switchable(saved)
    assert str(saved) in str(info.value)


def test_switchable_network_rejects_mixed_anchor_pairs(tmp_path) -> None:
    from space import StitchConfig, SwitchableStitchedNet, build_stitched

    resnet, vit = make_tiny("resnet"), make_tiny("vit")
    other = make_tiny("vit", seed=1)
    a = build_stitched(resnet, vit, StitchConfig(resnet.name, vit.name, 1, 1))
    b = build_stitched(resnet, other, StitchConfig(resnet.name, other.name, 2, 1))
    with pytest.raises(ValueError, match="same anchor"):
        SwitchableStitchedNet.from_stitched({"a": a, "b": b})
    with pytest.raises(ValueError, match="without '.'"):
        SwitchableStitchedNet(resnet, vit, {"a.b": (a.config, a.stitch)})
    with pytest.raises(ValueError, match="is not cut 2"):
        SwitchableStitchedNet(
            resnet, vit, {"a": (StitchConfig(resnet.name, vit.name, 2, 1), a.stitch)}
        )
    # make_tiny perturbs BatchNorm statistics after the seeded initialisation: a saved
    # network records the state dict's hash, so the rebuilt (unperturbed) ResNet is refused.
    from space import load_switchable, save_switchable

    saved = save_switchable(SwitchableStitchedNet.from_stitched({"a": a}), tmp_path / "x.json")
    with pytest.raises(ExportError, match=r"field 'anchors\[0\].weights_sha256'"):
        load_switchable(saved)
