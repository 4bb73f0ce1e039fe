"""``python -m search.run --budget-table devices.csv``: run a stitching study end to end.

1. Validate every input (flags, budget table, study YAML, anchors, data) before anything is
   written; a bad input prints one line naming the file/field and exits 2.
2. Open (or resume) the Optuna study in RDB storage (SQLite under ``--out`` by default).
3. Compute the CKA matrix of every ordered anchor pair once (cached under ``--out``).
4. Evaluate candidates on Ray Tune workers, the study's sampler choosing which.
5. Pick, per device, the highest-accuracy Pareto-optimal trial within its budgets; measure
   its test accuracy; write ``exports/``, an HTML report and a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"
DEFAULT_STUDY = STUDIES_DIR / "default.yaml"


class _Parser(argparse.ArgumentParser):
    """argparse that reports an error as one line and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = _Parser(
        prog="python -m search.run",
        description="Search stitched networks for a table of target devices.",
        epilog="Example: python -m search.run --budget-table devices.csv",
    )
    p.add_argument(
        "--budget-table",
        required=True,
        metavar="CSV",
        help="devices and budgets: a CSV with a 'device' column and any of max_macs, "
        "max_params (K/M/G suffixes allowed), max_latency_ms, max_memory_mb",
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
        "(default: sqlite under --out)",
    )
    p.add_argument(
        "--trials",
        type=_positive_int("--trials"),
        default=None,
        help="total candidates to evaluate in the study, resumed runs included "
        "(default: the study's)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int("--workers"),
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
        "--no-report", action="store_true", help="skip the HTML report (faster in tests)"
    )
    return p


def _positive_int(flag: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a whole number, got {text!r}"
            ) from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{flag} must be >= 1, got {value}")
        return value

    return parse


class InputError(ValueError):
    """A user input is invalid (one line, exit 2)."""


@dataclass
class Plan:
    """Everything validated, before anything is written."""

    study: Any
    study_path: Path
    budgets: list
    budget_path: Path
    anchors: dict
    anchor_kwargs: dict
    data: Any
    out: Path
    storage_url: str
    trials: int
    workers: int
    seed: int
    ray_address: str | None
    onnx: bool
    report: bool
    driver_id: str = ""
    started_ray: bool = False

    def trial_data(self):
        """The data splits trials use: calibration cut to the fitting size, no train split."""
        return dataclasses.replace(
            self.data,
            calibration=self.data.calibration.subset(self.study.data.calibration),
            train=None,
        )


def _storage_url(raw: str | None, out: Path) -> str:
    if raw is None:
        return f"sqlite:///{(out / 'study.db').resolve()}"
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(raw)
    except ArgumentError:
        raise InputError(
            f"--storage: {raw!r} is not a database URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST:PORT/DB"
        ) from None
    backend = url.get_backend_name()
    if backend == "sqlite":
        if not url.database:
            raise InputError(f"--storage: {raw!r} names no SQLite file; use sqlite:///PATH")
        parent = Path(url.database).expanduser().resolve().parent
        if not parent.is_dir():
            raise InputError(f"--storage: folder {str(parent)!r} of {raw!r} does not exist")
    elif backend == "postgresql":
        driver = url.get_driver_name()
        module = {"psycopg": "psycopg", "psycopg2": "psycopg2"}.get(driver, driver)
        try:
            __import__(module)
        except ImportError:
            raise InputError(
                f"--storage: driver {driver!r} for {raw!r} is not installed; "
                "pip install 'stitchsearch[postgres]' and use postgresql+psycopg://..."
            ) from None
    elif backend not in ("mysql",):
        raise InputError(
            f"--storage: unsupported database {backend!r} in {raw!r}; use sqlite or postgresql"
        )
    return raw


def masked_url(url: str) -> str:
    """The storage URL with any password hidden."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def prepare(args: argparse.Namespace) -> Plan:
    """Validates all inputs and loads anchors and data; writes nothing.

    Raises:
        InputError, StudyError, BudgetError, ValueError: One-line messages (exit 2).
    """
    from search.budgets import load_budget_table
    from search.study import load_study

    budget_path = Path(args.budget_table)
    budgets = load_budget_table(budget_path)
    study_path = Path(args.study)
    study = load_study(study_path)
    if args.trials is not None:
        study = study.model_copy(update={"trials": args.trials})
    out = Path(args.out) if args.out else Path("runs") / _safe_name(study.name)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {str(out)!r} exists and is not a folder; pick another path")
    storage_url = _storage_url(args.storage, out)
    anchors, anchor_kwargs = _load_anchors(study, study_path)
    data = _load_data(study, study_path, anchors)
    return Plan(
        study=study,
        study_path=study_path,
        budgets=budgets,
        budget_path=budget_path,
        anchors=anchors,
        anchor_kwargs=anchor_kwargs,
        data=data,
        out=out,
        storage_url=storage_url,
        trials=study.trials,
        workers=args.workers or study.workers,
        seed=study.seed if args.seed is None else args.seed,
        ray_address=args.ray_address,
        onnx=args.onnx,
        report=not args.no_report,
    )


def _safe_name(name: str) -> str:
    from search.budgets import safe_filename

    return safe_filename(name)


def _load_anchors(study, study_path: Path) -> tuple[dict, dict]:
    from space import load_anchor

    anchors, kwargs = {}, {}
    for i, spec in enumerate(study.anchors):
        kw = spec.load_kwargs(study_path.parent)
        try:
            anchors[spec.name] = load_anchor(spec.name, **kw)
        except ValueError as e:
            raise InputError(f"{study_path}: field 'anchors[{i}]' ({spec.name}): {e}") from None
        kwargs[spec.name] = kw
    return anchors, kwargs


def _load_data(study, study_path: Path, anchors: dict):
    from evaluators import fashion_mnist_splits, synthetic_splits

    d = study.data
    sizes = {anchor.input_size for anchor in anchors.values()}
    input_size = next(iter(anchors.values())).input_size
    cal = max(d.calibration, study.cka.images)
    root = d.root
    if root is not None and not Path(root).expanduser().is_absolute():
        root = str(study_path.parent / root)
    try:
        if d.dataset == "fashion-mnist":
            data = fashion_mnist_splits(
                root,
                calibration=cal,
                validation=d.validation,
                test=d.test,
                batch_size=d.batch_size,
                input_size=input_size,
            )
        elif d.dataset == "synthetic":
            n_cls = next(iter(anchors.values())).num_classes
            data = synthetic_splits(
                num_classes=n_cls,
                input_size=input_size,
                calibration=cal,
                validation=d.validation,
                test=d.test or d.validation,
                batch_size=d.batch_size,
            )
        else:
            from evaluators import imagefolder_splits

            if root is None:
                raise InputError(f"{study_path}: field 'data.root': required for imagefolder")
            data = imagefolder_splits(
                root,
                next(iter(anchors.values())),
                calibration=cal,
                validation=d.validation,
                test=d.test,
                batch_size=d.batch_size,
            )
    except InputError:
        raise
    except ValueError as e:
        raise InputError(f"{study_path}: field 'data': {e}") from None
    for name, anchor in anchors.items():
        if anchor.num_classes != data.num_classes:
            raise InputError(
                f"{study_path}: anchor {name!r} has {anchor.num_classes} classes but the "
                f"{data.name} data has {data.num_classes}; pass num_classes in timm_kwargs"
            )
    if len(sizes) > 1:
        logging.getLogger(__name__).info("anchors take different input sizes: %s", sizes)
    return data


# ---------------------------------------------------------------------------- running
def _open_study(plan: Plan, storage):
    import optuna

    from search.space import SearchSpace

    sampler = _make_sampler(plan.study.sampler, plan.seed, len(plan.study.objectives))
    try:
        study = optuna.load_study(study_name=plan.study.name, storage=storage, sampler=sampler)
        existing = [d.name.lower()[:3] for d in study.directions]
        wanted = [d[:3] for d in plan.study.directions]
        names = study.metric_names
        if existing != wanted or (names and list(names) != list(plan.study.objectives)):
            raise InputError(
                f"study {plan.study.name!r} in the storage has objectives {names}, not "
                f"{plan.study.objectives}; use another study name or --out"
            )
        fresh = False
    except KeyError:
        try:
            study = optuna.create_study(
                study_name=plan.study.name,
                storage=storage,
                sampler=sampler,
                directions=plan.study.directions,
            )
        except optuna.exceptions.DuplicatedStudyError:  # another driver created it just now
            return _open_study(plan, storage)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(plan.study.objectives))
        study.set_user_attr("objectives", list(plan.study.objectives))
        study.set_user_attr("study_definition", json.loads(plan.study.model_dump_json()))
        fresh = True
    space = SearchSpace({n: a.num_blocks for n, a in plan.anchors.items()})
    if fresh:
        for c in space.anchors():
            study.enqueue_trial(space.encode(c), user_attrs={"seeded": "anchor"})
    return study, space


def _make_sampler(name: str, seed: int, n_objectives: int):
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)


def _make_storage(url: str):
    import optuna

    if not url.startswith("sqlite"):
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})

    # WAL lets optuna-dashboard read while the driver writes, and with synchronous=NORMAL a
    # trial's dozen attribute writes cost ~2.5x less than with the default rollback journal.
    @event.listens_for(storage.engine, "connect")
    def _pragmas(conn, _record) -> None:
        cur = conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    storage.engine.dispose()
    return storage


def _cka_matrices(plan: Plan, space, log) -> dict:
    from evaluators import cka_matrix

    cache = plan.out / "cache" / "cka"
    loader = plan.data.calibration.subset(plan.study.cka.images)
    matrices = {}
    t0 = time.perf_counter()
    for i, (a, b) in enumerate(space.pairs(), start=1):
        matrices[(a, b)] = cka_matrix(plan.anchors[a], plan.anchors[b], loader, cache_dir=cache)
        log(
            f"\rCKA matrices: {i}/{len(space.pairs())} pairs ({time.perf_counter() - t0:.1f}s)",
            end="",
        )
    log("")
    return matrices


def _start_ray(plan: Plan, threads: int) -> bool:
    """Starts (or joins) Ray; returns whether this call started a local cluster."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if ray.is_initialized():
        return False
    common = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "configure_logging": True,
    }
    if plan.ray_address:
        ray.init(address=plan.ray_address, **common)
        return False
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            address="local",
            num_cpus=max(plan.workers * threads, os.cpu_count() or 1),
            _node_ip_address="127.0.0.1",
            **common,
        )
        return True


class Progress:
    """A live progress line: trials done of total, best so far per objective, time left."""

    def __init__(self, total: int, done: int, objectives: list[str], stream=sys.stderr) -> None:
        from tqdm import tqdm

        self.objectives = objectives
        self.bar = tqdm(
            total=total,
            initial=min(done, total),
            desc="trials",
            unit="trial",
            file=stream,
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=0.5,
        )
        self.best: dict[str, float] = {}
        self.pruned = self.failed = self.repeats = 0

    def seed(self, trials) -> None:
        """Takes the best values from trials finished in earlier runs."""
        for t in trials:
            self._update_best(t)
        self._refresh()

    def _update_best(self, t) -> None:
        if t.values is None or not t.user_attrs.get("feasible", True):
            return
        for name, v in zip(self.objectives, t.values, strict=False):
            better = max if name == "accuracy" else min
            self.best[name] = better(self.best.get(name, v), v)

    def _refresh(self) -> None:
        from search.budgets import format_quantity

        parts = []
        for name in self.objectives:
            if name in self.best:
                v = self.best[name]
                parts.append(
                    f"acc {v:.2f}%" if name == "accuracy" else f"{name} {format_quantity(v)}"
                )
        parts.append(f"pruned {self.pruned}")
        if self.failed:
            parts.append(f"failed {self.failed}")
        self.bar.set_postfix_str(", ".join(parts))

    def __call__(self, kind: str, trial) -> None:
        if kind == "complete":
            self._update_best(trial)
            self.bar.update(1)
        elif kind == "pruned":
            self.pruned += 1
        elif kind == "failed":
            self.failed += 1
        else:
            self.repeats += 1
        self._refresh()

    def close(self) -> None:
        """Ends the bar."""
        self.bar.close()


def run_search(plan: Plan, study, space, matrices, *, log=print) -> dict[str, int]:
    """Runs Ray Tune trials until the study holds ``plan.trials`` evaluations."""
    import ray
    from ray import tune

    from search.searcher import StitchSearcher, evaluated_trials
    from search.space import PruningRule
    from search.worker import TrialContext, trainable

    done = len(evaluated_trials(study))
    target = plan.trials - done
    if target <= 0:
        log(f"study already holds {done} evaluated trials (>= --trials {plan.trials})")
        return {"completed": 0, "failed": 0, "pruned": 0}
    cpus = max(1, (os.cpu_count() or 1) // plan.workers)
    use_gpu = _has_gpu()
    plan.started_ray = _start_ray(plan, cpus)
    if plan.ray_address:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // plan.workers)
    ctx = TrialContext(
        anchors=plan.anchor_kwargs,
        data=plan.trial_data(),
        fit_steps=plan.study.fit.steps,
        fit_lr=plan.study.fit.lr,
        latency_batch=plan.study.latency_batch,
        threads=cpus,
        use_gpu=use_gpu,
    )
    progress = Progress(plan.trials, done, list(plan.study.objectives))
    progress.seed(evaluated_trials(study))
    searcher = StitchSearcher(
        study,
        space,
        objectives=plan.study.objectives,
        budgets=plan.budgets,
        cka=matrices,
        rule=PruningRule(plan.study.cka.threshold, plan.study.cka.top_k),
        total=plan.trials,
        driver_id=plan.driver_id,
        seed=plan.seed,
        on_event=progress,
    )
    newly = searcher.record_pruned()
    if searcher._pruned:
        log(
            f"CKA rule prunes {len(searcher._pruned)} of {len(space) - len(space.anchors())} "
            f"stitch points ({newly} newly recorded as PRUNED trials)"
        )
    resources = {"cpu": cpus, "gpu": 1.0 / plan.workers if use_gpu else 0}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, ctx=ctx), resources),
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            num_samples=-1,
            max_concurrent_trials=plan.workers,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"ray-{time.strftime('%Y%m%d-%H%M%S')}-{plan.driver_id[:8]}",
            storage_path=str((plan.out / "ray").resolve()),
            verbose=0,
            stop={"time_total_s": plan.study.trial_timeout_s},
            failure_config=tune.FailureConfig(max_failures=plan.study.max_retries),
            log_to_file=True,
        ),
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tuner.fit()
    finally:
        progress.close()
    return {
        "completed": searcher.completed,
        "failed": searcher.failed,
        "pruned": searcher.pruned,
        "repeats": searcher.repeats,
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    from search.budgets import BudgetError
    from search.study import StudyError

    try:
        plan = prepare(args)
    except (InputError, StudyError, BudgetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan.driver_id = uuid.uuid4().hex
    return execute(plan)


def execute(plan: Plan) -> int:
    """Runs a validated plan: study, CKA, Ray trials, selection, exports and report."""
    from search.finish import finish
    from search.searcher import Heartbeat, evaluated_trials, fail_stale_trials

    def log(*a, **k):
        print(*a, **k, file=sys.stderr, flush=True)

    plan.out.mkdir(parents=True, exist_ok=True)
    storage = _make_storage(plan.storage_url)
    try:
        study, space = _open_study(plan, storage)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stale = fail_stale_trials(study)
    if stale:
        log(f"marked {len(stale)} trial(s) left RUNNING by a stopped run as failed: {stale}")
    log(
        f"study {plan.study.name!r}: {len(space)} candidates ({len(space.pairs())} ordered "
        f"pairs, {len(plan.anchors)} anchors), {len(evaluated_trials(study))}/{plan.trials} "
        f"evaluated, storage {masked_url(plan.storage_url)}"
    )
    matrices = _cka_matrices(plan, space, log)
    interrupted = False
    stats: dict[str, int] = {}
    with Heartbeat(study, plan.driver_id):
        try:
            with _sigint_as_keyboard_interrupt():
                stats = run_search(plan, study, space, matrices, log=log)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            _shutdown_ray(plan)
    return finish(plan, study, space, stats, interrupted=interrupted, log=log)


@contextlib.contextmanager
def _sigint_as_keyboard_interrupt():
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _shutdown_ray(plan: Plan) -> None:
    import ray

    if ray.is_initialized() and (plan.started_ray or plan.ray_address):
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
