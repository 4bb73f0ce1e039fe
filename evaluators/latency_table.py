"""Device latency tables: the versioned file of a device's part timings, and predictions.

A table holds, per runtime and batch size, the timings of the parts a study's candidates are
made of (:mod:`evaluators.latency_parts`; measured by :func:`evaluators.profile_parts` in
interleaved rounds), a fitted per-call overhead, and the run's noise floor. A stitch is
predicted as ``scale * (prefix + stitch + suffix) + overhead``, a bare anchor as its own
measurement (:meth:`LatencyTable.predict`).

**Uncertainty** (:meth:`LatencyTable.estimate`): each prediction carries a standard
deviation. A bare anchor's is its own timing's (the inter-quartile range over the rounds /
1.349). A stitch's combines its parts' (``scale`` times their sum: a slow moment slows all
parts of one run alike, so they add, not in quadrature) with the fit's leave-one-out
relative error times the prediction, in quadrature. :meth:`LatencyTable.quantile` reads the
prediction as a normal distribution: the 0.5 quantile is the prediction, 0.9 is
``prediction + 1.28 std``.

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.latency_parts import anchor_key, part_keys, prefix_key
from space import Candidate, InputError

#: The format tag of a latency table; bumped when the layout changes (version 1 timed the
#: stem, each block and the head alone; version 2 timed prefixes, suffixes and anchors one
#: after another; version 3 times them in interleaved rounds, with spreads and the noise
#: floor).
TABLE_FORMAT = "stitchsearch-latency-table/3"


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
            "scale": float, "overhead_ms": float, "fit": {...}, "noise": {...}}``.
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

    def predict(self, candidate: Candidate, *, batch: int = 1, runtime: str | None = None) -> float:
        """Predicted latency of one call at ``batch`` (the median of :meth:`estimate`).

        A bare anchor: its own end-to-end measurement. A stitch: the sum of its front
        anchor's prefix, the stitching layer and its back anchor's suffix, times the fitted
        scale, plus the fitted per-call overhead (never below 0).

        Raises:
            KeyError: A part or anchor the table lacks (:meth:`missing_parts` says which).
        """
        return self.estimate(candidate, batch=batch, runtime=runtime)[0]

    def estimate(
        self, candidate: Candidate, *, batch: int = 1, runtime: str | None = None
    ) -> tuple[float, float]:
        """``(predicted ms, its standard deviation in ms)`` (see the module docstring).

        Raises:
            KeyError: A part or anchor the table lacks.
        """
        entry = self._entry(runtime, batch)
        parts = entry["parts"]
        keys = part_keys(candidate, self.anchors)
        total = sum(parts[k]["median_ms"] for k in keys)
        spread = sum(parts[k].get("std_ms", 0.0) for k in keys)
        if candidate.is_anchor:
            return total, spread
        scale = entry.get("scale", 1.0)
        value = max(scale * total + entry["overhead_ms"], 0.0)
        fit = entry["fit"].get("residual_pct", 0.0) / 100 * value
        return value, math.hypot(scale * spread, fit)

    def quantile(
        self, candidate: Candidate, q: float, *, batch: int = 1, runtime: str | None = None
    ) -> float:
        """The ``q`` quantile of the predicted latency (normal; 0.5 is :meth:`predict`).

        Raises:
            ValueError: ``q`` outside (0, 1).
        """
        if not 0 < q < 1:
            raise ValueError(f"a latency quantile must be between 0 and 1, got {q!r}")
        value, std = self.estimate(candidate, batch=batch, runtime=runtime)
        return max(value + statistics.NormalDist().inv_cdf(q) * std, 0.0)

    @property
    def noise(self) -> dict[str, Any]:
        """The noise floor of the predicting runtime at batch 1."""
        return self._entry(None, 1)["noise"]

    def timing(self) -> dict[str, Any]:
        """What the parts were timed under: ``device_type``, ``threads``, ``affinity``."""
        return {k: self.settings.get(k) for k in ("device_type", "threads", "affinity")}

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
                    for name in ("median_ms", "std_ms"):
                        value = timing.get(name) if isinstance(timing, dict) else None
                        if not _is_number(value) or value < 0:
                            raise LatencyTableError(
                                f"must be a number >= 0, got {value!r}",
                                f"{where}.parts.{key}.{name}",
                            )
                _check_fit_and_noise(entry, where)
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


def _check_fit_and_noise(entry: dict[str, Any], where: str) -> None:
    """The fit's residual and the noise floor of one runtime and batch size."""
    fit = entry.get("fit")
    residual = fit.get("residual_pct") if isinstance(fit, dict) else None
    if not _is_number(residual) or residual < 0:
        raise LatencyTableError(
            f"must be a number >= 0, got {residual!r}", f"{where}.fit.residual_pct"
        )
    noise = entry.get("noise")
    if not isinstance(noise, dict):
        raise LatencyTableError(
            "missing: the noise floor this run measured (profile the device again)",
            f"{where}.noise",
        )
    for key in ("floor_pct", "halves_median_diff_pct"):
        value = noise.get(key)
        if not _is_number(value) or value < 0:
            raise LatencyTableError(f"must be a number >= 0, got {value!r}", f"{where}.noise.{key}")
    share = noise.get("halves_within_10pct")
    if not _is_number(share) or not 0 <= share <= 1:
        raise LatencyTableError(
            f"must be a share between 0 and 1, got {share!r}",
            f"{where}.noise.halves_within_10pct",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
