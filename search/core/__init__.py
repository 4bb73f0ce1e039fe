"""The core: plain values and pure functions every stage shares.

The trial record (:mod:`~search.core.trials`: attribute keys, objectives, the candidate
codec), the search-space encoding (:mod:`~search.core.encoding`), the pruning rule
(:mod:`~search.core.pruning_rule`), device budgets (:mod:`~search.core.budgets`), and text
for people: file names, quantities, storage URLs without passwords, one-line command-line
errors. Nothing here talks to a storage, Ray or a model.
"""

from search.core.budgets import (
    BUDGET_COLUMNS,
    HOST_MEASURED,
    METRICS,
    DeviceBudget,
    constraint_value,
    fitting_devices,
)
from search.core.cli import OneLineParser, one_line, positive_float, positive_int
from search.core.encoding import (
    CUTS,
    SearchSpace,
    SignalKey,
    StitchPoints,
    build_space,
    key_resolution,
    pair_key,
    signal_key,
)
from search.core.pruning_rule import SIGNAL_DIRECTIONS, PruningRule, pareto_layers
from search.core.selection import accuracy_macs_front, ranked_for_device, select_per_device
from search.core.text import format_quantity, safe_filename
from search.core.trials import (
    BUDGET_METRICS,
    OBJECTIVES,
    RESULT_ATTRS,
    RUNG_NAMES,
    Attr,
    Objective,
    StudyAttr,
    annotation,
    budget_metrics,
    candidate_of,
    device_latency,
    device_latency_estimate,
    device_latency_text,
    evaluated_trials,
    finetune_attrs,
    is_repeat,
    macs_uncounted_text,
    measure_name,
    metric_names,
    rung_of,
    unflatten,
)
from search.core.urls import (
    PASSWORD_ENV,
    has_password,
    masked_url,
    server_said,
    url_without_password,
)

__all__ = [
    "BUDGET_COLUMNS",
    "BUDGET_METRICS",
    "CUTS",
    "HOST_MEASURED",
    "METRICS",
    "OBJECTIVES",
    "PASSWORD_ENV",
    "RESULT_ATTRS",
    "RUNG_NAMES",
    "SIGNAL_DIRECTIONS",
    "Attr",
    "DeviceBudget",
    "Objective",
    "OneLineParser",
    "PruningRule",
    "SearchSpace",
    "SignalKey",
    "StitchPoints",
    "StudyAttr",
    "accuracy_macs_front",
    "annotation",
    "budget_metrics",
    "build_space",
    "candidate_of",
    "constraint_value",
    "device_latency",
    "device_latency_estimate",
    "device_latency_text",
    "evaluated_trials",
    "finetune_attrs",
    "fitting_devices",
    "format_quantity",
    "has_password",
    "is_repeat",
    "key_resolution",
    "macs_uncounted_text",
    "masked_url",
    "measure_name",
    "metric_names",
    "one_line",
    "pair_key",
    "pareto_layers",
    "positive_float",
    "positive_int",
    "ranked_for_device",
    "rung_of",
    "safe_filename",
    "select_per_device",
    "server_said",
    "signal_key",
    "unflatten",
    "url_without_password",
]
