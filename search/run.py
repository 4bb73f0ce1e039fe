"""``python -m search.run --budget-table devices.csv``: run a stitching study end to end.

The run reads top to bottom, one stage per subpackage of :mod:`search`:

1. **prepare** (:mod:`search.inputs`): every input (flags, budget table, study YAML,
   anchors, data, storage) validated into a frozen :class:`~search.inputs.Plan` before
   anything is written; a bad input prints one line naming the file or field and exits 2.
2. **signals** (:mod:`search.execution.pair_signals`): the CKA matrices and the pruning
   rule's signal of every ordered anchor pair (cached under ``--out``).
3. **session** (:class:`~search.execution.RunSession`): the study opened or resumed in its
   RDB storage (SQLite under ``--out`` by default), with the rung-1 study beside it;
   heartbeats, set-up (anchors enqueued, pruned points recorded), stale trials failed.
4. **search** (:mod:`search.strategy` on :mod:`search.execution`'s Ray Tune rounds): rung 0
   (least squares) until the study holds its total, then rung 1 (fine-tuning of the
   promoted stitches, study ``<name>:finetuned``).
5. **deliver** (:mod:`search.delivery`): a pick per device, re-measured with test
   accuracy; ``exports/``, the HTML report and the summary table.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from search.core import PASSWORD_ENV, OneLineParser, one_line, positive_float, positive_int
from search.delivery import deliver
from search.execution import (
    RunSession,
    SignalGuard,
    exit_code,
    open_storage,
    optuna_logging,
    study_signals,
)
from search.inputs import DEFAULT_RETRY_S, DEFAULT_STUDY, Plan, prepare
from search.store import StorageUnavailable
from space import InputError

#: Exit code when the storage stopped answering mid-study (``EX_TEMPFAIL``: try again).
EXIT_STORAGE_LOST = 75


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        plan = prepare(args, argv)  # 1. prepare
    except InputError as e:
        return _input_error(e)
    return execute(plan)


def execute(plan: Plan) -> int:
    """Runs a validated plan: signals, session, search, delivery (see the module docstring).

    A storage that stops answering mid-study is retried for ``plan.storage_retry_s``; when
    it does not come back the run stops with one line and the resume command (exit 75).
    Trials it had in flight stay RUNNING in the storage until the rerun fails them (their
    driver is gone) and evaluates them again. Optuna's INFO lines are shown only with
    ``--verbose`` (:func:`~search.execution.optuna_logging`).
    """
    out_is_new = not plan.out.exists()
    with SignalGuard() as guard, optuna_logging(plan.verbose):
        try:
            plan.out.mkdir(parents=True, exist_ok=True)
            storage = open_storage(plan, _log)
            signals = study_signals(plan, _log)  # 2. signals
            with RunSession(plan, storage, signals, guard=guard, log=_log) as session:  # 3.
                session.search()  # 4. search
            return deliver(session, guard=guard, log=_log)  # 5. deliver
        except InputError as e:  # the storage or the stored study, after the plan's checks
            if out_is_new:
                shutil.rmtree(plan.out, ignore_errors=True)
            return _input_error(e)
        except StorageUnavailable as e:
            _log(
                f"error: {e}; the run stopped (finished trials are safe in the storage). "
                f"When it answers again, resume with: {plan.command}"
            )
            return EXIT_STORAGE_LOST
        except KeyboardInterrupt as e:
            name = guard.name(e)
            _log(f"interrupted ({name}) before the search started; nothing was evaluated")
            return exit_code(name)


def _log(*args: object, **kwargs: object) -> None:
    print(*args, **kwargs, file=sys.stderr, flush=True)


def _input_error(e: InputError) -> int:
    print(f"error: {one_line(str(e))}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = OneLineParser(
        prog="python -m search.run",
        description="Search stitched networks for a table of target devices.",
        epilog="Example: python -m search.run --budget-table devices.csv",
    )
    p.add_argument(
        "--budget-table",
        required=True,
        metavar="CSV",
        help="devices and budgets: a CSV with a 'device' column and any of max_macs, "
        "max_params (K/M/G suffixes allowed), max_latency_ms, max_memory_mb, and an optional "
        "latency_table (a device latency table from python -m search.profile)",
    )
    p.add_argument(
        "--study",
        default=str(DEFAULT_STUDY),
        metavar="YAML",
        help="study definition (default: studies/default.yaml: the shipped zoo on Fashion-MNIST)",
    )
    p.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna RDB storage URL, e.g. postgresql+psycopg://user@127.0.0.1:5432/db "
        f"(default: sqlite under --out); give a PostgreSQL password in ${PASSWORD_ENV}, "
        "not in the URL",
    )
    p.add_argument(
        "--storage-retry",
        type=positive_float("--storage-retry"),
        default=DEFAULT_RETRY_S,
        metavar="SECONDS",
        help="how long to keep retrying a storage that stops answering mid-study before "
        f"stopping with the resume command (default: {DEFAULT_RETRY_S:g})",
    )
    p.add_argument(
        "--trials",
        type=positive_int("--trials"),
        default=None,
        help="total candidates to evaluate in the study, resumed runs included "
        "(default: the study's)",
    )
    p.add_argument(
        "--workers",
        type=positive_int("--workers"),
        default=None,
        help="concurrent Ray trials (default: the study's)",
    )
    p.add_argument(
        "--out", default=None, metavar="DIR", help="output folder (default: runs/<study name>)"
    )
    p.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study's)")
    p.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="join an existing Ray cluster ('auto' or host:port) instead of starting one",
    )
    p.add_argument("--onnx", action="store_true", help="also write ONNX for every exported device")
    p.add_argument(
        "--no-finetune",
        action="store_true",
        help="skip rung 1 (stitch-only fine-tuning) in this run; picks use least squares only",
    )
    p.add_argument(
        "--no-family",
        action="store_true",
        help="skip the family (joint training of anchors and stitches) in this run; picks use "
        "the lower rungs",
    )
    p.add_argument(
        "--no-report", action="store_true", help="skip the HTML report (faster in tests)"
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="also show Optuna's INFO lines (studies created, trials told); by default "
        "only its warnings",
    )
    return p


if __name__ == "__main__":
    sys.exit(main())
