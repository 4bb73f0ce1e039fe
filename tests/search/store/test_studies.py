"""Opening a study: a stored study keeps the anchor ids it was created with."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from search.inputs import parse_study
from search.store import open_study
from space import InputError

DEFAULT = Path(__file__).parents[3] / "studies" / "default.yaml"


def _with_ids(definition: dict, ids: list[str | None]) -> dict:
    anchors = [
        {"name": a} if i is None else {"name": a, "id": i}
        for a, i in zip(definition["anchors"], ids, strict=True)
    ]
    return {**definition, "anchors": anchors}


def test_a_resumed_study_refuses_renamed_anchor_ids_and_keeps_same_ones() -> None:
    definition = yaml.safe_load(DEFAULT.read_text())
    names = [a if isinstance(a, str) else a["name"] for a in definition["anchors"]]
    definition["anchors"] = names
    storage = optuna.storages.InMemoryStorage()
    plain = parse_study(definition)
    assert open_study(storage, plain, "d")[1] is True
    # The same ids spelled out (id = name) resume the study.
    assert open_study(storage, parse_study(_with_ids(definition, names)), "d")[1] is False
    renamed = parse_study(_with_ids(definition, ["small", *[None] * (len(names) - 1)]))
    with pytest.raises(InputError, match=r"calls its anchors .*'zoo:resnet-s'.* not .*'small'"):
        open_study(storage, renamed, "d")
