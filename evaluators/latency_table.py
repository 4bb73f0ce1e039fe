"""Device latency tables: the pieces a candidate is made of, timed in context on a device.

A candidate runs a front anchor's stem and blocks ``[0, k)``, a stitching layer and a back
anchor's blocks ``[j, n)`` and head (a bare anchor: the whole anchor). Tiny parts timed one
by one misrepresent a whole forward pass (the per-call Python overhead dominates each small
block, and a part timed alone keeps its caches warm), so the table times large contiguous
pieces instead (:func:`profile_parts`): per anchor, every **prefix** ``front(k)`` = stem and
blocks ``[0, k)`` that a stitch can cut at, every **suffix** ``back(j)`` = blocks ``[j, n)``
and head, and the **bare anchor** end to end; and every stitching layer of the space. A
stitch is predicted as ``scale * (prefix + stitch + suffix) + overhead``, a bare anchor as
its own measurement (:meth:`LatencyTable.predict`).

**Parts** are named by strings (:func:`part_keys`): ``prefix|<anchor>|<k>``,
``suffix|<anchor>|<j>``, ``anchor|<anchor>``, and ``stitch|<kind>|<src>|<dst>`` for a
stitching layer, by its kind and the two cuts' shapes (``NCHW:64x7x7``, ``NLC:1+7x7x64`` for
a class token and a 7x7 grid of 64-wide tokens), so stitch points with equal shapes share an
entry. A candidate at a searched input resolution (:attr:`space.Candidate.resolution`) runs
its anchors at that size: ``prefix|<anchor>|<k>@<px>``, ``suffix|<anchor>|<j>@<px>``,
``anchor|<anchor>@<px>`` (the anchor records then hold the cut shapes at each resolution,
``cuts_at``), so a table covers a study's resolutions only when profiled for them.

**Timing** (:func:`time_calls`): after warm-up, each repeat times a loop of calls long
enough (about :data:`REPEAT_SECONDS`) that the timer's own cost vanishes, and reports the
mean per call; the median over repeats is the part's latency, with its inter-quartile range.

**Overhead.** A stitch's three pieces are three calls where the stitched network makes one.
Per runtime and batch size, ``measured = scale * sum of pieces + overhead`` is fitted by
least squares (:func:`fit_overhead`) over a spread sample of stitched networks timed end to
end and the anchors (each as its prefix and suffix at its middle cut, :func:`split_cut`,
against its end-to-end time), and the fit's errors on those networks are recorded.

**The table** is versioned JSON (:data:`TABLE_FORMAT`; a table of another version is
refused, to be re-profiled): the device's name and identity (CPU, threads, library
versions), the study it was made for (name, and a fingerprint of its anchors' names, weights
and input sizes), when, the settings, and per runtime and batch size the parts and the
fitted overhead. :meth:`LatencyTable.from_json` validates a file and raises
:class:`LatencyTableError` naming the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluators.cka import anchor_identity
from space import (
    Anchor,
    Candidate,
    FeatureInfo,
    InputError,
    StitchConfig,
    build_stitched,
    make_stitching_layer,
)

#: The format tag of a latency table; bumped when the layout changes (version 1 timed the
#: stem, each block and the head alone; version 2 times prefixes, suffixes and anchors).
TABLE_FORMAT = "stitchsearch-latency-table/2"

#: Seconds each timed repeat runs its loop of calls for (at least one call).
REPEAT_SECONDS = 0.002

#: A callable that prepares a part to run on a runtime: ``(module, input shape with the
#: batch dimension) -> run``, where ``run()`` does one forward pass.
RunnerFactory = Callable[[nn.Module, tuple[int, ...]], Callable[[], object]]


class LatencyTableError(InputError):
    """A latency table is unreadable or invalid.

    Attributes:
        field: The offending field (``"runtimes.torch.1.parts"``), or None for the whole file.
        problem: What is wrong.
    """

    def __init__(self, problem: str, field: str | None = None) -> None:
        self.problem = problem
        self.field = field
        super().__init__(problem if field is None else f"field {field!r}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.problem, self.field))


# --------------------------------------------------------------------------- parts
def _shape_text(info: FeatureInfo) -> str:
    if info.is_tokens:
        return f"NLC:{info.num_prefix_tokens}+{info.height}x{info.width}x{info.channels}"
    return f"NCHW:{info.channels}x{info.height}x{info.width}"


def _cut(record: Mapping[str, Any], cut: int, resolution: int | None = None) -> FeatureInfo:
    cuts = record["cuts"] if resolution is None else record["cuts_at"][str(resolution)]
    layout, c, h, w, p = cuts[cut]
    return FeatureInfo(layout, c, h, w, p)


def _cut_rows(anchor: Anchor) -> list[list[Any]]:
    return [
        [f.layout, f.channels, f.height, f.width, f.num_prefix_tokens] for f in anchor.features()
    ]


def _at(resolution: int | None) -> str:
    """The part-name suffix of a resolution (none at the native sizes)."""
    return "" if resolution is None else f"@{resolution}"


def stitch_key(src: FeatureInfo, dst: FeatureInfo) -> str:
    """The part name of the stitching layer between two cuts (its kind and both shapes)."""
    kind = f"{'vit' if src.is_tokens else 'cnn'}->{'vit' if dst.is_tokens else 'cnn'}"
    return f"stitch|{kind}|{_shape_text(src)}|{_shape_text(dst)}"


def anchor_latency_record(anchor: Anchor, resolutions: Iterable[int] = ()) -> dict[str, Any]:
    """What a table records of an anchor: name, weights identity, input size and cuts.

    Args:
        anchor: The anchor (at its native size).
        resolutions: Searched input sizes; their cut shapes are recorded under ``cuts_at``.
    """
    rec: dict[str, Any] = {
        "name": anchor.name,
        "identity": anchor_identity(anchor),
        "checkpoint_sha256": anchor.checkpoint_sha256,
        "input_size": list(anchor.input_size),
        "num_blocks": anchor.num_blocks,
        "cuts": _cut_rows(anchor),
    }
    sizes = sorted(set(resolutions))
    if sizes:
        rec["cuts_at"] = {str(r): _cut_rows(anchor.at_resolution(r)) for r in sizes}
    return rec


def candidate_resolutions(candidates: Iterable[Candidate]) -> list[int]:
    """The searched resolutions among candidates (sorted; empty at the native sizes)."""
    return sorted({c.resolution for c in candidates if c.resolution is not None})


def prefix_key(anchor: str, k: int, resolution: int | None = None) -> str:
    """The part name of an anchor's stem and blocks ``[0, k)``."""
    return f"prefix|{anchor}|{k}{_at(resolution)}"


def suffix_key(anchor: str, j: int, resolution: int | None = None) -> str:
    """The part name of an anchor's blocks ``[j, n)`` and head."""
    return f"suffix|{anchor}|{j}{_at(resolution)}"


def anchor_key(anchor: str, resolution: int | None = None) -> str:
    """The part name of a bare anchor, end to end."""
    return f"anchor|{anchor}{_at(resolution)}"


def split_cut(num_blocks: int) -> int:
    """The cut an anchor is split at (prefix and suffix) for the overhead fit: its middle."""
    return max(1, num_blocks // 2)


def part_keys(candidate: Candidate, anchors: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The parts a candidate's prediction is made of, in execution order.

    A bare anchor: ``[anchor|<name>]``; a stitch: its front anchor's prefix up to cut ``k``,
    the stitching layer and its back anchor's suffix from cut ``j``.

    Args:
        candidate: A bare anchor or a stitch.
        anchors: :func:`anchor_latency_record` of each anchor by name.

    Raises:
        KeyError: The candidate names an anchor that ``anchors`` lacks, or a resolution
            whose cut shapes its record lacks.
    """
    front = anchors[candidate.front]
    r = candidate.resolution
    if candidate.is_anchor:
        return [anchor_key(candidate.front, r)]
    back = anchors[candidate.back]
    k, j = candidate.front_block, candidate.back_block
    return [
        prefix_key(candidate.front, k, r),
        stitch_key(_cut(front, k, r), _cut(back, j, r)),
        suffix_key(candidate.back, j, r),
    ]


def fit_keys(candidate: Candidate, anchors: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The pieces whose sum the overhead fit relates to a network's end-to-end time.

    A stitch's parts (:func:`part_keys`); a bare anchor's prefix and suffix at its
    :func:`split_cut` (so that, like a stitch, it is pieces timed apart).

    Raises:
        KeyError: As :func:`part_keys`.
    """
    if not candidate.is_anchor:
        return part_keys(candidate, anchors)
    name, r = candidate.front, candidate.resolution
    m = split_cut(anchors[name]["num_blocks"])
    return [prefix_key(name, m, r), suffix_key(name, m, r)]


def study_fingerprint(anchors: Iterable[Mapping[str, Any]]) -> str:
    """SHA-256 over the anchors' names, weights identities and input sizes, in order."""
    data = [[a["name"], a["identity"], list(a["input_size"])] for a in anchors]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


class _Call(nn.Module):
    """A part as a module: ``fn(x)`` (keeps the anchor's model registered for export)."""

    def __init__(self, model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _part_modules(
    anchors: Mapping[str, Anchor], candidates: Sequence[Candidate]
) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Every part the candidates use: key -> (module, input shape of one image).

    Per anchor and resolution of the candidates: the bare anchor and its prefix and suffix
    at its :func:`split_cut`; each prefix and suffix a stitch cuts at; each stitching layer
    (by kind and shapes).
    """
    sizes = candidate_resolutions(candidates)
    records = {name: anchor_latency_record(a, sizes) for name, a in anchors.items()}
    resized: dict[tuple[str, int | None], tuple[Anchor, list[FeatureInfo]]] = {}

    def at(name: str, r: int | None) -> tuple[Anchor, list[FeatureInfo]]:
        if (name, r) not in resized:
            a = anchors[name] if r is None else anchors[name].at_resolution(r)
            resized[name, r] = (a, a.features())
        return resized[name, r]

    out: dict[str, tuple[nn.Module, tuple[int, ...]]] = {}

    def add_prefix(name: str, k: int, r: int | None) -> None:
        key = prefix_key(name, k, r)
        if key not in out:
            a, _ = at(name, r)
            out[key] = (_Call(a.model, lambda x, a=a, k=k: a.forward_front(x, k)), a.input_size)

    def add_suffix(name: str, j: int, r: int | None) -> None:
        key = suffix_key(name, j, r)
        if key not in out:
            a, cuts = at(name, r)
            out[key] = (_Call(a.model, lambda h, a=a, j=j: a.forward_back(h, j)), cuts[j].shape)

    for r in sizes or [None]:
        for name in anchors:
            a, _ = at(name, r)
            out[anchor_key(name, r)] = (a.model, a.input_size)
            m = split_cut(a.num_blocks)
            add_prefix(name, m, r)
            add_suffix(name, m, r)
    for c in candidates:
        r = c.resolution
        if c.is_anchor:
            continue
        add_prefix(c.front, c.front_block, r)
        src = _cut(records[c.front], c.front_block, r)
        dst = _cut(records[c.back], c.back_block, r)
        key = stitch_key(src, dst)
        if key not in out:
            layer = make_stitching_layer(src, dst).eval()
            for p in layer.parameters():
                p.requires_grad_(False)
            out[key] = (layer, src.shape)
        add_suffix(c.back, c.back_block, r)
    return out


# --------------------------------------------------------------------------- timing
def _percentile(sorted_values: list[float], q: float) -> float:
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_calls(
    run: Callable[[], object], *, warmup: int = 3, repeats: int = 15
) -> dict[str, float | int]:
    """Times ``run()``: warm-up, then ``repeats`` loops of calls; the mean call per loop.

    Args:
        run: One forward pass.
        warmup: Untimed calls first.
        repeats: Timed loops.

    Returns:
        ``median_ms``, ``p25_ms``, ``p75_ms``, ``iqr_ms``, ``repeats`` and ``calls`` (per
        loop).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        run()
    once = math.inf
    for _ in range(3):  # the fastest of three calls sets the loop length
        t0 = time.perf_counter()
        run()
        once = min(once, time.perf_counter() - t0)
    calls = max(1, min(10_000, math.ceil(REPEAT_SECONDS / max(once, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            run()
        times.append((time.perf_counter() - t0) * 1000.0 / calls)
    s = sorted(times)
    p25, p75 = _percentile(s, 0.25), _percentile(s, 0.75)
    return {
        "median_ms": statistics.median(s),
        "p25_ms": p25,
        "p75_ms": p75,
        "iqr_ms": p75 - p25,
        "repeats": repeats,
        "calls": calls,
    }


def torch_runner(module: nn.Module, shape: tuple[int, ...]) -> Callable[[], object]:
    """Runs ``module`` in PyTorch (inference mode) on a fixed random input of ``shape``."""
    param = next(module.parameters(), None)
    x = torch.randn(shape, dtype=param.dtype if param is not None else torch.float32)
    module.eval()

    def run() -> object:
        with torch.inference_mode():
            return module(x)

    return run


def calibration_stitches(candidates: Sequence[Candidate], count: int) -> list[Candidate]:
    """Up to ``count`` stitches spread evenly over the sorted stitches (deterministic)."""
    stitches = sorted(c for c in candidates if not c.is_anchor)
    if count <= 0 or not stitches:
        return []
    if count >= len(stitches):
        return stitches
    step = len(stitches) / count
    return [stitches[int(i * step + step / 2)] for i in range(count)]


# --------------------------------------------------------------------------- the table
@dataclass
class LatencyTable:
    """A device's latency table (see the module docstring for the JSON layout).

    Attributes:
        device: The device's name.
        created: When it was profiled (ISO 8601, UTC).
        host: The device's identity: CPU model, cores, threads, library versions.
        study: ``{"name", "fingerprint", "anchors": [anchor_latency_record, ...]}``.
        settings: Warm-up, repeats, batch sizes, calibration networks.
        runtimes: Runtime -> batch size (a string) -> ``{"parts": {key: timing},
            "scale": float, "overhead_ms": float, "fit": {...}}``.
        predict_runtime: The runtime predictions use.
        profile_seconds: How long profiling took.
        sha256: SHA-256 of the file the table was read from (None when built in memory).
    """

    device: str
    created: str
    host: dict[str, Any]
    study: dict[str, Any]
    settings: dict[str, Any]
    runtimes: dict[str, dict[str, dict[str, Any]]]
    predict_runtime: str = "torch"
    profile_seconds: float = 0.0
    sha256: str | None = field(default=None, compare=False)

    @property
    def anchors(self) -> dict[str, dict[str, Any]]:
        """The anchors' records by name."""
        return {a["name"]: a for a in self.study["anchors"]}

    def _entry(self, runtime: str | None, batch: int) -> dict[str, Any]:
        rt = runtime or self.predict_runtime
        try:
            return self.runtimes[rt][str(batch)]
        except KeyError:
            raise KeyError(
                f"the table has no timings for runtime {rt!r} at batch {batch}"
            ) from None

    def parts_sum(
        self, candidate: Candidate, *, batch: int = 1, runtime: str | None = None
    ) -> float:
        """The sum of a candidate's parts (:func:`part_keys`), in milliseconds per call."""
        parts = self._entry(runtime, batch)["parts"]
        return sum(parts[k]["median_ms"] for k in part_keys(candidate, self.anchors))

    def predict(self, candidate: Candidate, *, batch: int = 1, runtime: str | None = None) -> float:
        """Predicted latency of one call at ``batch``.

        A bare anchor: its own end-to-end measurement. A stitch: the sum of its front
        anchor's prefix, the stitching layer and its back anchor's suffix, times the fitted
        scale, plus the fitted per-call overhead (never below 0).

        Raises:
            KeyError: A part or anchor the table lacks (:meth:`missing_parts` says which).
        """
        entry = self._entry(runtime, batch)
        total = self.parts_sum(candidate, batch=batch, runtime=runtime)
        if candidate.is_anchor:
            return total
        return max(entry.get("scale", 1.0) * total + entry["overhead_ms"], 0.0)

    def missing_parts(self, candidates: Iterable[Candidate], *, batch: int = 1) -> list[str]:
        """Parts the candidates use that the table has no timing for (in first-use order)."""
        anchors = self.anchors
        parts = self._entry(None, batch)["parts"]
        missing: dict[str, None] = {}
        for c in candidates:
            try:
                keys = part_keys(c, anchors)
            except KeyError:  # no cut shapes at the candidate's resolution
                keys = [
                    anchor_key(c.front, c.resolution)
                    if c.is_anchor
                    else prefix_key(c.front, c.front_block, c.resolution)
                ]
            for key in keys:
                if key not in parts:
                    missing[key] = None
        return list(missing)

    def identity(self) -> dict[str, Any]:
        """What an export records of the table it was predicted with."""
        return {
            "format": TABLE_FORMAT,
            "device": self.device,
            "created": self.created,
            "study": self.study["name"],
            "fingerprint": self.study["fingerprint"],
            "runtime": self.predict_runtime,
            "sha256": self.sha256,
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "format": TABLE_FORMAT,
            "device": self.device,
            "created": self.created,
            "host": self.host,
            "study": self.study,
            "settings": self.settings,
            "predict_runtime": self.predict_runtime,
            "profile_seconds": round(self.profile_seconds, 3),
            "runtimes": self.runtimes,
        }

    def to_json(self) -> str:
        """The JSON text (indented, keys in a stable order)."""
        return json.dumps(self.to_dict(), indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> LatencyTable:
        """Parses and validates a table.

        Raises:
            LatencyTableError: Not JSON, another format, or a missing or invalid field.
        """
        raw = text.encode() if isinstance(text, str) else text
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LatencyTableError(f"not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise LatencyTableError(f"must be a JSON object, got {type(doc).__name__}")
        if doc.get("format") != TABLE_FORMAT:
            found = doc.get("format")
            older = isinstance(found, str) and found.startswith(TABLE_FORMAT.rsplit("/", 1)[0])
            what = "an older table format" if older else "not a latency table of this version"
            raise LatencyTableError(
                f"is {found!r} ({what}; this version reads {TABLE_FORMAT!r})", "format"
            )
        for key, kind in (
            ("device", str),
            ("created", str),
            ("host", dict),
            ("study", dict),
            ("settings", dict),
            ("runtimes", dict),
            ("predict_runtime", str),
        ):
            if not isinstance(doc.get(key), kind):
                raise LatencyTableError(f"missing or not a JSON {kind.__name__}", key)
        study = doc["study"]
        if not isinstance(study.get("name"), str) or not isinstance(study.get("fingerprint"), str):
            raise LatencyTableError("needs 'name' and 'fingerprint' strings", "study")
        anchors = study.get("anchors")
        if not isinstance(anchors, list) or not anchors:
            raise LatencyTableError("must be a non-empty list", "study.anchors")
        for i, a in enumerate(anchors):
            where = f"study.anchors[{i}]"
            if not isinstance(a, dict):
                raise LatencyTableError("must be a JSON object", where)
            for key in ("name", "identity", "input_size", "num_blocks", "cuts"):
                if key not in a:
                    raise LatencyTableError(f"missing {key!r}", where)
            cuts = a["cuts"]
            ok = isinstance(cuts, list) and len(cuts) == a["num_blocks"] + 1
            if not ok or not all(
                isinstance(c, list) and len(c) == 5 and c[0] in ("NCHW", "NLC") for c in cuts
            ):
                raise LatencyTableError(
                    "must list [layout, channels, height, width, prefix] for cuts 0..num_blocks",
                    f"{where}.cuts",
                )
        if doc["predict_runtime"] not in doc["runtimes"]:
            raise LatencyTableError(
                f"{doc['predict_runtime']!r} has no timings in 'runtimes'", "predict_runtime"
            )
        for rt, batches in doc["runtimes"].items():
            if not isinstance(batches, dict) or not batches:
                raise LatencyTableError("must map batch sizes to timings", f"runtimes.{rt}")
            for batch, entry in batches.items():
                where = f"runtimes.{rt}.{batch}"
                if not batch.isdigit() or not isinstance(entry, dict):
                    raise LatencyTableError("must be a batch size mapping to timings", where)
                for key in ("overhead_ms", "scale"):
                    value = entry.get(key, 1.0 if key == "scale" else None)
                    if not _is_number(value):
                        raise LatencyTableError(
                            f"must be a number, got {value!r}", f"{where}.{key}"
                        )
                parts = entry.get("parts")
                if not isinstance(parts, dict):
                    raise LatencyTableError("must be a JSON object", f"{where}.parts")
                for key, timing in parts.items():
                    value = timing.get("median_ms") if isinstance(timing, dict) else None
                    if not _is_number(value) or value < 0:
                        raise LatencyTableError(
                            f"must be a number >= 0, got {value!r}",
                            f"{where}.parts.{key}.median_ms",
                        )
        if "1" not in doc["runtimes"][doc["predict_runtime"]]:
            raise LatencyTableError(
                "has no timings at batch 1", f"runtimes.{doc['predict_runtime']}"
            )
        return cls(
            device=doc["device"],
            created=doc["created"],
            host=doc["host"],
            study=study,
            settings=doc["settings"],
            runtimes=doc["runtimes"],
            predict_runtime=doc["predict_runtime"],
            profile_seconds=float(doc.get("profile_seconds", 0.0)),
            sha256=hashlib.sha256(raw).hexdigest(),
        )

    @classmethod
    def read(cls, path: str | Path) -> LatencyTable:
        """Reads and validates a table file.

        Raises:
            LatencyTableError: A missing or unreadable file, or an invalid table.
        """
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "no such file"
            raise LatencyTableError(what)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise LatencyTableError(f"cannot read the file: {e.strerror}") from None
        return cls.from_json(raw)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- profiling
def profile_parts(
    anchors: Mapping[str, Anchor],
    candidates: Sequence[Candidate],
    *,
    device: str,
    study_name: str,
    host: Mapping[str, Any],
    runtimes: Mapping[str, RunnerFactory],
    batch_sizes: Sequence[int] = (1,),
    warmup: int = 3,
    repeats: int = 15,
    calibration: int = 12,
    predict_runtime: str = "torch",
    on_step: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Measures every part the candidates use in context, and fits the per-call overhead.

    Times each bare anchor end to end, each prefix and suffix a stitch cuts at (and each
    anchor's at its :func:`split_cut`), and each stitching layer; then the calibration
    stitches end to end, and fits ``measured = scale * sum of pieces + overhead`` over them
    and the anchors (:func:`fit_keys`).

    Args:
        anchors: The study's anchors by name, in the study's order (on the CPU).
        candidates: Every candidate of the study (anchors and stitches).
        device: The device's name (recorded).
        study_name: The study's name (recorded).
        host: The device's identity (recorded).
        runtimes: Runtime name -> :data:`RunnerFactory` (``{"torch": torch_runner}``).
        batch_sizes: Batch sizes to time at (batch 1 first).
        warmup: Untimed calls before each timing.
        repeats: Timed loops per part.
        calibration: Stitched networks measured end to end (besides every anchor) to fit
            the overhead.
        predict_runtime: The runtime predictions use (one of ``runtimes``).
        on_step: Called with a description after every timing (a progress bar).

    Returns:
        The table (``created`` is set by the caller's clock: now, UTC).
    """
    if predict_runtime not in runtimes:
        raise ValueError(f"predict_runtime {predict_runtime!r} is not among {sorted(runtimes)}")
    batches = sorted(set(batch_sizes))
    t_start = time.perf_counter()
    sizes = candidate_resolutions(candidates)
    records = [anchor_latency_record(a, sizes) for a in anchors.values()]
    by_name = {r["name"]: r for r in records}
    modules = _part_modules(anchors, candidates)
    anchor_networks = [Candidate.anchor(n, r) for r in (sizes or [None]) for n in anchors]
    networks = anchor_networks + calibration_stitches(candidates, calibration)
    table_runtimes: dict[str, dict[str, dict[str, Any]]] = {}
    for rt, factory in runtimes.items():
        table_runtimes[rt] = {}
        for batch in batches:
            parts = {}
            for key, (module, shape) in modules.items():
                parts[key] = time_calls(
                    factory(module, (batch, *shape)), warmup=warmup, repeats=repeats
                )
                if on_step:
                    on_step(f"{rt} b{batch} {key}")
            fit = []
            for c in networks:
                if c.is_anchor:  # timed end to end among the parts
                    measured = parts[anchor_key(c.front, c.resolution)]["median_ms"]
                else:
                    net, size = _network(anchors, c)
                    measured = time_calls(
                        factory(net, (batch, *size)), warmup=warmup, repeats=repeats
                    )["median_ms"]
                    if on_step:
                        on_step(f"{rt} b{batch} {c.label}")
                total = sum(parts[k]["median_ms"] for k in fit_keys(c, by_name))
                fit.append((c, measured, total))
            scale, overhead = fit_overhead([s for _, _, s in fit], [m for _, m, _ in fit])
            errors = [abs(scale * s + overhead - m) / m * 100 for _, m, s in fit if m > 0]
            table_runtimes[rt][str(batch)] = {
                "scale": scale,
                "overhead_ms": overhead,
                "fit": {
                    "networks": [
                        {"candidate": c.label, "measured_ms": m, "parts_ms": s} for c, m, s in fit
                    ],
                    "median_abs_error_pct": statistics.median(errors) if errors else 0.0,
                    "max_abs_error_pct": max(errors, default=0.0),
                },
                "parts": parts,
            }
    study = {
        "name": study_name,
        "fingerprint": study_fingerprint(records),
        "anchors": records,
    }
    return LatencyTable(
        device=device,
        created="",
        host=dict(host),
        study=study,
        settings={
            "warmup": warmup,
            "repeats": repeats,
            "repeat_seconds": REPEAT_SECONDS,
            "batch_sizes": batches,
            "calibration_networks": len(networks),
            "runtimes": list(runtimes),
        },
        runtimes=table_runtimes,
        predict_runtime=predict_runtime,
        profile_seconds=time.perf_counter() - t_start,
    )


def fit_overhead(parts_ms: Sequence[float], measured_ms: Sequence[float]) -> tuple[float, float]:
    """Fits ``measured = scale * sum of parts + overhead`` over networks timed end to end.

    Least squares over the networks; with fewer than three networks, or a scale outside
    ``[0.5, 2]`` (too few or too similar networks), the scale is 1 and the overhead the
    median difference.

    Returns:
        ``(scale, overhead_ms)``.
    """
    if not parts_ms:
        return 1.0, 0.0
    if len(parts_ms) >= 3:
        x = torch.tensor(parts_ms, dtype=torch.float64)
        y = torch.tensor(measured_ms, dtype=torch.float64)
        a = torch.stack([x, torch.ones_like(x)], dim=1)
        sol = torch.linalg.lstsq(a, y[:, None]).solution[:, 0]
        scale, overhead = float(sol[0]), float(sol[1])
        if 0.5 <= scale <= 2.0:
            return scale, overhead
    return 1.0, statistics.median(m - s for s, m in zip(parts_ms, measured_ms, strict=True))


def count_steps(
    anchors: Mapping[str, Anchor],
    candidates: Sequence[Candidate],
    *,
    runtimes: int,
    batch_sizes: Sequence[int],
    calibration: int,
) -> int:
    """How many timings :func:`profile_parts` makes (for a progress bar's total)."""
    parts = len(_part_modules(anchors, candidates))
    stitches = len(calibration_stitches(candidates, calibration))  # anchors are parts
    return runtimes * len(set(batch_sizes)) * (parts + stitches)


def _network(anchors: Mapping[str, Anchor], c: Candidate) -> tuple[nn.Module, tuple[int, ...]]:
    """The candidate's network and the ``(C, H, W)`` it runs at.

    A stitch gets its layer at default init (timing only); the size is the candidate's
    resolution, else the front anchor's native size.
    """
    front, back = anchors[c.front], anchors[c.back]
    if c.resolution is not None:
        front, back = front.at_resolution(c.resolution), back.at_resolution(c.resolution)
    if c.is_anchor:
        return front.model, tuple(front.input_size)
    net = build_stitched(front, back, StitchConfig(c.front, c.back, c.front_block, c.back_block))
    return net, tuple(net.input_size)
