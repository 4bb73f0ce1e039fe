"""``cuts: stages``: a search space restricted to stage boundaries (tiny anchors, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from optuna.trial import TrialState
from ray.tune.search import Searcher

from evaluators import stitch_macs, stitch_signals
from search.core import PruningRule, SearchSpace, build_space, evaluated_trials
from search.inputs import StudyError, load_anchors, load_study, parse_study, study_space
from search.strategy import PruningSignals, pruned_reasons
from space import Candidate, InputError
from tests.conftest import make_tiny
from tests.search.strategy.test_searcher import _run, _searcher, _study

#: Stage-boundary stitch points of resnet10t (stages 1, 1, 1, 1) and the tiny ConvNeXt
#: (depths 1, 1, 2, 1), in both orders.
POINTS = {("r", "c"): [(1, 1), (2, 2), (3, 4)], ("c", "r"): [(1, 1), (2, 2), (4, 3)]}


@pytest.fixture(scope="module")
def anchors():
    return {"r": make_tiny("resnet"), "c": make_tiny("convnext")}


def test_stages_keep_only_the_stage_boundaries(anchors) -> None:
    full = build_space(anchors)
    assert len(full) == 2 + 4 * 5 + 5 * 4
    space = build_space(anchors, cuts="stages")
    assert space.points == POINTS
    assert len(space) == 2 + 3 + 3
    stitches = [c for c in space.all_candidates() if not c.is_anchor]
    assert [(c.front_block, c.back_block) for c in stitches] == POINTS[("r", "c")] + POINTS[
        ("c", "r")
    ]
    assert space.stitch_points("r", "c") == space.restricted_points("r", "c") == POINTS[("r", "c")]
    assert full.restricted_points("r", "c") is None
    # With resolutions, each point exists once per size.
    assert len(build_space(anchors, [32, 48], cuts="stages")) == 2 * 8
    with pytest.raises(ValueError, match="cuts must be one of all, stages"):
        build_space(anchors, cuts="blocks")


def test_every_parameter_vector_decodes_to_a_stage_point(anchors) -> None:
    space = build_space(anchors, cuts="stages")
    for c in space.all_candidates():
        assert space.decode(space.encode(c)) == c
    allowed = {c.key for c in space.all_candidates()}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        front, back = rng.choice(["r", "c"], 2)
        params = {"front": front, "back": back, "front_cut": rng.random(), "back_cut": rng.random()}
        c = space.decode(params)
        assert c.key in allowed
        seen.add(c.key)
    assert seen == allowed  # and each is reachable
    # The nearest point by relative depth: the deep end of r -> c is (3, 4).
    assert space.decode({"front": "r", "back": "c", "front_cut": 1.0, "back_cut": 1.0}) == (
        Candidate("r", "c", 3, 4)
    )


def test_bad_points_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'a' -> 'b' must be a non-empty list"):
        SearchSpace({"a": 2, "b": 2}, points={("a", "b"): [(0, 0)], ("b", "a"): [(1, 0)]})
    with pytest.raises(ValueError, match=r"'b' -> 'a' must be a non-empty list"):
        SearchSpace({"a": 2, "b": 2}, points={("a", "b"): [(1, 0)]})


def test_searcher_evaluates_exactly_the_stage_points() -> None:
    space = SearchSpace(
        {"a": 3, "b": 4}, points={("a", "b"): [(1, 1), (3, 2)], ("b", "a"): [(2, 1)]}
    )
    study = _study(space)
    s, _ = _searcher(study, space, total=100)
    assert s.record_pruned() == 0  # back cut 0 would be pruned, but no stage point has j = 0
    dispatched = _run(s, 5)
    assert s.suggest("t-last") == Searcher.FINISHED
    keys = sorted(t.user_attrs["key"] for t in evaluated_trials(study))
    assert keys == sorted(c.key for c in space.all_candidates())
    assert len(dispatched) == len(study.get_trials(states=(TrialState.COMPLETE,))) == 5


def test_pruning_ranks_among_the_stage_points_only() -> None:
    space = SearchSpace(
        {"a": 2, "b": 3}, points={("a", "b"): [(1, 0), (2, 1)], ("b", "a"): [(1, 0)]}
    )
    # Front cut 1 of a -> b: back cut 2 has the best signal, but the space does not hold it.
    kl = np.full((3, 4), 0.5)
    kl[1, :3] = [0.4, 0.3, 0.1]
    kl[2, :3] = [0.4, 0.35, 0.2]
    values = {("a", "b"): kl, ("b", "a"): np.full((4, 3), 0.5)}
    top1 = PruningRule(None, 1, signal="kl")
    assert pruned_reasons(space, {}, top1, PruningSignals(values)) == {}
    # The same rule on the full space prunes them (j = 2 beats both).
    full = pruned_reasons(SearchSpace({"a": 2, "b": 3}), {}, top1, PruningSignals(values))
    assert {Candidate("a", "b", 1, 0).key, Candidate("a", "b", 2, 1).key} <= set(full)
    # A depth rule compares (signal, MACs) among the stage points only.
    macs = {k: np.ones_like(v) for k, v in values.items()}
    depth1 = PruningRule(None, signal="kl", depth=1)
    pruned = pruned_reasons(space, {}, depth1, PruningSignals(values, macs))
    assert set(pruned) == {Candidate("a", "b", 1, 0).key}  # 0.4 vs 0.35 at equal MACs


def test_signals_and_macs_of_stage_points_only(anchors) -> None:
    front, back = anchors["r"], anchors["c"]
    images = torch.randn(16, 3, 32, 32)
    points = POINTS[("r", "c")]
    full = stitch_signals(front, back, [images], use_cache=False)
    some = stitch_signals(front, back, [images], use_cache=False, points=points)
    mask = np.zeros(full["kl"].shape, dtype=bool)
    for p in points:
        mask[p] = True
    for name in ("kl", "residual"):
        np.testing.assert_allclose(some[name][mask], full[name][mask], rtol=1e-6)
        assert np.isnan(some[name][~mask]).all()
    macs = stitch_macs(front, back, points)
    np.testing.assert_array_equal(macs[mask], stitch_macs(front, back)[mask])
    assert np.isnan(macs[~mask]).all()
    with pytest.raises(ValueError, match=r"\[\(5, 0\)\] are not stitch points"):
        stitch_macs(front, back, [(5, 0)])


def test_study_yaml_cuts_field() -> None:
    assert parse_study({"anchors": ["a", "b"]}).cuts == "all"
    assert parse_study({"anchors": ["a", "b"], "cuts": "stages"}).cuts == "stages"
    with pytest.raises(StudyError) as e:
        parse_study({"anchors": ["a", "b"], "cuts": "blocks"}, source="s.yaml")
    assert str(e.value) == "s.yaml: field 'cuts': Input should be 'all' or 'stages' (got 'blocks')"


def _tiny_study(tmp_path, cuts: str, second: dict) -> Path:
    definition = {
        "name": "t",
        "anchors": [
            {"name": "resnet10t", "timm_kwargs": {"num_classes": 4}, "input_size": [3, 32, 32]},
            second,
        ],
        "data": {"dataset": "synthetic"},
        "cuts": cuts,
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(definition))
    return path


def test_load_anchors_checks_the_stages(tmp_path) -> None:
    convnext = {
        "name": "convnext_atto",
        "timm_kwargs": {"depths": [1, 1, 2, 1], "dims": [16, 24, 32, 48], "num_classes": 4},
        "input_size": [3, 32, 32],
    }
    path = _tiny_study(tmp_path, "stages", convnext)
    study = load_study(path)
    anchors, _ = load_anchors(study, path)
    space = study_space(study, anchors, path)
    assert space.points == {
        ("resnet10t", "convnext_atto"): POINTS[("r", "c")],
        ("convnext_atto", "resnet10t"): POINTS[("c", "r")],
    }
    vit = {
        "name": "vit_tiny_patch16_224",
        "timm_kwargs": {
            "img_size": 32,
            "patch_size": 8,
            "depth": 2,
            "embed_dim": 32,
            "num_heads": 2,
            "num_classes": 4,
        },
    }
    path = _tiny_study(tmp_path, "stages", vit)
    with pytest.raises(InputError) as e:
        load_anchors(load_study(path), path)
    assert f"{path}: field 'cuts': anchor 'vit_tiny_patch16_224' (vit) has no stages" in str(
        e.value
    )
    assert "use cuts: all" in str(e.value)
    path = _tiny_study(tmp_path, "all", vit)
    load_anchors(load_study(path), path)  # every (k, j): no stages needed


def test_a_stored_study_keeps_its_cuts() -> None:
    import optuna

    from search.store import open_study

    definition = yaml.safe_load((Path(__file__).parents[2] / "studies/default.yaml").read_text())
    every = parse_study({**definition, "cuts": "all"})
    stages = parse_study({**definition, "cuts": "stages"})
    storage = optuna.storages.InMemoryStorage()
    assert open_study(storage, every, "d1")[1] is True
    assert open_study(storage, every, "d2")[1] is False
    with pytest.raises(InputError, match=r"searches cuts: all, not cuts: stages"):
        open_study(storage, stages, "d3")
