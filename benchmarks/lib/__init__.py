"""The benchmarks' library: what the ``bench_*`` scripts share, behind one face.

- :mod:`~benchmarks.lib.environment`: default paths, the machine and commit of a run, device
  names, the real ImageNet weights (readiness, loading).
- :mod:`~benchmarks.lib.study`: the study as ``python -m search.run`` prepares it (plan,
  space, CKA, pruning rule and its signals).
- :mod:`~benchmarks.lib.ground_truth` and :mod:`~benchmarks.lib.rung1`: the cached
  exhaustive ground truths at rung 0 and rung 1, their format, builders and readers, on the
  resumable builder of :mod:`~benchmarks.lib.tables`.
- :mod:`~benchmarks.lib.metrics`: Pareto masks, the hypervolume convention, rank
  correlations; :mod:`~benchmarks.lib.timing`: timed calls and pure forward passes.
- :mod:`~benchmarks.lib.replay` and :mod:`~benchmarks.lib.promotion`: the real searcher and
  the rung-1 promotion replayed against the ground truths; :mod:`~benchmarks.lib.runs`:
  real ``python -m search.run`` runs.
- :mod:`~benchmarks.lib.output`: the shared options, the results JSON and the sections of
  ``BENCHMARKS.md``.

Scripts import this face only, never one another.
"""

from benchmarks.lib.environment import (
    DEFAULT_BUDGETS,
    DEFAULT_GROUND_TRUTH,
    DEFAULT_MD,
    DEFAULT_RUNG1,
    DEFAULT_STUDY,
    RESULTS,
    ROOT,
    device_name,
    load_lite_anchors,
    machine_info,
    real_weights_ready,
)
from benchmarks.lib.ground_truth import GroundTruth, build_ground_truth, cka_accuracy_correlation
from benchmarks.lib.metrics import Hypervolume, kendall_tau, pareto_mask, spearman
from benchmarks.lib.output import (
    bench_parser,
    device_out,
    device_section,
    md_table,
    mean_std,
    publish,
    update_markdown,
    write_json,
)
from benchmarks.lib.promotion import PROMOTIONS, replay_promotion
from benchmarks.lib.replay import MEASURES, Scorer, replay_all, score_runs
from benchmarks.lib.rung1 import (
    Rung1Table,
    build_rung1_table,
    correlation,
    cost,
    finetune_tag,
    front_summary,
    rung0_table,
)
from benchmarks.lib.runs import run_storage, search_run
from benchmarks.lib.study import (
    load_plan,
    plan_with_calibration,
    rule_spec,
    rule_text,
    sample_stitches,
    study_signals,
    study_space,
)
from benchmarks.lib.tables import TableBuild
from benchmarks.lib.timing import pure_forward_seconds, timed

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_GROUND_TRUTH",
    "DEFAULT_MD",
    "DEFAULT_RUNG1",
    "DEFAULT_STUDY",
    "MEASURES",
    "PROMOTIONS",
    "RESULTS",
    "ROOT",
    "GroundTruth",
    "Hypervolume",
    "Rung1Table",
    "Scorer",
    "TableBuild",
    "bench_parser",
    "build_ground_truth",
    "build_rung1_table",
    "cka_accuracy_correlation",
    "correlation",
    "cost",
    "device_name",
    "device_out",
    "device_section",
    "finetune_tag",
    "front_summary",
    "kendall_tau",
    "load_lite_anchors",
    "load_plan",
    "machine_info",
    "md_table",
    "mean_std",
    "pareto_mask",
    "plan_with_calibration",
    "publish",
    "pure_forward_seconds",
    "real_weights_ready",
    "replay_all",
    "replay_promotion",
    "rule_spec",
    "rule_text",
    "run_storage",
    "rung0_table",
    "sample_stitches",
    "score_runs",
    "search_run",
    "spearman",
    "study_signals",
    "study_space",
    "timed",
    "update_markdown",
    "write_json",
]
