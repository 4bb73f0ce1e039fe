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
import re
import shlex
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
    command: str = "python -m search.run"
    logged_pruning: bool = False

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


_RAY_ADDRESS = re.compile(r"^(auto|(ray://)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5})$")


def _ray_address(raw: str | None) -> str | None:
    """Validates ``--ray-address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:PORT``)."""
    if raw is None:
        return None
    address = raw.strip()
    if not _RAY_ADDRESS.match(address):
        raise InputError(
            f"--ray-address: {raw!r} is not a Ray cluster address; use auto, HOST:PORT (as "
            "printed by `ray start --head`) or ray://HOST:PORT"
        )
    if address != "auto":
        # ray.init waits minutes for a cluster that is not there; ask the port first.
        import socket

        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
        except OSError as e:
            raise InputError(
                f"--ray-address: no Ray cluster answers at {address!r} "
                f"({e.strerror or type(e).__name__}); start one with `ray start --head "
                "--port=PORT` or check the address"
            ) from None
    return address


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
        ray_address=_ray_address(args.ray_address),
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
#: Study user attributes: the driver that created the study, and that its setup (anchors
#: enqueued, CKA-pruned points recorded) is complete.
CREATOR_KEY = "created_by"
SETUP_KEY = "setup_complete"


def _open_study(plan: Plan, storage):
    """Loads the study, or creates it; returns ``(study, created)``.

    Raises:
        InputError: The stored study has other objectives.
    """
    import optuna

    try:
        study = optuna.load_study(study_name=plan.study.name, storage=storage)
    except KeyError:
        try:
            study = optuna.create_study(
                study_name=plan.study.name, storage=storage, directions=plan.study.directions
            )
        except optuna.exceptions.DuplicatedStudyError:  # another driver created it just now
            return _open_study(plan, storage)
        study.set_user_attr(CREATOR_KEY, plan.driver_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(plan.study.objectives))
        study.set_user_attr("objectives", list(plan.study.objectives))
        study.set_user_attr("study_definition", json.loads(plan.study.model_dump_json()))
        return study, True
    existing = [d.name.lower()[:3] for d in study.directions]
    wanted = [d[:3] for d in plan.study.directions]
    names = study.metric_names
    if existing != wanted or (names and list(names) != list(plan.study.objectives)):
        raise InputError(
            f"study {plan.study.name!r} in the storage has objectives {names}, not "
            f"{plan.study.objectives}; use another study name or --out"
        )
    return study, False


def _setup_study(
    plan: Plan, study, space, matrices, *, created: bool, log, critical=contextlib.nullcontext
) -> int:
    """Enqueues the anchors and records the CKA-pruned points, once per study.

    The driver that created the study does it; another driver joining waits for it (so that
    two drivers starting together record nothing twice), and takes over when the creator
    died first or the study predates this protocol.

    Args:
        plan: The run's plan.
        study: The study.
        space: The search space.
        matrices: The CKA matrices.
        created: Whether this driver created the study.
        log: Prints a progress line.
        critical: Context manager factory around the writes (defers Ctrl-C).

    Returns:
        How many PRUNED trials were newly recorded.
    """
    from search.candidates import PruningRule
    from search.liveness import driver_status, heartbeats
    from search.pruning import record_pruned_trials

    storage = study._storage
    if not created:
        t0 = time.monotonic()
        while True:
            attrs = storage.get_study_user_attrs(study._study_id)
            if attrs.get(SETUP_KEY):
                return 0
            creator = attrs.get(CREATOR_KEY)
            waited = time.monotonic() - t0
            if creator is None:  # an older study, or its creator has not got that far
                if study.get_trials(deepcopy=False) or waited > 3:
                    break
            else:
                beat = heartbeats(study).get(creator)
                if (beat is not None and not driver_status(beat)[0]) or waited > 60:
                    break
            time.sleep(0.2)
        log("setting up the study (its creator did not finish that)")
    with critical():
        trials = study.get_trials(deepcopy=False)
        if not any(t.user_attrs.get("seeded") == "anchor" for t in trials):
            for c in space.anchors():
                study.enqueue_trial(space.encode(c), user_attrs={"seeded": "anchor"})
        rule = PruningRule(plan.study.cka.threshold, plan.study.cka.top_k)
        new = record_pruned_trials(study, space, matrices, rule)
        study.set_user_attr(SETUP_KEY, True)
    return new


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
    # Failed trials are reported (one line each) and recorded by the searcher; Ray Tune's
    # own tracebacks for them would only bury that.
    for name in ("ray.tune.execution.tune_controller", "ray.tune.tune"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
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

    def __init__(self, total: int, done: int, objectives: list[str], stream=None) -> None:
        from tqdm import tqdm

        stream = sys.stderr if stream is None else stream
        self.objectives = objectives
        self.stream = stream
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
        parts.append(f"pruned {self.pruned}")  # CKA-pruned points and pruned repeats
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
            reason = " ".join(str(trial.user_attrs.get("fail_reason", "")).split())
            self.bar.write(f"trial {trial.number} failed: {reason[:300]}", file=self.stream)
        else:
            self.repeats += 1
        self._refresh()

    def close(self) -> None:
        """Ends the bar."""
        self.bar.close()


@dataclass
class RunState:
    """What this driver has done so far (kept when the run is interrupted).

    Attributes:
        searchers: The searcher of every round (a round is one Ray Tune run).
        complete: The study holds the requested number of evaluations, or every unpruned
            candidate has been evaluated.
        interrupted_trials: Trials in flight when the run was interrupted (marked FAIL).
        pruned_recorded: CKA-pruned points this driver recorded while setting up the study.
    """

    searchers: list = dataclasses.field(default_factory=list)
    complete: bool = False
    interrupted_trials: list[int] = dataclasses.field(default_factory=list)
    pruned_recorded: int = 0

    def stats(self) -> dict[str, int]:
        """Counts over all rounds."""
        keys = ("completed", "failed", "pruned", "repeats", "surplus")
        out = {k: sum(getattr(s, k) for s in self.searchers) for k in keys}
        out["pruned"] += self.pruned_recorded
        out["interrupted"] = len(self.interrupted_trials)
        return out


class SignalGuard:
    """Turns SIGINT and SIGTERM into KeyboardInterrupt, deferred inside critical sections.

    Ray Tune's own SIGINT handler (which ends the run as if it had finished) is switched
    off; an interrupt raised while the searcher writes a trial waits until the write is done,
    so that no trial is left half-written.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = signum
            return
        raise KeyboardInterrupt(signal.Signals(signum).name)

    @contextlib.contextmanager
    def critical(self):
        """Defers interrupts until the block is done."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> SignalGuard:
        import threading

        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def ignored(self):
        """Ignores further interrupts while cleaning up."""
        if not self._previous:
            yield
            return
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            yield
        finally:
            for sig in self._previous:
                signal.signal(sig, self._handler)


def run_search(
    plan: Plan,
    study,
    space,
    matrices,
    *,
    state: RunState,
    sampler,
    guard: SignalGuard | None = None,
    log=print,
) -> RunState:
    """Runs Ray Tune trials until the study holds ``plan.trials`` evaluations.

    Other drivers may work on the same study: when this driver has nothing left to start, it
    waits for their running trials, and starts another round if some of them failed.
    """
    from search.trials import evaluated_trials

    done = len(evaluated_trials(study))
    if done >= plan.trials:
        log(f"study already holds {done} evaluated trials (>= --trials {plan.trials})")
        state.complete = True
        return state
    progress = Progress(plan.trials, done, list(plan.study.objectives))
    progress.seed(evaluated_trials(study))
    try:
        while True:
            searcher = _search_round(
                plan, study, space, matrices, sampler, progress, guard, state, log
            )
            evaluated, others = _wait_for_other_drivers(plan, study, log)
            if evaluated >= plan.trials or searcher.exhausted():
                state.complete = True
                break
            if searcher.failed >= searcher.max_failures:
                log(f"stopping: {searcher.failed} trials failed in this run")
                break
            if not (searcher.completed or searcher.failed or others):
                break  # nothing happened and nothing will: do not spin
            log(f"study holds {evaluated}/{plan.trials} evaluations: starting another round")
    finally:
        progress.close()
    return state


def _search_round(
    plan: Plan, study, space, matrices, sampler, progress, guard, state: RunState, log
):
    """One Ray Tune run: trials until this driver has nothing left to start."""
    import ray
    from ray import tune

    from search.candidates import PruningRule
    from search.searcher import RetryCounter, SearcherSettings, StitchSearcher
    from search.worker import TrialContext, WorkerJob, trainable

    cpus = max(1, (os.cpu_count() or 1) // plan.workers)
    use_gpu = _has_gpu()
    started = _start_ray(plan, cpus)
    plan.started_ray = plan.started_ray or started
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
    job = WorkerJob.build(ctx, plan.study.trial_timeout_s)
    settings = SearcherSettings(
        objectives=plan.study.objectives,
        budgets=plan.budgets,
        rule=PruningRule(plan.study.cka.threshold, plan.study.cka.top_k),
        total=plan.trials,
        driver_id=plan.driver_id,
        seed=plan.seed,
        max_retries=plan.study.max_retries,
    )
    searcher = StitchSearcher(
        study,
        space,
        settings,
        sampler=sampler,
        cka=matrices,
        on_event=progress,
        guard=guard.critical if guard is not None else None,
    )
    pruned = searcher.ledger.pruned
    if pruned and not plan.logged_pruning:
        plan.logged_pruning = True
        progress.pruned += len(pruned)  # the bar counts CKA-pruned points too
        log(
            f"CKA rule prunes {len(pruned)} of {len(space) - len(space.anchors())} "
            "stitch points (recorded as PRUNED trials)"
        )
    state.searchers.append(searcher)
    resources = {"cpu": cpus, "gpu": 1.0 / plan.workers if use_gpu else 0}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, job=job), resources),
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
            failure_config=tune.FailureConfig(max_failures=plan.study.max_retries),
            callbacks=[RetryCounter(searcher)],
            log_to_file=True,
        ),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tuner.fit()
    return searcher


def _wait_for_other_drivers(plan: Plan, study, log, poll_s: float = 1.0) -> tuple[int, int]:
    """Waits while other drivers have trials running that may decide the total.

    Trials of drivers that died meanwhile are failed (:func:`fail_stale_trials`).

    Returns:
        ``(evaluated, others)``: evaluations in the study, and how many trials of other
        drivers were waited for.
    """
    from optuna.trial import TrialState

    from search.liveness import fail_stale_trials
    from search.trials import evaluated_trials

    waited_for: set[int] = set()
    said = False
    while True:
        fail_stale_trials(study)
        running = [
            t
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if t.user_attrs.get("driver") != plan.driver_id
        ]
        evaluated = len(evaluated_trials(study))
        # Done when nothing runs, or when the study holds what this driver was asked for
        # (another driver may have been asked for more).
        if not running or evaluated >= plan.trials:
            return evaluated, len(waited_for)
        waited_for |= {t.number for t in running}
        if not said:
            log(f"waiting for {len(running)} trial(s) of other drivers to finish")
            said = True
        time.sleep(poll_s)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from search.budgets import BudgetError
    from search.study import StudyError

    try:
        plan = prepare(args)
    except (InputError, StudyError, BudgetError, ValueError) as e:
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    plan.driver_id = uuid.uuid4().hex
    plan.command = "python -m search.run " + shlex.join(argv)
    return execute(plan)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


def execute(plan: Plan) -> int:
    """Runs a validated plan: study, CKA, Ray trials, selection, exports and report."""
    from search.candidates import SearchSpace
    from search.finish import clean_staging, finish
    from search.liveness import Heartbeat, fail_stale_trials, live_drivers
    from search.sampler import make_sampler
    from search.trials import evaluated_trials

    def log(*a, **k):
        print(*a, **k, file=sys.stderr, flush=True)

    plan.out.mkdir(parents=True, exist_ok=True)
    storage = _make_storage(plan.storage_url)
    space = SearchSpace({n: a.num_blocks for n, a in plan.anchors.items()})
    state = RunState()
    interrupted: str | None = None
    with SignalGuard() as guard:
        try:
            matrices = _cka_matrices(plan, space, log)
            try:
                study, created = _open_study(plan, storage)
            except InputError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
            with Heartbeat(study, plan.driver_id):
                newly = _setup_study(
                    plan, study, space, matrices, created=created, log=log, critical=guard.critical
                )
                state.pruned_recorded = newly
                others = live_drivers(study) - {plan.driver_id}
                sampler = make_sampler(
                    plan.study.sampler, _driver_seed(plan, others), len(plan.study.objectives)
                )
                if others and plan.storage_url.startswith("sqlite"):
                    log(
                        f"warning: {len(others)} other driver(s) use this SQLite study; SQLite "
                        "takes one writer: use --storage postgresql+psycopg://... for several"
                    )
                clean_staging(plan.out, live=others)
                stale = fail_stale_trials(study)
                if stale:
                    log(f"failed {len(stale)} trial(s) left RUNNING by a stopped driver: {stale}")
                log(
                    f"study {plan.study.name!r}: {len(space)} candidates "
                    f"({len(space.pairs())} ordered pairs, {len(plan.anchors)} anchors), "
                    f"{len(evaluated_trials(study))}/{plan.trials} evaluated, "
                    f"{newly} pruned points recorded, {len(others)} other driver(s) running, "
                    f"storage {masked_url(plan.storage_url)}"
                )
                try:
                    run_search(
                        plan,
                        study,
                        space,
                        matrices,
                        state=state,
                        sampler=sampler,
                        guard=guard,
                        log=log,
                    )
                except KeyboardInterrupt as e:
                    interrupted = str(e) or "SIGINT"
                finally:
                    with guard.ignored():
                        _shutdown_ray(plan)
                        if interrupted:
                            state.interrupted_trials = _fail_own_trials(
                                study, plan.driver_id, interrupted
                            )
        except KeyboardInterrupt as e:  # before the search started
            interrupted = str(e) or "SIGINT"
            with guard.ignored():
                _shutdown_ray(plan)
            log(f"interrupted ({interrupted}) before the search started; nothing was evaluated")
            return 130 if interrupted == "SIGINT" else 143
        stats = state.stats()
        if interrupted:
            with guard.ignored():
                finish(plan, study, space, stats, interrupted=True, complete=False, log=log)
            return 143 if interrupted == "SIGTERM" else 130
        try:
            return finish(
                plan, study, space, stats, interrupted=False, complete=state.complete, log=log
            )
        except KeyboardInterrupt as e:
            log(
                f"interrupted ({e or 'SIGINT'}) while exporting: no exports were published; "
                f"to export, run the same command again: {plan.command}"
            )
            return 143 if str(e) == "SIGTERM" else 130


def _driver_seed(plan: Plan, others: set[str]) -> int:
    """The sampler seed: the study's, mixed with the driver id when other drivers run.

    Drivers sharing a study with the same seed would propose the same candidates in the same
    order and keep colliding.
    """
    if not others:
        return plan.seed
    return (plan.seed * 1_000_003 + int(plan.driver_id[:8], 16)) % 2**32


def _fail_own_trials(study, driver_id: str, why: str) -> list[int]:
    """Marks this driver's RUNNING trials as FAIL (the run was interrupted)."""
    from optuna.trial import TrialState

    failed = []
    storage = study._storage
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("driver") != driver_id:
            continue
        try:
            storage.set_trial_user_attr(t._trial_id, "fail_reason", f"interrupted ({why})")
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        except (RuntimeError, ValueError):
            continue
        failed.append(t.number)
    return failed


def _shutdown_ray(plan: Plan) -> None:
    import ray

    if ray.is_initialized() and (plan.started_ray or plan.ray_address):
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
