from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from evaluators import (
    ArrayLoader,
    MinibatchCKA,
    cka_features,
    cka_matrix,
    linear_cka,
    minibatch_cka,
)
from evaluators.latency import LiveBytes
from space import adapt_images
from tests.conftest import make_tiny


def _np_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def _np_hsic1(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC, written out term by term."""
    n = k.shape[0]
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    one = np.ones(n)
    return (
        np.trace(k @ m)
        + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ k @ m @ one)
    ) / (n * (n - 3))


def _np_minibatch_cka(xs: list[np.ndarray], ys: list[np.ndarray]) -> float:
    kl = kk = ll = 0.0
    for x, y in zip(xs, ys, strict=True):
        k, m = x @ x.T, y @ y.T
        kl += _np_hsic1(k, m)
        kk += _np_hsic1(k, k)
        ll += _np_hsic1(m, m)
    return kl / np.sqrt(kk * ll)


@pytest.mark.parametrize(("n", "d1", "d2"), [(50, 8, 12), (20, 64, 40)])
def test_linear_cka_matches_float64_reference(n: int, d1: int, d2: int) -> None:
    g = np.random.default_rng(0)
    x = g.normal(size=(n, d1))
    y = x[:, :1] * 2 + 0.5 * g.normal(size=(n, d2))
    ref = _np_linear_cka(x, y)
    got = linear_cka(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert abs(got - ref) < 1e-5
    assert abs(linear_cka(x, y) - ref) < 1e-10
    assert 0.0 < ref < 1.0


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_invariances_and_identity(unbiased: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 16, generator=g, dtype=torch.float64)
    y = x @ torch.randn(16, 10, generator=g, dtype=torch.float64) + torch.randn(
        40, 10, generator=g, dtype=torch.float64
    )
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    base = linear_cka(x, y, unbiased=unbiased)
    assert abs(linear_cka(x @ q, y, unbiased=unbiased) - base) < 1e-10
    assert abs(linear_cka(3.7 * x, 0.01 * y, unbiased=unbiased) - base) < 1e-10
    assert abs(linear_cka(x, x, unbiased=unbiased) - 1.0) < 1e-12
    assert base < 0.99


def test_unbiased_cka_matches_song_formula() -> None:
    g = np.random.default_rng(2)
    x, y = g.normal(size=(30, 5)), g.normal(size=(30, 7))
    x[:, 0] += y[:, 0] * 3
    ref = _np_hsic1(x @ x.T, y @ y.T) / np.sqrt(
        _np_hsic1(x @ x.T, x @ x.T) * _np_hsic1(y @ y.T, y @ y.T)
    )
    assert abs(linear_cka(x, y, unbiased=True) - ref) < 1e-10


def test_minibatch_cka_matches_reference_and_is_one_for_identical() -> None:
    g = np.random.default_rng(3)
    xs = [g.normal(size=(16, 6)) for _ in range(4)]
    ys = [x @ g.normal(size=(6, 9)) + g.normal(size=(16, 9)) for x in xs]
    got = minibatch_cka((torch.tensor(x), torch.tensor(y)) for x, y in zip(xs, ys, strict=True))
    assert abs(got - _np_minibatch_cka(xs, ys)) < 1e-10
    assert abs(minibatch_cka((torch.tensor(x), torch.tensor(x)) for x in xs) - 1.0) < 1e-12


def test_minibatch_accumulator_state_does_not_grow() -> None:
    acc = MinibatchCKA(2, 3)
    for _ in range(5):
        acc.update([torch.randn(8, 4), torch.randn(8, 5)], [torch.randn(8, 2)] * 3)
    assert acc.cross.shape == (2, 3) and acc.num_images == 40 and acc.num_batches == 5
    with pytest.raises(ValueError, match="at least 4"):
        acc.update([torch.randn(3, 4)] * 2, [torch.randn(3, 2)] * 3)


def test_non_finite_inputs_raise() -> None:
    x = torch.randn(10, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        linear_cka(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="non-finite"):
        minibatch_cka([(x, torch.randn(10, 3))])


def _loader(anchor, n: int = 48, batch: int = 16, seed: int = 0) -> ArrayLoader:
    g = torch.Generator().manual_seed(seed)
    return ArrayLoader(
        torch.randn(n, *anchor.input_size, generator=g),
        torch.zeros(n, dtype=torch.int64),
        batch_size=batch,
    )


def _reference(front, back, loader, mode: str) -> np.ndarray:
    """float64 anchors, float64 features, Song's formula in numpy."""
    f64, b64 = copy.deepcopy(front.model).double(), copy.deepcopy(back.model).double()
    fa, ba = copy.copy(front), copy.copy(back)
    fa.model, ba.model = f64, b64
    fa.blocks, ba.blocks = fa._family.blocks(f64), ba._family.blocks(b64)
    fi, bi = front.features(), back.features()
    xs = {k: [] for k in range(len(fi))}
    ys = {j: [] for j in range(len(bi))}
    with torch.no_grad():
        for x, _ in loader:
            x = x.double()
            for k, a in enumerate(fa.forward_cuts(x)):
                xs[k].append(cka_features(a, fi[k], mode).numpy())
            for j, a in enumerate(ba.forward_cuts(adapt_images(x, back.input_size))):
                ys[j].append(cka_features(a, bi[j], mode).numpy())
    out = np.zeros((len(fi), len(bi)))
    for k in xs:
        for j in ys:
            out[k, j] = _np_minibatch_cka(xs[k], ys[j])
    return out


@pytest.mark.parametrize(
    ("a", "b", "mode"),
    [("resnet", "vit", "pooled"), ("vit", "convnext", "flatten"), ("deit", "resnet", "pooled")],
)
def test_cka_matrix_matches_float64_reference(a: str, b: str, mode: str, tiny_anchor) -> None:
    front, back = tiny_anchor(a), tiny_anchor(b)
    loader = _loader(front)
    got = cka_matrix(front, back, loader, mode=mode, use_cache=False)
    assert got.shape == (front.num_blocks + 1, back.num_blocks + 1)
    ref = _reference(front, back, loader, mode)
    assert np.abs(got - ref).max() < 1e-4
    assert np.isfinite(got).all() and np.ptp(got) > 1e-3  # not a degenerate matrix


def test_cka_matrix_of_anchor_with_itself(tiny_anchor) -> None:
    anchor = tiny_anchor("resnet")
    m = cka_matrix(anchor, anchor, _loader(anchor), use_cache=False)
    assert np.allclose(np.diag(m), 1.0, atol=1e-9)
    assert np.allclose(m, m.T, atol=1e-12)
    # (timm zero-initialises the last BN of residual blocks, so some blocks start as the
    # identity and neighbouring cuts can match exactly)
    assert m.min() < 0.99


def test_cka_matrix_back_anchor_with_other_input_size(tiny_anchor) -> None:
    front = tiny_anchor("resnet")
    back = make_tiny("convnext")
    back.input_size = (3, 48, 48)
    m = cka_matrix(front, back, _loader(front, n=32), use_cache=False)
    assert m.shape == (front.num_blocks + 1, back.num_blocks + 1)
    assert np.isfinite(m).all()


def test_cka_matrix_num_images_uses_the_first_images(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    loader = _loader(front, n=64, batch=16)
    limited = cka_matrix(front, back, loader, num_images=40, use_cache=False)
    sub = ArrayLoader(loader.images[:40], loader.labels[:40], batch_size=16)
    assert np.allclose(limited, cka_matrix(front, back, sub, use_cache=False), atol=1e-12)
    assert not np.allclose(limited, cka_matrix(front, back, loader, use_cache=False), atol=1e-6)


def test_cka_memory_does_not_grow_with_images(tiny_anchor) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    peaks = []
    for n in (32, 128):
        loader = _loader(front, n=n, batch=16)
        with LiveBytes() as tracker:
            cka_matrix(front, back, loader, use_cache=False)
        peaks.append(tracker.peak)
    assert peaks[0] > 0
    assert peaks[1] <= peaks[0] * 1.05


def test_cka_cache_is_written_atomically_and_reused(tiny_anchor, tmp_path, monkeypatch) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    loader = _loader(front, n=32)
    first = cka_matrix(front, back, loader, cache_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    meta = json.loads((tmp_path / files[0]).read_text())
    assert meta["num_images"] == 32 and meta["mode"] == "pooled"

    def boom(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(type(front), "forward_cuts", boom)
    again = cka_matrix(front, back, loader, cache_dir=tmp_path)
    assert np.array_equal(first, again)
    with pytest.raises(AssertionError, match="cache was not used"):
        cka_matrix(front, back, loader, cache_dir=tmp_path, mode="flatten")
    with pytest.raises(AssertionError, match="cache was not used"):
        cka_matrix(front, back, loader, cache_dir=tmp_path, data_identity="other-data")
    assert not any(p.suffix == ".tmp" for p in tmp_path.iterdir())


def test_cka_matrix_non_finite_activations_raise() -> None:
    bad = make_tiny("resnet")
    with torch.no_grad():
        bad.blocks[1].conv1.weight.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"non-finite activations at cut 2 of the front anchor"):
        cka_matrix(bad, bad, _loader(bad, n=16), use_cache=False)


def test_cka_matrix_bad_mode_and_too_few_images(tiny_anchor) -> None:
    a = tiny_anchor("resnet")
    with pytest.raises(ValueError, match="mode must be one of"):
        cka_matrix(a, a, _loader(a), mode="mean", use_cache=False)
    with pytest.raises(ValueError, match="at least one batch"):
        cka_matrix(a, a, _loader(a, n=3, batch=3), use_cache=False)


def test_minibatch_cka_invariances() -> None:
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(12, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    ys = [x[:, :3] + 0.3 * torch.randn(12, 3, generator=g, dtype=torch.float64) for x in xs]
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    base = minibatch_cka(zip(xs, ys, strict=True))
    moved = minibatch_cka((2.5 * x @ q, y * 0.1) for x, y in zip(xs, ys, strict=True))
    assert abs(base - moved) < 1e-10 and 0.1 < base < 0.999


class _Evil:
    """Pickles as a call that would create a file: loading it must not execute that."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda p: p.write_bytes(b"\x93NUMPY garbage" * 50), id="garbage"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:60]), id="truncated"),
        pytest.param(lambda p: np.save(p, np.full((2, 2), np.nan)), id="wrong-shape-nan"),
        pytest.param(
            lambda p: np.save(p, np.array([_Evil(p.parent / "pwned")], dtype=object)),
            id="pickled-object-array",
        ),
    ],
)
def test_a_damaged_cka_cache_entry_is_recomputed(tiny_anchor, tmp_path, damage) -> None:
    front, back = tiny_anchor("resnet"), tiny_anchor("vit")
    loader = _loader(front, n=32)
    first = cka_matrix(front, back, loader, cache_dir=tmp_path)
    (entry,) = tmp_path.glob("*.npy")
    damage(entry)
    again = cka_matrix(front, back, loader, cache_dir=tmp_path)
    assert np.allclose(first, again)
    assert np.array_equal(np.load(entry, allow_pickle=False), again)  # rewritten whole
    assert not (tmp_path / "pwned").exists() and not list(tmp_path.glob("*.tmp"))
