"""The pruning rule's signal, depth and YAML form (issue 14, item 3)."""

from __future__ import annotations

import numpy as np
import pytest

from search.core import PruningRule, SearchSpace, pareto_layers
from search.inputs import StudyError, parse_study
from search.strategy import PruningSignals, pruned_reasons
from space import Candidate


def test_pareto_layers_known_answer() -> None:
    # One front cut (k = 1), three back cuts: (signal lower-better, MACs).
    kl = np.array([[np.nan] * 4, [0.1, 0.5, 0.3, np.nan]])
    macs = np.array([[np.nan] * 4, [30.0, 10.0, 20.0, np.nan]])
    layers = pareto_layers(kl, macs, higher_is_better=False)
    # All three trade signal against MACs: one layer.
    assert layers[1, :3].tolist() == [0, 0, 0]
    macs2 = np.array([[np.nan] * 4, [10.0, 30.0, 20.0, np.nan]])
    layers = pareto_layers(kl, macs2, higher_is_better=False)
    # j=0 beats both on signal and MACs; j=2 beats j=1.
    assert layers[1, :3].tolist() == [0, 2, 1]


def test_rule_directions_and_reasons() -> None:
    m = np.array([[np.nan] * 3, [0.2, 0.8, np.nan], [0.5, 0.1, np.nan]])
    macs = np.ones_like(m)
    c = Candidate("a", "b", 1, 1)
    assert "threshold" in PruningRule(0.5, signal="kl").reason(c, m)  # 0.8 > 0.5: worse
    assert PruningRule(0.5, signal="cka").reason(c, m) is None  # 0.8 >= 0.5: better
    assert "top_k=1" in PruningRule(None, 1, signal="residual").reason(c, m)
    assert PruningRule(None, 1, signal="residual").reason(Candidate("a", "b", 1, 0), m) is None
    # equal MACs: layers follow the signal 0.1, 0.2, 0.5, 0.8
    assert "Pareto layer 4" in PruningRule(None, signal="kl", depth=1).reason(c, m, macs)
    with pytest.raises(ValueError, match="needs the MACs"):
        PruningRule(None, signal="kl", depth=1).reason(c, m)
    with pytest.raises(ValueError, match="pruning signal must be one of"):
        PruningRule(signal="naswot")
    assert not PruningRule(None, signal="kl").active
    assert not PruningRule(0.0, signal="cka").active


def test_pruned_reasons_read_the_signals_not_cka() -> None:
    space = SearchSpace({"a": 2, "b": 2})
    cka = {p: np.ones((3, 3)) for p in space.pairs()}
    kl = {
        p: np.array([[np.nan] * 3, [0.1, 0.9, np.nan], [0.2, 0.3, np.nan]]) for p in space.pairs()
    }
    macs = {
        p: np.array([[np.nan] * 3, [1.0, 1.0, np.nan], [2.0, 2.0, np.nan]]) for p in space.pairs()
    }
    rule = PruningRule(None, signal="kl", depth=1)
    with pytest.raises(ValueError, match="needs the MACs"):  # a depth rule needs PruningSignals
        pruned_reasons(space, cka, rule)
    pruned = pruned_reasons(space, cka, rule, PruningSignals(kl, macs))
    # Layer 0: (k=1, j=0) only; everything else is dominated by it.
    assert sorted(c.key for c, _ in pruned.values()) == sorted(
        Candidate(a, b, k, j).key for a, b in space.pairs() for k, j in [(1, 1), (2, 0), (2, 1)]
    )


def test_yaml_rule_choice_and_old_form() -> None:
    default = parse_study({"anchors": ["a", "b"]})
    assert default.pruning_rule == PruningRule(None, None, signal="kl", depth=3)
    old = parse_study({"anchors": ["a", "b"], "cka": {"threshold": 0.3, "top_k": 4}})
    assert old.pruning_rule == PruningRule(0.3, 4)  # old YAMLs keep their CKA rule
    assert old.pruning_images == 512
    res = parse_study(
        {"anchors": ["a", "b"], "pruning": {"signal": "residual", "depth": None, "top_k": 2}}
    )
    assert res.pruning_rule == PruningRule(None, 2, signal="residual", depth=None)
    assert res.pruning_images == res.data.calibration
    off = parse_study({"anchors": ["a", "b"], "pruning": {"depth": None}})
    assert not off.pruning_rule.active


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"pruning": {"signal": "naswot"}}, "pruning.signal"),
        ({"pruning": {"depth": 0}}, "pruning.depth"),
        ({"pruning": {"signal": "cka", "threshold": 2.0}}, "pruning"),
        ({"pruning": {"treshold": 0.2}}, "pruning.treshold"),
        ({"pruning": {"signal": "kl"}, "cka": {"top_k": 3}}, "<top level>"),
    ],
)
def test_bad_pruning_yaml_is_one_line(data, field) -> None:
    with pytest.raises(StudyError) as e:
        parse_study({"anchors": ["a", "b"], **data}, source="s.yaml")
    msg = str(e.value)
    assert "\n" not in msg and f"field '{field}'" in msg, msg
