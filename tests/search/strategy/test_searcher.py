"""The searcher's ask/tell logic, driven directly (no Ray cluster), as Ray Tune would."""

from __future__ import annotations

import json
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState
from ray.tune.search import Searcher

from search.core import DeviceBudget, PruningRule, SearchSpace, evaluated_trials
from search.store import HEARTBEAT_KEY, fail_stale_trials
from search.strategy import SearcherSettings, StitchSearcher

DEPTHS = {"a": 3, "b": 4}


def _study(space, sampler=None):
    study = optuna.create_study(
        study_name="t",
        storage=optuna.storages.InMemoryStorage(),
        directions=["maximize", "minimize"],
        sampler=sampler or optuna.samplers.RandomSampler(seed=0),
    )
    for c in space.anchors():
        study.enqueue_trial(space.encode(c))
    return study


def _matrices(space):
    out = {}
    for f, b in space.pairs():
        m = np.full((space.depths[f] + 1, space.depths[b] + 1), 0.9)
        m[:, 0] = 0.1  # back cut 0 always dissimilar: pruned by threshold 0.5
        out[(f, b)] = m
    return out


def _fake_result(config):
    cand = json.loads(config["candidate"])
    macs = 1e6 if cand["kind"] == "anchor" else 2e6 + 1e5 * cand["front_block"]
    return {
        "val_acc": 80.0 + macs / 1e6,
        "macs": macs,
        "params": 1000,
        "latency_ms": 1.0,
        "memory_mb": 1.0,
        "cka": config["cka"],
    }


def _searcher(study, space, total, **kw):
    events = []
    settings = SearcherSettings(
        objectives=["accuracy", "macs"],
        budgets=[DeviceBudget("small", max_macs=1.5e6), DeviceBudget("mid", max_macs=2.25e6)],
        rule=PruningRule(threshold=0.5),
        total=total,
        driver_id="d1",
        **kw,
    )
    s = StitchSearcher(
        study,
        space,
        settings,
        sampler=study.sampler,
        cka=_matrices(space),
        on_event=lambda kind, t: events.append((kind, t.number)),
    )
    return s, events


def _run(s, n, start=0):
    out = []
    for i in range(start, start + n):
        cfg = s.suggest(f"t{i}")
        assert isinstance(cfg, dict), cfg
        out.append(json.loads(cfg["candidate"]))
        s.on_trial_complete(f"t{i}", _fake_result(cfg))
    return out


@pytest.mark.parametrize(
    "sampler",
    [
        optuna.samplers.RandomSampler(seed=0),
        optuna.samplers.TPESampler(seed=0, n_startup_trials=3),
        optuna.samplers.NSGAIISampler(seed=0, population_size=4),
    ],
    ids=["random", "tpe", "nsga2"],
)
def test_anchors_first_then_only_unpruned_unexplored(sampler) -> None:
    space = SearchSpace(DEPTHS)
    study = _study(space, sampler)
    s, events = _searcher(study, space, total=12)
    assert s.record_pruned() == 3 + 4  # back cut 0 for every front cut of both pairs
    assert s.record_pruned() == 0  # recorded once per study
    dispatched = _run(s, 12)
    assert [d["kind"] for d in dispatched[:2]] == ["anchor", "anchor"]
    assert all(d["kind"] == "anchor" or d["back_block"] != 0 for d in dispatched)
    assert s.suggest("t-last") == Searcher.FINISHED
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) == 7
    for t in pruned:
        assert "threshold" in t.user_attrs["pruned_reason"]
        assert t.user_attrs["cka"] == pytest.approx(0.1)
    done = evaluated_trials(study)
    assert len(done) == 12 == len(study.trials) - len(pruned)  # no repeats were created
    keys = [t.user_attrs["key"] for t in done]
    assert len(set(keys)) == len(keys), "a configuration was evaluated twice"
    for t in done:
        assert t.user_attrs["driver"] == "d1"
        feasible = t.user_attrs["feasible"]
        assert feasible == (t.user_attrs["macs"] <= 2.25e6)
        assert (t.constraints["budgets"] <= 0) == feasible
    assert ("complete", done[0].number) in events


def test_exhausted_space_finishes() -> None:
    space = SearchSpace({"a": 1, "b": 2})  # 2 anchors + 1*2 + 2*1 stitches, 3 pruned
    study = _study(space)
    s, _ = _searcher(study, space, total=100)
    assert s.record_pruned() == 3
    dispatched = _run(s, 3)
    assert len({json.dumps(d, sort_keys=True) for d in dispatched}) == 3
    assert s.suggest("t9") == Searcher.FINISHED


def test_enqueued_repeat_is_answered_from_storage() -> None:
    space = SearchSpace(DEPTHS)
    study = _study(space)
    s, _ = _searcher(study, space, total=3)
    _run(s, 2)  # the two anchors
    study.enqueue_trial(space.encode(space.anchors()[0]))
    cfg = s.suggest("t2")
    assert json.loads(cfg["candidate"])["kind"] == "stitch"
    repeat = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert len(repeat) == 1
    src = study.trials[repeat[0].user_attrs["duplicate_of"]]
    assert repeat[0].values == src.values
    assert len(evaluated_trials(study)) == 2


def test_failures_are_recorded_with_reason() -> None:
    space = SearchSpace(DEPTHS)
    study = _study(space)
    s, _ = _searcher(study, space, total=3)
    s.suggest("t0")
    s.on_trial_complete("t0", {"error": "ValueError: non-finite activations"})
    s.suggest("t1")
    s.on_trial_complete("t1", error=True)
    cfg = s.suggest("t2")
    s.on_trial_complete("t2", {**_fake_result(cfg), "val_acc": float("nan")})
    failed = study.get_trials(states=(TrialState.FAIL,))
    reasons = [t.user_attrs["fail_reason"] for t in failed]
    assert len(failed) == 3
    assert "non-finite" in reasons[0]
    assert "worker" in reasons[1]
    assert "nan" in reasons[2]
    assert s.failed == 3 and s.completed == 0


def test_stale_running_trials_are_failed() -> None:
    space = SearchSpace(DEPTHS)
    study = _study(space)
    dead = study.ask()
    dead.set_user_attr("driver", "dead")
    live = study.ask()
    live.set_user_attr("driver", "alive")
    study.set_user_attr(HEARTBEAT_KEY + "alive", time.time())
    study.set_user_attr(HEARTBEAT_KEY + "dead", time.time() - 3600)
    assert fail_stale_trials(study) == [dead.number]
    assert study.trials[dead.number].state == TrialState.FAIL
    assert "stopped" in study.trials[dead.number].user_attrs["fail_reason"]
    assert study.trials[live.number].state == TrialState.RUNNING


def test_each_round_wraps_the_same_inner_sampler() -> None:
    space = SearchSpace(DEPTHS)
    inner = optuna.samplers.RandomSampler(seed=0)
    study = _study(space, inner)
    first, _ = _searcher(study, space, total=4)
    _run(first, 2)  # the anchors
    settings = first.settings
    second = StitchSearcher(study, space, settings, sampler=inner, cka=first.cka)
    assert study.sampler.inner is inner and study.sampler.accept == second.ledger.accept
    dispatched = _run(second, 2, start=2)
    assert all(d["kind"] == "stitch" for d in dispatched)
    assert second.suggest("t-last") == Searcher.FINISHED
    with pytest.raises(TypeError, match="pass the sampler"):
        StitchSearcher(study, space, settings, sampler=study.sampler, cka=first.cka)
