from __future__ import annotations

import numpy as np
import pytest

from search.core import PruningRule, SearchSpace
from space import Candidate

DEPTHS = {"a": 4, "b": 8, "c": 3}


def test_enumeration_counts_both_orders_and_anchors() -> None:
    space = SearchSpace(DEPTHS)
    assert len(space.pairs()) == 6
    expected = 3 + sum(DEPTHS[f] * DEPTHS[b] for f, b in space.pairs())
    assert len(space) == expected
    cands = space.all_candidates()
    assert cands[:3] == space.anchors()
    assert len({c.key for c in cands}) == len(cands)


def test_encode_decode_round_trip() -> None:
    space = SearchSpace(DEPTHS)
    for c in space.all_candidates():
        assert space.decode(space.encode(c)) == c


def test_decode_ranges() -> None:
    space = SearchSpace(DEPTHS)
    lo = space.decode({"front": "a", "back": "b", "front_cut": 0.0, "back_cut": 0.0})
    hi = space.decode({"front": "a", "back": "b", "front_cut": 1.0, "back_cut": 1.0})
    assert (lo.front_block, lo.back_block) == (1, 0)
    assert (hi.front_block, hi.back_block) == (4, 7)
    assert space.decode({"front": "c", "back": "c", "front_cut": 0.3, "back_cut": 0.9}).is_anchor
    dists = space.distributions()
    assert set(dists) == {"front", "back", "front_cut", "back_cut"}


def test_candidate_config_and_dict() -> None:
    c = Candidate("a", "b", 2, 3)
    assert c.config.to_dict() == {"front": "a", "back": "b", "front_block": 2, "back_block": 3}
    assert Candidate("a", "a").config == "a"
    assert c.to_dict()["kind"] == "stitch"


def test_pruning_rule_threshold_and_top_k() -> None:
    m = np.zeros((5, 9))
    m[2, :8] = np.linspace(0.1, 0.8, 8)  # front cut 2: back cut 7 is the most similar
    rule = PruningRule(threshold=0.5)
    assert rule.reason(Candidate("a", "b", 2, 7), m) is None
    assert "threshold" in rule.reason(Candidate("a", "b", 2, 0), m)
    top = PruningRule(top_k=2)
    assert top.reason(Candidate("a", "b", 2, 7), m) is None
    assert top.reason(Candidate("a", "b", 2, 6), m) is None
    assert "top_k=2" in top.reason(Candidate("a", "b", 2, 5), m)
    assert PruningRule().reason(Candidate("a", "b", 2, 0), m) is None
    assert top.reason(Candidate("a", "a"), m) is None


def test_space_needs_two_anchors() -> None:
    with pytest.raises(ValueError, match="at least two anchors"):
        SearchSpace({"a": 3})


def test_resolutions_multiply_the_space_and_enter_the_encoding() -> None:
    native = SearchSpace(DEPTHS)
    space = SearchSpace(DEPTHS, [32, 48])
    assert len(space) == 2 * len(native)
    cands = space.all_candidates()
    assert cands[:6] == space.anchors() and {c.resolution for c in cands[:6]} == {32, 48}
    assert len({c.key for c in cands}) == len(cands)  # resolution is part of the identity
    dists = space.distributions()
    assert set(dists) == {"front", "back", "front_cut", "back_cut", "resolution"}
    assert list(dists["resolution"].choices) == [32, 48]
    for c in cands:
        params = space.encode(c)
        assert params["resolution"] == c.resolution
        assert space.decode(params) == c
    # Without resolutions nothing changes: four parameters, native candidates.
    assert "resolution" not in native.distributions()
    assert all(c.resolution is None for c in native.all_candidates())
    assert space.signal_keys()[: len(native.pairs())] == [(a, b, 32) for a, b in native.pairs()]
    assert native.signal_keys() == native.pairs()


def test_pruning_reads_each_resolutions_own_signal() -> None:
    space = SearchSpace({"a": 2, "b": 3}, [32, 48])
    rule = PruningRule(threshold=0.5)
    good, bad = np.full((3, 4), 0.9), np.full((3, 4), 0.1)  # a -> b: cuts 0..2 x 0..3
    matrices = {("a", "b", 32): good, ("a", "b", 48): bad}
    matrices |= {("b", "a", r): np.full((4, 3), 0.9) for r in (32, 48)}
    kept = rule.kept(space.all_candidates(), matrices)
    pruned = set(space.all_candidates()) - set(kept)
    assert pruned == set(space.stitches("a", "b", 48))
