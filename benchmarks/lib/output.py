"""What a benchmark writes: its results JSON and its section of ``BENCHMARKS.md``.

The options every script shares for its inputs and outputs (:func:`bench_parser`), JSON
written atomically, markdown tables, and :func:`publish`: the JSON written, the section
printed and put into ``BENCHMARKS.md`` between its generated markers
(``<!-- BEGIN id -->`` ... ``<!-- END id -->``), stamped with the date, machine, commit and
command of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.lib.environment import (
    DEFAULT_BUDGETS,
    DEFAULT_GROUND_TRUTH,
    DEFAULT_MD,
    DEFAULT_STUDY,
    RESULTS,
    ROOT,
)
from space import atomic_write

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
    ("latency_table_cuda", "8b. Device latency tables on a GPU (CUDA events)"),
    ("real_pair", "9. Real ImageNet weights: EfficientNet-Lite0 and Lite1 stitched both ways"),
    ("real_pair_gpu", "9b. The real pair on a GPU"),
    ("real_trials", "9c. Real weights through the workers' evaluation, on the CPU"),
    ("real_trials_gpu", "9c. Real weights through the workers' evaluation, on a GPU"),
    ("family", "10. The family: anchors and stitches trained jointly (rung 2)"),
)

#: The top of a new BENCHMARKS.md (its sections follow as placeholders).
HEADER = """# Benchmarks

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


def device_section(section: str, device: str) -> str:
    """The section id of a run on ``device``: ``<section>_gpu`` on CUDA, else ``section``.

    A GPU run keeps its own section and results JSON, so a rebuild on a CPU (the
    default of every script) never overwrites it.
    """
    return f"{section}_gpu" if device.startswith("cuda") else section


def device_out(args: argparse.Namespace, section: str) -> None:
    """Points ``args.out`` at ``<section>.json`` when it is the CPU section's default."""
    base = section.removesuffix("_gpu")
    if section != base and Path(args.out) == RESULTS / f"{base}.json":
        args.out = RESULTS / f"{section}.json"


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


def update_markdown(
    section: str, body: str, info: Mapping[str, Any], command: str, path: Path | str
) -> None:
    """Replaces one section of ``BENCHMARKS.md`` (created with every section if missing).

    Args:
        section: Section id (see :data:`SECTIONS`).
        body: Markdown of the section (tables and findings).
        info: :func:`~benchmarks.lib.environment.machine_info` of the run.
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
        text = HEADER
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
    """How a benchmark was invoked, for the markdown stamp.

    Paths inside the repository are written relative to its root (``run_all`` passes
    absolute ones), so a stamp names no machine's folders.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    root = f"{ROOT}{os.sep}"
    args = [a[len(root) :] if a.startswith(root) else a for a in args]
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
        res: Results, with ``machine`` (:func:`~benchmarks.lib.environment.machine_info`).
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
