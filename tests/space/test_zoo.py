"""The shipped zoo: weights match the manifest, load by name, and reproduce their accuracy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import space.zoo as zoo
from space import file_sha256, load_anchor
from space.zoo.__main__ import main as zoo_main


def test_manifest_describes_a_useful_zoo() -> None:
    anchors = zoo.manifest()["anchors"]
    assert set(anchors) == {"resnet-s", "resnet-l", "vit-s", "vit-l"}
    families = [a["family"] for a in anchors.values()]
    assert families.count("resnet") == 2 and families.count("vit") == 2
    macs = {n: a["macs"] for n, a in anchors.items()}
    acc = {n: a["test_acc"] for n, a in anchors.items()}
    smallest, largest = min(macs, key=macs.get), max(macs, key=macs.get)
    assert macs[smallest] <= 0.25 * macs[largest]
    assert max(acc.values()) >= 91.0
    assert acc[smallest] <= max(acc.values()) - 2.0
    total = sum((zoo.ZOO_DIR / a["weights"]).stat().st_size for a in anchors.values())
    assert total <= 20 * 1024 * 1024
    for a in anchors.values():
        assert a["recipe"] if "recipe" in a else zoo.manifest()["recipe"]
        assert a["timm_name"] and a["timm_kwargs"]["in_chans"] == 1


@pytest.mark.parametrize("name", ["resnet-s", "resnet-l", "vit-s", "vit-l"])
def test_zoo_anchor_loads_and_matches_sha256(name: str) -> None:
    entry = zoo.manifest()["anchors"][name]
    assert file_sha256(zoo.ZOO_DIR / entry["weights"]) == entry["sha256"]
    anchor = load_anchor(f"zoo:{name}")
    assert anchor.name == f"zoo:{name}"
    assert anchor.checkpoint_sha256 == entry["sha256"]
    assert anchor.num_blocks >= 4
    assert anchor.input_size == (1, 28, 28)
    assert anchor.num_classes == 10
    with torch.no_grad():
        out = anchor.model(torch.zeros(2, 1, 28, 28))
    assert out.shape == (2, 10)


def test_manifest_macs_and_params_are_current() -> None:
    from evaluators import count_macs, count_params

    for name, entry in zoo.manifest()["anchors"].items():
        anchor = load_anchor(f"zoo:{name}")
        assert count_macs(anchor.model, (1, 1, 28, 28)) == entry["macs"], name
        assert count_params(anchor.model) == entry["params"], name


def test_unknown_zoo_name() -> None:
    with pytest.raises(ValueError, match=r"unknown zoo anchor 'zoo:resnet-m'.*did you mean"):
        load_anchor("zoo:resnet-m")
    with pytest.raises(ValueError, match="takes no checkpoint"):
        load_anchor("zoo:resnet-s", num_classes=3)


def test_altered_weights_are_refused(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.ZOO_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    weights = copy / zoo.manifest()["anchors"]["vit-s"]["weights"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "ZOO_DIR", copy)
    with pytest.raises(ValueError, match=r"vit-s\.safetensors.*altered"):
        zoo.load_zoo_anchor("vit-s")


def test_list_prints_a_table(capsys) -> None:
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["name", "family", "blocks", "MACs"]
    for name in ("zoo:resnet-s", "zoo:resnet-l", "zoo:vit-s", "zoo:vit-l"):
        assert name in out


def test_train_rejects_unknown_anchor(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        zoo_main(["train", "--anchors", "resnet-xl"])
    assert e.value.code == 2
    assert "resnet-xl" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet-s", "resnet-l", "vit-s", "vit-l"])
def test_zoo_reproduces_manifest_test_accuracy(name: str) -> None:
    from evaluators import accuracy, fashion_mnist_splits

    entry = zoo.manifest()["anchors"][name]
    data = fashion_mnist_splits(validation=16, calibration=16, batch_size=1000)
    assert data.test.num_images == 10_000
    acc = accuracy(load_anchor(f"zoo:{name}").model, data.test).top1
    assert abs(acc - entry["test_acc"]) <= 0.3, (name, acc, entry["test_acc"])


def test_manifest_is_valid_json_with_recipe() -> None:
    data = json.loads(zoo.MANIFEST.read_text())
    recipe = data["recipe"]
    for key in ("optimizer", "schedule", "augmentation", "batch_size", "seed"):
        assert key in recipe
