"""How good and how costly a candidate is: data, CKA, MACs, latency, stitch fitting, accuracy."""

from evaluators.candidate import CandidateResult, evaluate_candidate
from evaluators.cka import (
    CKA_MODES,
    MinibatchCKA,
    cka_cache_path,
    cka_features,
    cka_matrix,
    linear_cka,
    minibatch_cka,
)
from evaluators.data import (
    ArrayLoader,
    DatasetLoader,
    DataSplits,
    fashion_mnist_splits,
    find_fashion_mnist,
    imagefolder_splits,
    load_fashion_mnist,
    synthetic_splits,
)
from evaluators.fit import (
    Accuracy,
    AccuracyReport,
    FitResult,
    accuracy,
    evaluate_accuracy,
    fit_stitch,
)
from evaluators.latency import LatencyResult, MemoryResult, measure_latency, measure_memory
from evaluators.macs import (
    anchor_param_count,
    anchor_used_parameters,
    count_macs,
    count_params,
    stitched_macs,
    stitched_param_counts,
    stitched_parameters,
    used_parameters,
)

__all__ = [
    "CKA_MODES",
    "Accuracy",
    "AccuracyReport",
    "ArrayLoader",
    "CandidateResult",
    "DataSplits",
    "DatasetLoader",
    "FitResult",
    "LatencyResult",
    "MemoryResult",
    "MinibatchCKA",
    "accuracy",
    "anchor_param_count",
    "anchor_used_parameters",
    "cka_cache_path",
    "cka_features",
    "cka_matrix",
    "count_macs",
    "count_params",
    "evaluate_accuracy",
    "evaluate_candidate",
    "fashion_mnist_splits",
    "find_fashion_mnist",
    "fit_stitch",
    "imagefolder_splits",
    "linear_cka",
    "load_fashion_mnist",
    "measure_latency",
    "measure_memory",
    "minibatch_cka",
    "stitched_macs",
    "stitched_param_counts",
    "stitched_parameters",
    "synthetic_splits",
    "used_parameters",
]
