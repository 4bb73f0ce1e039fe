from __future__ import annotations

import json

import pytest

from space import StitchConfig


def test_json_round_trip() -> None:
    cfg = StitchConfig("zoo:resnet-s", "deit_tiny_patch16_224", 3, 5)
    assert StitchConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert StitchConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(AttributeError):
        cfg.front_block = 1  # frozen


def test_validate_names_valid_range(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    StitchConfig(front.name, back.name, 4, 0).validate(front, back)
    with pytest.raises(ValueError, match=r"front_block=5 .* valid range is 0\.\.4"):
        StitchConfig(front.name, back.name, 5, 0).validate(front, back)
    with pytest.raises(ValueError, match=r"back_block=4 .* valid range is 0\.\.3"):
        StitchConfig(front.name, back.name, 1, 4).validate(front, back)
    with pytest.raises(ValueError, match="StitchConfig.front is"):
        StitchConfig("other", back.name, 1, 1).validate(front, back)


@pytest.mark.parametrize(
    "bad",
    [
        {"front": "a", "back": "b", "front_block": 1},
        {"front": "a", "back": "b", "front_block": 1, "back_block": 2, "extra": 0},
        {"front": "", "back": "b", "front_block": 1, "back_block": 2},
        {"front": "a", "back": "b", "front_block": -1, "back_block": 2},
        {"front": "a", "back": "b", "front_block": "1", "back_block": 2},
        {"front": "a", "back": "b", "front_block": True, "back_block": 2},
    ],
)
def test_from_dict_rejects(bad) -> None:
    with pytest.raises(ValueError):
        StitchConfig.from_dict(bad)
