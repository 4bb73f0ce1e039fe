"""Delivery: what the run hands over after the search.

Per-device picks (:func:`search.core.select_per_device`), re-measured and exported
(:mod:`~search.delivery.exports`, published whole by :mod:`~search.delivery.staging`), the
HTML report, the summary table, ONNX, and ``--check`` of an export
(:mod:`~search.delivery.check`).
"""

from search.core import select_per_device
from search.delivery.check import CheckResult, CheckRow, check_export, load_data, splits_for
from search.delivery.exports import data_record, fit_record, latency_record, write_export
from search.delivery.family_check import check_family
from search.delivery.finish import FAMILY_EXPORT, Rungs, deliver, export_picks, finish
from search.delivery.onnx import (
    DEFAULT_OPSET,
    ONNX_ATOL,
    VERIFY_BATCHES,
    export_onnx,
    onnx_metadata,
    verify_onnx,
    write_onnx,
)
from search.delivery.report import trial_row_id, trial_rows, write_report
from search.delivery.staging import STAGING_PREFIX, clean_staging, publish, staging_dir
from search.delivery.summary import counts_line, dashboard_command, latency_cell, summary_table

__all__ = [
    "DEFAULT_OPSET",
    "FAMILY_EXPORT",
    "ONNX_ATOL",
    "STAGING_PREFIX",
    "VERIFY_BATCHES",
    "CheckResult",
    "CheckRow",
    "Rungs",
    "check_export",
    "check_family",
    "clean_staging",
    "counts_line",
    "dashboard_command",
    "data_record",
    "deliver",
    "export_onnx",
    "export_picks",
    "finish",
    "fit_record",
    "latency_cell",
    "latency_record",
    "load_data",
    "onnx_metadata",
    "publish",
    "select_per_device",
    "splits_for",
    "staging_dir",
    "summary_table",
    "trial_row_id",
    "trial_rows",
    "verify_onnx",
    "write_export",
    "write_onnx",
    "write_report",
]
