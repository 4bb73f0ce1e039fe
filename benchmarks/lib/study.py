"""The study exactly as ``python -m search.run`` prepares it, for the benchmarks to measure.

Its plan (the same anchors, data splits and budgets, :func:`load_plan`), search space, CKA
matrices (:func:`study_cka`), pruning rule as the replays record it (:func:`rule_spec`) and
that rule's signals (:func:`study_signals`), and seeded samples of its stitch points.
"""

from __future__ import annotations

import dataclasses
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.lib.environment import DEFAULT_BUDGETS, DEFAULT_STUDY, RESULTS
from search.core import PruningRule, SearchSpace, build_space
from search.execution import cka_matrices, pruning_signals
from search.inputs import Plan, Study, load_study, prepare
from search.run import build_parser
from search.strategy import PruningSignals
from space import Candidate

#: A rule (as :func:`rule_spec` writes it) that prunes nothing.
NO_PRUNING: dict[str, Any] = {"signal": "cka", "threshold": 0.0, "top_k": None, "depth": None}


def load_plan(
    study: Path | str = DEFAULT_STUDY, budget_table: Path | str = DEFAULT_BUDGETS
) -> Plan:
    """The study's validated plan (anchors loaded, data split), as ``search.run`` prepares it."""
    args = build_parser().parse_args(["--budget-table", str(budget_table), "--study", str(study)])
    return prepare(args)


def plan_with_calibration(study: Path | str, budget_table: Path | str, images: int) -> Plan:
    """The study's plan with ``images`` calibration images (a temporary copy of its YAML)."""
    raw = yaml.safe_load(Path(study).read_text())
    raw.setdefault("data", {})["calibration"] = images
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(study).name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_plan(path, budget_table)


def study_space(plan: Plan) -> SearchSpace:
    """The plan's search space (its ``cuts``, at native sizes)."""
    return build_space(plan.anchors, cuts=plan.study.cuts)


def sample_stitches(space: SearchSpace, n: int, seed: int) -> list[Candidate]:
    """``n`` stitch points spread over the ordered pairs (round robin, seeded)."""
    rng = random.Random(seed)
    pools = [rng.sample(space.stitches(a, b), len(space.stitches(a, b))) for a, b in space.pairs()]
    out = []
    while len(out) < n and any(pools):
        for p in pools:
            if p and len(out) < n:
                out.append(p.pop())
    return out


def rule_spec(study: Study) -> dict[str, Any]:
    """The study's pruning rule as the replays record it (JSON; ``PruningRule(**spec)``).

    Read from the study definition as ``search.run`` reads it: the ``pruning`` section, or
    the old ``cka: {threshold, top_k}`` form when only it is given.
    """
    r = study.pruning_rule
    return {"signal": r.signal, "threshold": r.threshold, "top_k": r.top_k, "depth": r.depth}


def rule_text(spec: Mapping[str, Any]) -> str:
    """Human-readable rule of a :func:`rule_spec` (``no pruning`` when it prunes nothing)."""
    rule = PruningRule(**spec)
    if not rule.active:
        return "no pruning"
    name = "CKA" if rule.signal == "cka" else rule.signal
    parts = []
    if rule.depth is not None:
        parts.append(f"{name} depth {rule.depth}")
    if rule.threshold is not None and (rule.threshold > 0 or not rule.higher_is_better):
        parts.append(f"{name} {'>=' if rule.higher_is_better else '<='} {rule.threshold:g}")
    if rule.top_k is not None:
        parts.append(f"{name} top-{rule.top_k}")
    return " and ".join(parts)


def rule_needs_signals(spec: Mapping[str, Any]) -> bool:
    """Whether a rule reads more than the CKA matrices (another signal, or MACs for ``depth``)."""
    rule = PruningRule(**spec)
    return rule.active and (rule.signal != "cka" or rule.depth is not None)


def study_cka(
    plan: Plan, space: SearchSpace, cache_root: Path
) -> dict[tuple[str, str], np.ndarray]:
    """CKA matrices of every ordered pair, computed as the search computes them.

    Args:
        plan: The study's plan.
        space: Its search space.
        cache_root: The cache goes under ``cache_root / "cache" / "cka"``.
    """
    return cka_matrices(
        dataclasses.replace(plan, out=Path(cache_root)), space, lambda *a, **k: None
    )


def study_signals(
    study: Path | str = DEFAULT_STUDY,
    budget_table: Path | str = DEFAULT_BUDGETS,
    *,
    cka: Mapping[tuple[str, str], np.ndarray],
    cache_root: Path = RESULTS,
    plan: Plan | None = None,
) -> PruningSignals | None:
    """What the study's pruning rule reads besides the CKA matrices, as the search computes it.

    ``search.execution.pruning_signals`` on the study's plan (its calibration images), cached
    under ``cache_root / "cache" / "signals"`` (``benchmarks.bench_signals``'s cache folder):
    about 90 s on 2 cores the first time, instant after.

    Args:
        study: The study YAML (ignored when ``plan`` is given).
        budget_table: Its device budgets (ignored when ``plan`` is given).
        cka: The CKA matrices (the ground truth's; read when the rule's signal is ``cka``).
        cache_root: Where the signal cache goes.
        plan: The study's plan, when already loaded.

    Returns:
        The signals, or ``None`` when the rule reads the CKA matrices alone.
    """
    if plan is None:
        if not rule_needs_signals(rule_spec(load_study(study))):
            return None
        plan = load_plan(study, budget_table)
    plan = dataclasses.replace(plan, out=Path(cache_root))
    return pruning_signals(plan, study_space(plan), cka, lambda *a, **k: None)
