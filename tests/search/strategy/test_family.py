"""The family rung's policies: which candidates become members, and their recorded trials."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search.core import Attr, DeviceBudget, SearchSpace, rung_of
from search.strategy import (
    FAMILY_RUNG,
    Recorder,
    best_of_rungs,
    family_anchors,
    family_members,
    family_study_name,
    family_trials,
    record_family,
    spread_stitches,
)
from space import Candidate
from tests.search.strategy.test_promotion import _trial

SPACE = SearchSpace({"a": 3, "b": 4, "c": 2})
BUDGETS = [DeviceBudget("small", max_macs=5e6), DeviceBudget("big", max_macs=8e6)]


def _candidates() -> list[optuna.trial.FrozenTrial]:
    return [
        _trial(0, Candidate.anchor("a"), 90.0, 1e6),  # small's pick
        _trial(1, Candidate.anchor("b"), 92.0, 9e6),
        _trial(2, Candidate.anchor("c"), 70.0, 0.5e6),  # cheapest: on the front
        _trial(3, Candidate("a", "b", 2, 2), 85.0, 4e6),  # small's 2nd
        _trial(4, Candidate("b", "a", 3, 1), 91.0, 7e6),  # big's pick
        _trial(5, Candidate("b", "a", 2, 1), 70.0, 6e6),
        _trial(6, Candidate("c", "a", 1, 1), 40.0, 0.8e6),  # uses c: not a pick's anchor
        _trial(7, Candidate("a", "b", 1, 3), 60.0, 2e6),
    ]


def test_the_family_trains_the_anchors_the_devices_picks_run() -> None:
    trials = _candidates()
    assert family_anchors(trials, BUDGETS) == {"a", "b"}
    members = family_members(trials, BUDGETS, max_members=10)
    keys = [t.user_attrs[Attr.KEY] for t in members]
    # the two anchors first, then the picks' stitch and the rest of a/b's candidates by the
    # devices' rankings; c and its stitch are left out
    assert keys[:2] == [Candidate.anchor("a").key, Candidate.anchor("b").key]
    assert Candidate("b", "a", 3, 1).key == keys[2]
    assert not any("c" in (k.split("|")[1], k.split("|")[-2]) for k in keys[2:])
    assert set(keys) == {t.user_attrs[Attr.KEY] for t in trials if t.number in (0, 1, 3, 4, 5, 7)}


def test_max_members_counts_the_anchors_a_stitch_brings() -> None:
    members = family_members(_candidates(), BUDGETS, max_members=3)
    assert [t.number for t in members] == [0, 1, 4]  # a, b, and big's stitch b->a
    assert [t.number for t in family_members(_candidates(), BUDGETS, max_members=1)] == [0]


def test_named_members_bring_their_anchors_and_skip_unknown_names() -> None:
    trials = _candidates()
    names = [Candidate("c", "a", 1, 1).label, "not evaluated", "b"]
    members = family_members(trials, BUDGETS, max_members=10, names=names)
    assert sorted(t.number for t in members) == [0, 1, 2, 6]


def test_one_anchor_picked_everywhere_takes_the_fronts_next_anchor() -> None:
    trials = _candidates()
    only_a = [DeviceBudget("tiny", max_macs=1.5e6)]  # picks anchor a alone (c is worse)
    assert family_anchors(trials, only_a) == {"a", "b"}  # b: the front's most accurate


def test_best_of_rungs_takes_each_candidates_highest_rung() -> None:
    rung0 = _candidates()
    tuned = _trial(10, Candidate("a", "b", 2, 2), 88.0, 4e6)
    tuned.user_attrs[Attr.RUNG] = 1
    trained = _trial(11, Candidate("a", "b", 2, 2), 89.5, 4e6)
    trained.user_attrs[Attr.RUNG] = FAMILY_RUNG
    anchor = _trial(12, Candidate.anchor("a"), 90.5, 1e6)
    anchor.user_attrs[Attr.RUNG] = FAMILY_RUNG
    best = best_of_rungs(rung0, [tuned], [trained, anchor])
    assert [t.number for t in best] == [12, 1, 2, 11, 4, 5, 6, 7]
    assert [rung_of(t) for t in best][:4] == [2, 0, 0, 2]


def test_record_family_writes_one_linked_trial_per_member() -> None:
    study = optuna.create_study(
        study_name=family_study_name("s"), directions=["maximize", "minimize"]
    )
    lower = _candidates()
    tuned = _trial(9, Candidate("b", "a", 3, 1), 91.2, 7e6)
    tuned.user_attrs[Attr.RUNG] = 1
    tuned.user_attrs[Attr.RUNG0_TRIAL] = 4
    members = [lower[0], lower[1], tuned]
    measured = {
        "a": {"accuracy": 90.5, "val_top5": None},
        "b": {"accuracy": 92.4, "val_top5": None},
        Candidate("b", "a", 3, 1).label: {"accuracy": 92.1, "val_top5": None},
    }
    recorder = Recorder(study, driver_id="d", budgets=BUDGETS, cka={})
    numbers = record_family(
        study,
        SPACE,
        members,
        measured,
        recorder=recorder,
        objectives=["accuracy", "macs"],
        attrs={Attr.FAMILY_ID: "f1", Attr.FAMILY_EPOCHS: 5},
        member_attrs={"b": {Attr.MEMBER_STEPS: 7}},
    )
    assert len(numbers) == 3
    done = family_trials(study, "f1")
    assert len(done) == 3 and family_trials(study, "other") == []
    assert all(t.state == TrialState.COMPLETE and rung_of(t) == FAMILY_RUNG for t in done)
    stitch = next(t for t in done if t.user_attrs[Attr.KIND] == "stitch")
    assert stitch.values == [92.1, 7e6]  # its family accuracy, the lower rung's MACs
    assert stitch.user_attrs[Attr.RUNG0_TRIAL] == 4
    assert stitch.user_attrs[Attr.RUNG1_TRIAL] == 9
    assert stitch.user_attrs[Attr.LOWER_RUNG] == 1
    assert stitch.user_attrs[Attr.LOWER_VAL_ACC] == 91.2
    assert stitch.user_attrs[Attr.FITS_DEVICES] == ["big"]
    b = next(t for t in done if t.user_attrs[Attr.LABEL].startswith("b "))
    assert b.user_attrs[Attr.MEMBER_STEPS] == 7 and b.user_attrs[Attr.FAMILY_EPOCHS] == 5


def test_spread_covers_both_orders_and_the_macs_between_the_anchors() -> None:
    pool = [
        _trial(0, Candidate.anchor("a"), 90.0, 1e6),
        _trial(1, Candidate.anchor("b"), 92.0, 16e6),
        # a -> b, low bin (1-4M): the better of two; high bin (4-16M): one
        _trial(2, Candidate("a", "b", 1, 2), 80.0, 2e6),
        _trial(3, Candidate("a", "b", 2, 2), 84.0, 3e6),
        _trial(4, Candidate("a", "b", 1, 1), 70.0, 10e6),
        # b -> a: only a high-bin stitch
        _trial(5, Candidate("b", "a", 3, 1), 91.0, 8e6),
        _trial(6, Candidate("b", "a", 2, 1), 60.0, 5e6),
    ]
    spread = spread_stitches(pool, slots=4)  # 2 pairs -> 2 bins each
    assert [t.number for t in spread] == [5, 3, 4]  # most accurate first, one per pair and bin
    assert [t.number for t in spread_stitches(pool, slots=2)] == [5, 3]  # one bin per pair
    assert spread_stitches(pool[:1] + pool[2:], slots=4) == []  # needs two anchors
