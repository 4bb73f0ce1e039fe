"""Inputs: every file and flag a run reads, validated into a frozen plan.

Nothing is written before the plan stands.

The study YAML (:mod:`~search.inputs.study`, its sections and its file), the study's
anchors, the budget CSV (:mod:`~search.inputs.devices`) and each device's latency table
(:mod:`~search.inputs.device_latency`), the ``--storage`` URL and its read-only check
(:mod:`~search.inputs.storage`), and :func:`prepare`, which turns them into a
:class:`Plan`. A bad input raises :class:`space.InputError`: one line naming the file or
field, exit 2.
"""

from search.inputs.device_latency import attach_tables, check_table, profile_command
from search.inputs.devices import (
    KNOWN_COLUMNS,
    MAX_TABLE_BYTES,
    TABLE_COLUMN,
    BudgetError,
    load_budget_table,
)
from search.inputs.plan import DEFAULT_STUDY, STUDIES_DIR, Plan, prepare
from search.inputs.sections import (
    AnchorSpec,
    CkaSpec,
    DataSpec,
    FinetuneSpec,
    FitSpec,
    PromoteSpec,
    PruningSpec,
    StrictModel,
)
from search.inputs.storage import (
    DEFAULT_RETRY_S,
    OPTUNA_TABLES,
    StorageError,
    check_storage,
    storage_url,
)
from search.inputs.study import QUALITY_OBJECTIVES, Study, StudyError
from search.inputs.study_anchors import check_resolutions, load_anchors, study_space
from search.inputs.study_file import MAX_STUDY_BYTES, MAX_STUDY_VALUES, load_study, parse_study

__all__ = [
    "DEFAULT_RETRY_S",
    "DEFAULT_STUDY",
    "KNOWN_COLUMNS",
    "MAX_STUDY_BYTES",
    "MAX_STUDY_VALUES",
    "MAX_TABLE_BYTES",
    "OPTUNA_TABLES",
    "QUALITY_OBJECTIVES",
    "STUDIES_DIR",
    "TABLE_COLUMN",
    "AnchorSpec",
    "BudgetError",
    "CkaSpec",
    "DataSpec",
    "FinetuneSpec",
    "FitSpec",
    "Plan",
    "PromoteSpec",
    "PruningSpec",
    "StorageError",
    "StrictModel",
    "Study",
    "StudyError",
    "attach_tables",
    "check_resolutions",
    "check_storage",
    "check_table",
    "load_anchors",
    "load_budget_table",
    "load_study",
    "parse_study",
    "prepare",
    "profile_command",
    "storage_url",
    "study_space",
]
