"""``python -m tools.train_zoo``: the zoo's training CLI and one short training run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from evaluators import ArrayLoader
from tools.train_zoo import main, train_anchor
from tools.zoo_recipes import RECIPE, SPECS


def test_train_rejects_unknown_anchor(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--anchors", "resnet-xl"])
    assert e.value.code == 2
    assert "resnet-xl" in capsys.readouterr().err


def test_train_rejects_zero_epochs(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--epochs", "0"])
    assert e.value.code == 2
    assert "--epochs must be >= 1" in capsys.readouterr().err


def test_recipes_cover_the_shipped_zoo() -> None:
    import space.zoo as zoo

    assert set(SPECS) == set(zoo.zoo_names())
    assert zoo.manifest()["recipe"] == RECIPE


def test_train_anchor_runs_one_seeded_epoch() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    data = SimpleNamespace(
        train=ArrayLoader(x, y, batch_size=32),
        validation=ArrayLoader(x[:32], y[:32], batch_size=32),
        test=ArrayLoader(x[32:], y[32:], batch_size=32),
    )
    logs: list[str] = []
    model, metrics = train_anchor(SPECS["resnet-s"], data, epochs=1, log=logs.append)
    assert metrics["epochs"] == 1 and len(metrics["history"]) == 1
    assert 0.0 <= metrics["test_acc"] <= 100.0
    assert "resnet-s epoch 1/1" in logs[0]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_train_refuses_another_seed_into_the_package_zoo(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--anchors", "resnet-s", "--seed", "1"])
    assert e.value.code == 2
    assert "--seed 1 would overwrite the package's zoo" in capsys.readouterr().err


def test_another_seed_trains_another_checkpoint_of_the_architecture() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    loader = ArrayLoader(x, y, batch_size=32)
    data = SimpleNamespace(train=loader, validation=loader, test=loader)
    weights = {}
    for seed in (None, 0, 1):
        model, _ = train_anchor(SPECS["resnet-s"], data, epochs=1, seed=seed, log=lambda _: None)
        weights[seed] = model.conv1.weight.detach().clone()
    assert torch.equal(weights[None], weights[0])  # the recipe's seed is 0
    assert not torch.equal(weights[0], weights[1])
    assert weights[0].shape == weights[1].shape
