from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from space import InputError, load_anchor
from tests.conftest import TINY, make_tiny


@pytest.mark.parametrize("family", sorted(TINY))
def test_halves_reproduce_logits(family: str, tiny_anchor) -> None:
    anchor = tiny_anchor(family)
    x = torch.randn(3, *anchor.input_size)
    with torch.no_grad():
        ref = anchor.model(x)
        for k in range(anchor.num_blocks + 1):
            out = anchor.forward_back(anchor.forward_front(x, k), k)
            assert (out - ref).abs().max().item() <= 1e-5, f"cut {k}"


@pytest.mark.parametrize("family", sorted(TINY))
def test_features_describe_every_cut(family: str, tiny_anchor) -> None:
    anchor = tiny_anchor(family)
    x = torch.randn(2, *anchor.input_size)
    feats = anchor.features()
    assert len(feats) == anchor.num_blocks + 1
    with torch.no_grad():
        acts = anchor.forward_cuts(x)
    for info, act in zip(feats, acts, strict=True):
        assert tuple(act.shape[1:]) == info.shape
        expected = "NLC" if anchor.kind == "vit" else "NCHW"
        assert info.layout == expected
    if anchor.kind == "vit":
        assert feats[0].num_prefix_tokens == anchor.model.num_prefix_tokens
    assert anchor.block_output_info(0) == feats[1]


def test_residual_block_granularity() -> None:
    # resnet18: 4 stages x 2 BasicBlocks; resnet50: 3+4+6+3 Bottlenecks.
    assert load_anchor("resnet18").num_blocks == 8
    assert load_anchor("resnet50", num_classes=10).num_blocks == 16
    assert load_anchor("deit_tiny_patch16_224").num_blocks == 12
    assert load_anchor("convnext_atto").num_blocks == 2 + 2 + 6 + 2
    assert load_anchor("mobilenetv3_small_100").num_blocks == 1 + 2 + 3 + 2 + 3 + 1


def test_cut_out_of_range(tiny_anchor) -> None:
    anchor = tiny_anchor("resnet")
    with pytest.raises(ValueError, match=r"valid cuts are 0\.\.4"):
        anchor.forward_front(torch.zeros(1, 3, 32, 32), 5)


def test_random_init_is_seeded() -> None:
    name, kwargs, _ = TINY["vit"]
    a, b = load_anchor(name, **kwargs), load_anchor(name, **kwargs)
    c = load_anchor(name, seed=1, **kwargs)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256


def test_unknown_model_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet181'.*did you mean.*'resnet18'"):
        load_anchor("resnet181")


def test_unsupported_family() -> None:
    with pytest.raises(ValueError, match="not a supported family"):
        load_anchor("mixer_s16_224")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_round_trip(tmp_path, suffix: str) -> None:
    src = make_tiny("resnet", seed=1)
    path = tmp_path / f"w{suffix}"
    state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    name, kwargs, size = TINY["resnet"]
    # A different random init, overwritten by the checkpoint.
    loaded = load_anchor(name, checkpoint=path, input_size=size, seed=123, **kwargs)
    x = torch.randn(2, *size)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), src.model(x))
    assert loaded.checkpoint_sha256 is not None and len(loaded.checkpoint_sha256) == 64
    assert loaded.identity.startswith(f"{name}@{loaded.checkpoint_sha256}")


def test_missing_checkpoint(tmp_path) -> None:
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match=r"nope\.safetensors.*does not exist"):
        load_anchor("resnet10t", checkpoint=missing)


def test_checkpoint_shape_mismatch_names_fix(tmp_path) -> None:
    src = make_tiny("resnet")  # 10 classes
    path = tmp_path / "ten.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"ten\.safetensors.*shape mismatches.*num_classes=10"):
        load_anchor("resnet10t", checkpoint=path)  # 1000 classes by default


def test_checkpoint_wrong_architecture(tmp_path) -> None:
    src = make_tiny("vit")
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"does not fit model 'resnet10t'.*missing keys"):
        load_anchor("resnet10t", checkpoint=path, num_classes=10)


def test_truncated_checkpoint(tmp_path) -> None:
    src = make_tiny("resnet")
    for suffix in (".safetensors", ".pth"):
        path = tmp_path / f"t{suffix}"
        state = {k: v.contiguous() for k, v in src.model.state_dict().items()}
        if suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save(state, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=rf"t\{suffix}"):
            load_anchor("resnet10t", checkpoint=path, num_classes=10)


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_pickle_with_code_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": _Evil(str(marker))}, f)
    with pytest.raises(ValueError, match=r"evil\.pth.*refused.*execute code"):
        load_anchor("resnet10t", checkpoint=path)
    assert not marker.exists()


def test_checkpoint_and_pretrained_exclusive(tmp_path) -> None:
    with pytest.raises(ValueError, match="either checkpoint= or pretrained=True"):
        load_anchor("resnet10t", checkpoint=tmp_path / "x.pth", pretrained=True)


def test_bad_input_size(tiny_anchor) -> None:
    anchor = make_tiny("resnet")
    with pytest.raises(ValueError, match="input_size"):
        anchor.input_size = (3, 0, 32)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"name": "resnet181"}, "unknown model"),
        ({"name": "mixer_s16_224"}, "not a supported family"),
        ({"name": "resnet10t", "bogus_kwarg": 1}, "bad timm kwargs"),
        ({"name": "resnet10t", "checkpoint": "/nonexistent/x.pth"}, "does not exist"),
        ({"name": "zoo:nope"}, "unknown zoo anchor"),
        ({"name": "zoo:resnet-s", "seed": 1, "num_classes": 3}, "takes no checkpoint"),
    ],
)
def test_user_input_errors_are_input_errors(kwargs, words) -> None:
    # The CLIs catch only InputError: everything a user can get wrong must be one.
    with pytest.raises(InputError, match=words) as info:
        load_anchor(**kwargs)
    assert "\n" not in str(info.value)
