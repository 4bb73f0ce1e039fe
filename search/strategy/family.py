"""The family rung's policies: which candidates become members, and how they are recorded.

After rung 1, the family (:mod:`evaluators.family`) trains the anchors and the promoted
stitches jointly. :func:`family_members` chooses its members from the candidates at their
highest rung; :func:`record_family` writes each trained member as a trial of the family
study (``<study>:family``) in the same storage, naming its lower-rung trials, with the
family's settings, its loss curve and its time; its objective values are its accuracy in
the family and its lower rung's costs (training changes weights, not the architecture).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.core import (
    Attr,
    DeviceBudget,
    SearchSpace,
    accuracy_macs_front,
    candidate_of,
    ranked_for_device,
    rung_of,
)
from search.strategy.promotion import best_rung
from search.strategy.recorder import Recorder, objective_values
from search.strategy.rung1 import with_lower_costs
from space import member_name

#: The family's rung.
FAMILY_RUNG = 2

#: Suffix of the family study's name.
FAMILY_SUFFIX = ":family"


def family_study_name(name: str) -> str:
    """The name of the family study that goes with study ``name``."""
    return name + FAMILY_SUFFIX


def best_of_rungs(
    rung0: Sequence[FrozenTrial], *higher: Iterable[FrozenTrial]
) -> list[FrozenTrial]:
    """Every evaluated candidate at the highest of several rungs it reached.

    Args:
        rung0: Evaluated rung-0 trials (their order is kept).
        higher: COMPLETE trials of the higher rungs, lowest rung first.
    """
    best = list(rung0)
    for rung in higher:
        best = best_rung(best, rung)
    return best


def family_members(
    candidates: Sequence[FrozenTrial],
    budgets: Sequence[DeviceBudget],
    *,
    max_members: int,
    names: Sequence[str] | None = None,
) -> list[FrozenTrial]:
    """The members of the family: candidates at their highest rung, with their anchors.

    Automatic choice (``names`` None): the family's anchors are the anchors the devices'
    picks run (:func:`family_anchors`); among the candidates built from them only, each
    device's best comes first, then stitches spread over both stitching orders and the MACs
    between the anchors (:func:`spread_stitches`), then every device's next best,
    round-robin, then the accuracy/MACs front. Members that share an anchor's blocks train
    them together, so a family whose stitches cover both orders and many cut depths trains
    every block of both anchors (BENCHMARKS.md, the family section). Each stitch brings its
    two anchors along as members; a candidate that would take the family past
    ``max_members`` (anchors included) is passed over.

    Args:
        candidates: Evaluated candidates at their highest rung (:func:`best_of_rungs`).
        budgets: The devices.
        max_members: The most members.
        names: The members the study names (``family.members``), in order: anchors by name,
            stitches by label; those not evaluated are left out.

    Returns:
        The members' trials: the anchors first (in the order of ``candidates``), then the
        stitches in the order chosen.
    """
    anchors = {
        candidate_of(t).front: t for t in candidates if t.user_attrs.get(Attr.KIND) == "anchor"
    }
    if names is not None:
        by_name = {member_name(candidate_of(t)): t for t in candidates}
        by_name.update({t.user_attrs.get(Attr.LABEL): t for t in candidates})
        order = [by_name[n] for n in names if n in by_name]
    else:
        keep = family_anchors(candidates, budgets)
        pool = [t for t in candidates if {candidate_of(t).front, candidate_of(t).back} <= keep]
        per = [ranked_for_device(pool, b) for b in budgets]
        order = [p[0] for p in per if p]
        order += spread_stitches(pool, slots=max_members - len(keep))
        for rank in range(1, max((len(p) for p in per), default=0)):
            order += [p[rank] for p in per if rank < len(p)]
        order += accuracy_macs_front(pool)
    chosen: dict[str, FrozenTrial] = {}  # by candidate key
    for t in order:
        c = candidate_of(t)
        if c.key in chosen:
            continue
        new = {
            anchors[a].user_attrs[Attr.KEY]: anchors[a]
            for a in (c.front, c.back)
            if a in anchors and anchors[a].user_attrs[Attr.KEY] not in chosen
        }
        new.setdefault(c.key, t)
        if len(chosen) + len(new) > max_members:
            continue
        chosen.update(new)
    picked = [t for t in chosen.values() if t.user_attrs.get(Attr.KIND) == "anchor"]
    order_of = {t.user_attrs[Attr.KEY]: i for i, t in enumerate(candidates)}
    picked.sort(key=lambda t: order_of.get(t.user_attrs[Attr.KEY], 0))
    return picked + [t for t in chosen.values() if t.user_attrs.get(Attr.KIND) != "anchor"]


def spread_stitches(pool: Sequence[FrozenTrial], *, slots: int) -> list[FrozenTrial]:
    """Stitches of every ordered pair of anchors, spread over the MACs between the anchors.

    The range from the cheapest to the costliest anchor of ``pool`` is cut into
    ``ceil(slots / pairs)`` equal bins on a log scale; each ordered pair contributes its
    most accurate stitch in each bin. They come most accurate first.

    Args:
        pool: Candidates at their highest rung (anchors and the stitches between them).
        slots: How many stitches the family has room for.
    """
    anchors = [t for t in pool if t.user_attrs.get(Attr.KIND) == "anchor"]
    stitches = [t for t in pool if t.user_attrs.get(Attr.KIND) == "stitch"]
    if len(anchors) < 2 or not stitches or slots < 1:
        return []
    lo, hi = (math.log(float(t.user_attrs[Attr.MACS])) for t in _cheapest_and_costliest(anchors))
    pairs = sorted({(candidate_of(t).front, candidate_of(t).back) for t in stitches})
    bins = max(1, math.ceil(slots / len(pairs)))
    width = (hi - lo) / bins or 1.0
    best: dict[tuple[tuple[str, str], int], FrozenTrial] = {}
    for t in stitches:
        c = candidate_of(t)
        b = min(bins - 1, max(0, int((math.log(float(t.user_attrs[Attr.MACS])) - lo) / width)))
        held = best.get(((c.front, c.back), b))
        if held is None or t.user_attrs[Attr.VAL_ACC] > held.user_attrs[Attr.VAL_ACC]:
            best[(c.front, c.back), b] = t
    return sorted(best.values(), key=lambda t: (-t.user_attrs[Attr.VAL_ACC], t.number))


def _cheapest_and_costliest(trials: Sequence[FrozenTrial]) -> tuple[FrozenTrial, FrozenTrial]:
    by_macs = sorted(trials, key=lambda t: float(t.user_attrs[Attr.MACS]))
    return by_macs[0], by_macs[-1]


def family_anchors(candidates: Sequence[FrozenTrial], budgets: Sequence[DeviceBudget]) -> set[str]:
    """The anchors the family trains: those the devices' picks run (at their highest rung).

    When the picks run fewer than two anchors, the anchors of the accuracy/MACs front join,
    most accurate first, until there are two.
    """
    picks = [p[0] for b in budgets if (p := ranked_for_device(candidates, b))]
    out: set[str] = set()
    for t in picks:
        c = candidate_of(t)
        out |= {c.front, c.back}
    for t in sorted(accuracy_macs_front(candidates), key=lambda t: -t.user_attrs[Attr.VAL_ACC]):
        if len(out) >= 2:
            break
        c = candidate_of(t)
        out |= {c.front, c.back}
    return out


def family_trials(study: optuna.Study, family_id: str) -> list[FrozenTrial]:
    """The COMPLETE trials of one trained family (:attr:`Attr.FAMILY_ID`) in the study."""
    return [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get(Attr.FAMILY_ID) == family_id
    ]


def record_family(
    study: optuna.Study,
    space: SearchSpace,
    members: Sequence[FrozenTrial],
    measured: Mapping[str, Mapping[str, Any]],
    *,
    recorder: Recorder,
    objectives: Sequence[str],
    attrs: Mapping[str, Any],
    member_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[int]:
    """Records every trained member as a trial of the family study.

    Args:
        study: The family study.
        space: The search space (the trials' parameter encoding).
        members: The members' lower-rung trials.
        measured: Per member name, what the family measured (``accuracy``, ``val_top5``).
        recorder: Writes the trials (constraints, device fits).
        objectives: Objective names in study order.
        attrs: What every member's trial records about the family (id, settings, curve).
        member_attrs: What one member's trial records besides, by member name.

    Returns:
        The new trials' numbers.
    """
    numbers = []
    for source in members:
        c = candidate_of(source)
        got = measured[member_name(c)]
        study.enqueue_trial(space.encode(c), skip_if_exists=False)
        trial = study.ask(space.distributions())
        recorder.annotate(trial, c)
        lower = rung_of(source)
        trial.set_user_attr(Attr.RUNG, FAMILY_RUNG)
        trial.set_user_attr(
            Attr.RUNG0_TRIAL, source.user_attrs.get(Attr.RUNG0_TRIAL, source.number)
        )
        if lower == 1:
            trial.set_user_attr(Attr.RUNG1_TRIAL, source.number)
        trial.set_user_attr(Attr.LOWER_RUNG, lower)
        for k, v in {**attrs, **(member_attrs or {}).get(member_name(c), {})}.items():
            trial.set_user_attr(k, v)
        result = {Attr.VAL_ACC: got["accuracy"], Attr.VAL_TOP5: got.get("val_top5")}
        merged = with_lower_costs(result, source.user_attrs)
        merged[Attr.LOWER_VAL_ACC] = source.user_attrs.get(Attr.VAL_ACC)
        values, reason = objective_values(merged, objectives)
        if reason is not None:
            recorder.fail(trial, f"the family measured {reason}", merged)
            continue
        recorder.complete(trial, merged, values)
        numbers.append(trial.number)
    return numbers
