"""The proposal filter: what the wrapped sampler learns from, and how often it reads trials."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from search.core import SearchSpace
from search.strategy import FilteredSampler, install_sampler, make_sampler, stitch_trials

DEPTHS = {"a": 3, "b": 4}


class _Recording(optuna.samplers.RandomSampler):
    """A real random sampler that records the trials it is shown."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.seen: list[list[int]] = []

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_independent(self, study, trial, name, dist):
        states = (TrialState.COMPLETE, TrialState.PRUNED)
        self.seen.append([t.number for t in study._get_trials(deepcopy=False, states=states)])
        return super().sample_independent(study, trial, name, dist)


def _add(study, space, cand, state, values=None, **attrs):
    kind = "anchor" if cand.is_anchor else "stitch"
    study.add_trial(
        create_trial(
            state=state,
            params=space.encode(cand),
            distributions=space.distributions(),
            values=values,
            user_attrs={"kind": kind, "key": cand.key, **attrs},
        )
    )


def _study(space, inner, **kw):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=inner)
    study.sampler = FilteredSampler(inner, space, lambda c: True, lambda: None, **kw)
    return study


def test_stitch_trials_admits_only_evaluated_stitch_points() -> None:
    space = SearchSpace(DEPTHS)
    study = _study(space, _Recording())
    anchor = space.anchors()[0]
    s1, s2, s3 = space.stitches("a", "b")[:3]
    _add(study, space, anchor, TrialState.COMPLETE, [90.0, 1e6])
    _add(study, space, s1, TrialState.COMPLETE, [70.0, 2e6])
    _add(study, space, s2, TrialState.PRUNED, pruned_reason="cka 0.1 < 0.5")
    _add(study, space, s1, TrialState.COMPLETE, [70.0, 2e6], duplicate_of=1)
    _add(study, space, s3, TrialState.FAIL)
    admitted = [t.number for t in study.trials if stitch_trials(t)]
    assert admitted == [1, 4]  # the failed one is never asked for by samplers

    study.ask(space.distributions())
    inner = study.sampler.inner
    assert inner.seen and all(seen == [1] for seen in inner.seen)


def test_learn_from_none_shows_every_trial() -> None:
    space = SearchSpace(DEPTHS)
    study = _study(space, _Recording(), learn_from=None)
    _add(study, space, space.anchors()[0], TrialState.COMPLETE, [90.0, 1e6])
    _add(study, space, space.stitches("a", "b")[0], TrialState.PRUNED)
    study.ask(space.distributions())
    assert study.sampler.inner.seen[0] == [0, 1]


def _tpe_anchor_draws(learn_from) -> int:
    """Draws a seeded TPE wastes on explored anchors after anchors and a few stitches."""
    space = SearchSpace(DEPTHS)
    inner = optuna.samplers.TPESampler(seed=0, n_startup_trials=4, multivariate=True)
    explored: set[str] = set()
    anchors_drawn = 0

    def accept(c) -> bool:
        nonlocal anchors_drawn
        anchors_drawn += c.is_anchor
        return c.key not in explored

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.sampler = FilteredSampler(
        inner, space, accept, lambda: None, max_tries=16, learn_from=learn_from
    )
    for c in space.anchors():  # the anchors: the best accuracy per MAC by far
        _add(study, space, c, TrialState.COMPLETE, [90.0 + DEPTHS[c.front], 1e6 * DEPTHS[c.front]])
        explored.add(c.key)
    for i, c in enumerate(space.stitches("a", "b")[:6] + space.stitches("b", "a")[:6]):
        _add(study, space, c, TrialState.COMPLETE, [50.0 + i, 2e6 + 1e5 * i])
        explored.add(c.key)
    for _ in range(10):
        trial = study.ask(space.distributions())
        explored.add(space.decode(trial.params).key)
        study.tell(trial, state=TrialState.FAIL)
    return anchors_drawn


def test_tpe_without_anchors_stops_drawing_them() -> None:
    with_anchors = _tpe_anchor_draws(None)
    without = _tpe_anchor_draws(stitch_trials)
    assert with_anchors > 2 * without, (with_anchors, without)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("tpe", optuna.samplers.TPESampler),
        ("nsga2", optuna.samplers.NSGAIISampler),
        ("random", optuna.samplers.RandomSampler),
    ],
)
def test_make_sampler_builds_the_named_sampler(name, cls) -> None:
    assert type(make_sampler(name, 0, 2)) is cls


def test_make_sampler_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"unknown sampler 'cmaes': use one of tpe, nsga2"):
        make_sampler("cmaes", 0, 2)


def test_install_sampler_wraps_the_inner_sampler_once() -> None:
    space = SearchSpace(DEPTHS)
    study = optuna.create_study(directions=["maximize", "minimize"])
    inner = optuna.samplers.RandomSampler(seed=0)
    filtered = install_sampler(study, inner, space, lambda c: True, lambda: None)
    assert study.sampler is filtered and filtered.inner is inner
    with pytest.raises(TypeError, match="pass the sampler"):
        install_sampler(study, filtered, space, lambda c: True, lambda: None)
    assert study.sampler is filtered
