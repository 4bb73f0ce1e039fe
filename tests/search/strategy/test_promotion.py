"""Rung 1's promotion rule and searcher, driven directly (no Ray cluster), as Ray Tune would."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from ray.tune.search import Searcher

from search.core import Attr, DeviceBudget, SearchSpace, rung_of
from search.strategy import Rung1Searcher, best_rung, promotion_order, rung1_trials
from space import Candidate

SPACE = SearchSpace({"a": 3, "b": 4})


def _trial(number: int, c: Candidate, acc: float, macs: float) -> optuna.trial.FrozenTrial:
    t = create_trial(
        state=TrialState.COMPLETE,
        values=[acc, macs],
        params={"x": 0.0},
        distributions={"x": FloatDistribution(0, 1)},
        user_attrs={
            Attr.KEY: c.key,
            Attr.LABEL: c.label,
            Attr.KIND: "anchor" if c.is_anchor else "stitch",
            Attr.CONFIG: c.to_dict(),
            Attr.VAL_ACC: acc,
            Attr.MACS: macs,
            Attr.PARAMS: 100,
        },
    )
    t.number = number
    return t


def _trials() -> list[optuna.trial.FrozenTrial]:
    return [
        _trial(0, Candidate.anchor("a"), 90.0, 1e6),
        _trial(1, Candidate.anchor("b"), 92.0, 9e6),
        _trial(2, Candidate("a", "b", 1, 2), 80.0, 3e6),  # small device's 2nd
        _trial(3, Candidate("a", "b", 2, 2), 85.0, 4e6),  # small device's 1st
        _trial(4, Candidate("b", "a", 3, 1), 91.0, 7e6),  # big device's 1st
        _trial(5, Candidate("b", "a", 2, 1), 70.0, 6e6),
        _trial(6, Candidate("a", "b", 1, 3), 60.0, 2e6),  # on no device's list
    ]


BUDGETS = [DeviceBudget("small", max_macs=5e6), DeviceBudget("big", max_macs=8e6)]


def test_promotion_ranks_per_device_round_robin_then_the_front() -> None:
    trials = _trials()
    # small fits 3, 2, 6 (by accuracy); big fits 4, 3, 2, 5, 6
    order = promotion_order(trials, BUDGETS, per_device=2)
    # rank 1 of every device first, then rank 2, then the further ranks; anchors never;
    # no duplicates
    assert [t.number for t in order] == [3, 4, 2, 6, 5]
    front = [trials[0], trials[6], trials[4]]  # an anchor and two stitches
    order = promotion_order(trials, BUDGETS, per_device=1, front=front)
    assert [t.number for t in order] == [3, 4, 6, 2, 5]  # the front's stitch 6 before rank 2
    assert [t.number for t in promotion_order(trials, BUDGETS, per_device=0)] == [3, 4, 2, 6, 5]
    assert promotion_order(trials, [], per_device=2, front=front) == [trials[6], trials[4]]


def test_best_rung_replaces_fine_tuned_candidates() -> None:
    rung0 = _trials()
    tuned = _trial(0, Candidate("a", "b", 1, 2), 88.0, 3e6)
    tuned.user_attrs[Attr.RUNG] = 1
    best = best_rung(rung0, [tuned])
    assert [rung_of(t) for t in best] == [0, 0, 1, 0, 0, 0, 0]
    assert best[2] is tuned and best[3] is rung0[3]


def _rung1_study() -> optuna.Study:
    return optuna.create_study(
        study_name="t:finetuned",
        storage=optuna.storages.InMemoryStorage(),
        directions=["maximize", "minimize"],
    )


def test_rung1_searcher_fine_tunes_in_order_within_budget() -> None:
    study = _rung1_study()
    queue = promotion_order(_trials(), BUDGETS, per_device=2)
    events = []
    searcher = Rung1Searcher(
        study,
        SPACE,
        queue,
        budgets=BUDGETS,
        objectives=["accuracy", "macs"],
        driver_id="d",
        max_trials=2,
        on_event=lambda kind, t: events.append((kind, t.number)),
    )
    first = searcher.suggest("r1")
    second = searcher.suggest("r2")
    assert searcher.suggest("r3") is None  # budget: 2 trials, both in flight
    assert (
        first["rung"] == 1
        and Candidate.from_json(first["candidate"]).key == queue[0].user_attrs[Attr.KEY]
    )
    assert second["number"] == 1
    searcher.on_trial_complete("r1", {"val_acc": 95.0, "finetune_seconds": 1.5})
    searcher.on_trial_complete("r2", {"error": "boom"})
    # A failure does not spend the budget: the next promoted stitch takes its place.
    third = searcher.suggest("r4")
    assert Candidate.from_json(third["candidate"]).key == queue[2].user_attrs[Attr.KEY]
    searcher.on_trial_complete("r4", {"val_acc": 81.0})
    assert searcher.suggest("r5") == Searcher.FINISHED
    done = rung1_trials(study)
    assert len(done) == 2 and events == [("complete", 0), ("failed", 1), ("complete", 2)]
    t = done[0]
    assert t.values == [95.0, 4e6]  # fine-tuned accuracy, rung-0 MACs
    assert t.user_attrs[Attr.RUNG] == 1 and t.user_attrs[Attr.RUNG0_TRIAL] == 3
    assert t.user_attrs[Attr.RUNG0_VAL_ACC] == 85.0
    assert t.user_attrs[Attr.FITS_DEVICES] == ["small", "big"]
    assert t.params == SPACE.encode(Candidate.from_dict(t.user_attrs[Attr.CONFIG]))
    failed = study.trials[1]
    assert failed.state == TrialState.FAIL and failed.user_attrs[Attr.FAIL_REASON] == "boom"


def test_rung1_searcher_skips_what_is_done_and_stops_at_the_deadline() -> None:
    study = _rung1_study()
    queue = promotion_order(_trials(), BUDGETS, per_device=2)
    s1 = Rung1Searcher(
        study,
        SPACE,
        queue,
        budgets=BUDGETS,
        objectives=["accuracy", "macs"],
        driver_id="d",
        max_trials=5,
    )
    s1.suggest("r1")
    s1.on_trial_complete("r1", {"val_acc": 95.0})
    # A rerun (a new searcher over the same order) does not redo the finished stitch.
    s2 = Rung1Searcher(
        study,
        SPACE,
        queue,
        budgets=BUDGETS,
        objectives=["accuracy", "macs"],
        driver_id="d",
        max_trials=5,
    )
    nxt = s2.suggest("r1")
    assert Candidate.from_json(nxt["candidate"]).key == queue[1].user_attrs[Attr.KEY]
    late = Rung1Searcher(
        study,
        SPACE,
        queue,
        budgets=BUDGETS,
        objectives=["accuracy", "macs"],
        driver_id="d",
        max_trials=5,
        deadline=0.0,
    )
    assert late.suggest("r1") == Searcher.FINISHED and late.out_of_time
