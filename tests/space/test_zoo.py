"""The shipped zoo: weights match the manifest, load by name, and reproduce their accuracy."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import space.zoo as zoo
from space import InputError, file_sha256, load_anchor
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
    with pytest.raises(InputError, match=r"unknown zoo anchor 'zoo:resnet-m'.*did you mean"):
        load_anchor("zoo:resnet-m")
    with pytest.raises(InputError, match="takes no checkpoint"):
        load_anchor("zoo:resnet-s", num_classes=3)


def test_altered_weights_are_refused(tmp_path, monkeypatch) -> None:
    copy = tmp_path / "zoo"
    shutil.copytree(zoo.ZOO_DIR, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    weights = copy / zoo.manifest()["anchors"]["vit-s"]["weights"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(zoo, "ZOO_DIR", copy)
    with pytest.raises(InputError, match=r"vit-s\.safetensors.*altered.*tools\.train_zoo"):
        zoo.resolve("zoo:vit-s")
    with pytest.raises(InputError, match=r"vit-s\.safetensors.*altered"):
        load_anchor("zoo:vit-s")


def test_resolve_gives_the_manifest_entry_and_load_anchor_builds_it() -> None:
    entry = zoo.resolve("zoo:resnet-s")
    raw = zoo.manifest()["anchors"]["resnet-s"]
    assert entry.name == "zoo:resnet-s" and entry.timm_name == raw["timm_name"]
    assert entry.checkpoint == zoo.ZOO_DIR / raw["weights"] and entry.sha256 == raw["sha256"]
    assert entry.input_size == (1, 28, 28)
    assert entry.timm_kwargs["layers"] == (1, 1, 1, 1)  # JSON lists back as tuples
    anchor = load_anchor("zoo:resnet-s")
    assert anchor.checkpoint == entry.checkpoint and anchor.timm_kwargs == entry.timm_kwargs
    with pytest.raises(InputError, match="unknown zoo anchor 'zoo:nope'"):
        zoo.resolve("zoo:nope")


def test_list_prints_a_table(capsys) -> None:
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:4] == ["name", "family", "blocks", "MACs"]
    for name in ("zoo:resnet-s", "zoo:resnet-l", "zoo:vit-s", "zoo:vit-l"):
        assert name in out


def test_train_points_to_the_new_command(capsys) -> None:
    assert zoo_main(["train", "--anchors", "resnet-s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python -m tools.train_zoo" in err


def test_the_zoo_does_not_import_anchors() -> None:
    # space.anchor builds zoo anchors from zoo entries; the zoo must not import it back.
    import ast

    tree = ast.parse((zoo.ZOO_DIR / "__init__.py").read_text())
    imported = {
        n.module if isinstance(n, ast.ImportFrom) else a.name
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in n.names
    }
    assert not {m for m in imported if m and m.startswith("space.anchor")}


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


def test_zoo_anchors_carry_their_training_normalisation() -> None:
    from timm.data import resolve_data_config

    from evaluators.data.fashion_mnist import FMNIST_MEAN, FMNIST_STD
    from tools.zoo_recipes import DATA_CONFIG

    for name in zoo.zoo_names():
        assert zoo.manifest()["anchors"][name]["data_config"] == DATA_CONFIG
        anchor = load_anchor(f"zoo:{name}")
        for model in (anchor.model, anchor.at_resolution(32).model):
            cfg = resolve_data_config(model=model)
            assert cfg["mean"] == pytest.approx((FMNIST_MEAN,), abs=1e-3), name
            assert cfg["std"] == pytest.approx((FMNIST_STD,), abs=1e-3), name
            assert (cfg["crop_pct"], cfg["interpolation"]) == (1.0, "bilinear"), name
        assert cfg["input_size"] == (1, 28, 28)
