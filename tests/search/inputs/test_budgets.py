"""Tests for the budget table: parsing, validation messages, fit semantics, file names."""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path
from statistics import NormalDist

import pytest

from search.core import (
    DeviceBudget,
    budget_metrics,
    constraint_value,
    device_latency,
    device_latency_text,
    fitting_devices,
    format_quantity,
    safe_filename,
)
from search.inputs import BudgetError, load_budget_table
from space import Candidate

REPO = Path(__file__).resolve().parents[3]


def write(tmp_path: Path, text: str, name: str = "devices.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Parsing a valid table


def test_valid_table_with_suffixes_empty_cells_bom_and_whitespace(tmp_path):
    path = write(
        tmp_path,
        "\ufeffdevice , MAX_MACS,max_params ,max_latency_ms,max_memory_mb\r\n"
        "cortex-m7-mcu, 2.5M ,400k,,2\r\n"
        '"jetson, nano",2500000,2.5e6, 1.5 ,\r\n'
        "edge-server,1G,,,\r\n"
        "  big  ,,3K,0.25,1e3\r\n"
        "\r\n\r\n",
    )
    budgets = load_budget_table(path)
    assert budgets == [
        DeviceBudget("cortex-m7-mcu", 2.5e6, 4e5, None, 2.0, line=2),
        DeviceBudget("jetson, nano", 2.5e6, 2.5e6, 1.5, None, line=3),
        DeviceBudget("edge-server", 1e9, None, None, None, line=4),
        DeviceBudget("big", None, 3e3, 0.25, 1e3, line=5),
    ]
    assert budgets[0].limits() == {"macs": 2.5e6, "params": 4e5, "memory_mb": 2.0}
    assert budgets[2].limits() == {"macs": 1e9}
    assert budgets[1].to_dict() == {
        "device": "jetson, nano",
        "max_macs": 2.5e6,
        "max_params": 2.5e6,
        "max_latency_ms": 1.5,
        "max_memory_mb": None,
    }


def test_subset_of_columns_and_a_device_without_limits(tmp_path):
    budgets = load_budget_table(write(tmp_path, "max_params,device\n1M,a\n,b\n"))
    assert budgets == [DeviceBudget("a", max_params=1e6, line=2), DeviceBudget("b", line=3)]
    assert budgets[1].limits() == {}
    assert budgets[1].fits({})


def test_shipped_devices_csv_parses():
    budgets = load_budget_table(REPO / "devices.csv")
    names = [b.device for b in budgets]
    assert len(names) >= 4 and len(set(names)) == len(names)
    # Every budget column is used somewhere, and some cells are left empty.
    used = {m for b in budgets for m in b.limits()}
    assert used == {"macs", "params", "latency_ms", "memory_mb"}
    assert any(len(b.limits()) < 4 for b in budgets)
    # The smallest anchor (resnet-s: ~1.95M MACs, 0.32M params) fits the smallest device,
    # the largest (resnet-l: ~9.3M MACs, 2.8M params) does not, but fits some device.
    smallest = min(budgets, key=lambda b: b.max_macs or math.inf)
    resnet_s = {"macs": 1.95e6, "params": 0.32e6, "latency_ms": 0.5, "memory_mb": 1.5}
    resnet_l = {"macs": 9.3e6, "params": 2.8e6, "latency_ms": 2.0, "memory_mb": 12.0}
    assert smallest.fits(resnet_s)
    assert not smallest.fits(resnet_l)
    assert fitting_devices(budgets, resnet_l)


# ---------------------------------------------------------------------------------------------
# Invalid tables: every error is one line naming file, line and column, echoing the value.

HEADER = "device,max_macs,max_latency_ms\n"
QHEADER = "device,max_latency_ms,latency_table,latency_quantile\n"

# (id, file text, line, column, value echoed in the message, words in the message)
BAD_TABLES = [
    ("empty-file", "", None, None, None, "empty"),
    ("whitespace-only", "\n  \n", None, None, None, "empty"),
    ("header-only", HEADER, 1, None, None, "no devices"),
    ("header-only-blank-lines", HEADER + "\n\n", 1, None, None, "no devices"),
    ("unknown-column", "device,max_mac\na,1\n", 1, "max_mac", None, "did you mean 'max_macs'"),
    ("unknown-column-far", "device,colour\na,red\n", 1, "colour", None, "known columns"),
    ("missing-device-column", "name,max_macs\na,1\n", 1, None, "name,max_macs", "device"),
    ("semicolons", "device;max_macs\na;1\n", 1, None, "device;max_macs", "commas"),
    ("no-budget-column", "device\na\n", 1, None, "device", "at least one of"),
    ("duplicate-column", "device,max_macs,max_macs\na,1,2\n", 1, "max_macs", None, "twice"),
    ("empty-header-cell", "device,max_macs,\na,1,\n", 1, None, "device,max_macs,", "empty"),
    ("too-many-cells", HEADER + "a,1,2\nb,1,2,3\n", 3, None, "b,1,2,3", "4 cells"),
    ("too-few-cells", HEADER + "a,1\n", 2, None, "a,1", "2 cells"),
    ("negative", HEADER + "a,-5M,\n", 2, "max_macs", "-5M", "greater than zero"),
    ("zero", HEADER + "a,1M,0\n", 2, "max_latency_ms", "0", "greater than zero"),
    ("non-numeric", HEADER + "a,lots,\n", 2, "max_macs", "lots", "not a number"),
    ("unknown-suffix", HEADER + "a,2.5B,\n", 2, "max_macs", "2.5B", "K/M/G"),
    ("suffix-only", HEADER + "a,M,\n", 2, "max_macs", "M", "not a number"),
    ("unit-on-latency", HEADER + "a,,5ms\n", 2, "max_latency_ms", "5ms", "milliseconds"),
    ("suffix-on-latency", HEADER + "a,,5k\n", 2, "max_latency_ms", "5k", "not a number"),
    ("nan", HEADER + "a,nan,\n", 2, "max_macs", "nan", "finite"),
    ("inf", HEADER + "a,,inf\n", 2, "max_latency_ms", "inf", "finite"),
    ("inf-suffix", HEADER + "a,1e308G,\n", 2, "max_macs", "1e308G", "finite"),
    ("duplicate-device", HEADER + "a,1,\nb,2,\n a ,3,\n", 4, "device", "a", "line 2"),
    ("empty-device", HEADER + "a,1,\n  ,2,\n", 3, "device", "", "empty"),
    ("control-in-device", HEADER + '"a\nb",1,\n', 2, "device", "a\\nb", "control"),
    ("bad-quotes", HEADER + 'a,"1,\n', 2, None, None, "malformed"),
    # latency_quantile: a probability in (0, 1), and only with a latency table.
    *[
        (f"quantile-{q}", QHEADER + f"a,3,t.json,{q}\n", 2, "latency_quantile", q, words)
        for q, words in (
            ("1", "between 0 and 1"),
            ("0", "between 0 and 1"),
            ("1.5", "between 0 and 1"),
            ("-0.1", "between 0 and 1"),
            ("high", "not a number"),
            ("nan", "between 0 and 1"),
        )
    ],
    ("quantile-no-table", QHEADER + "a,3,,0.9\n", 2, "latency_quantile", "0.9", "no latency_table"),
]


@pytest.mark.parametrize(
    ("text", "line", "column", "value", "words"),
    [case[1:] for case in BAD_TABLES],
    ids=[case[0] for case in BAD_TABLES],
)
def test_bad_tables_raise_one_line_errors(tmp_path, text, line, column, value, words):
    path = write(tmp_path, text)
    with pytest.raises(BudgetError) as info:
        load_budget_table(path)
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert isinstance(err, ValueError)
    assert err.path == path
    assert err.line == line
    assert err.column == column
    assert message.startswith(f"{path}:{line}: " if line is not None else f"{path}: ")
    if column is not None:
        assert f"column '{column}'" in message
    if value is not None:
        assert f"(got '{value}')" in message
    assert words in message
    assert err.fix  # every message says how to fix it


def test_bom_in_bad_file_is_still_reported_at_the_right_line(tmp_path):
    path = write(tmp_path, "\ufeff" + HEADER + "a,1,\nb,x,\n")
    with pytest.raises(BudgetError, match=r":3: column 'max_macs': not a number \(got 'x'\)"):
        load_budget_table(path)


def test_line_numbers_count_blank_lines(tmp_path):
    path = write(tmp_path, "\n" + HEADER + "\na,1,\n\n\nb,-1,\n")
    with pytest.raises(BudgetError) as info:
        load_budget_table(path)
    assert info.value.line == 7


def test_missing_file(tmp_path):
    path = tmp_path / "nope.csv"
    with pytest.raises(BudgetError, match="no such file") as info:
        load_budget_table(path)
    assert str(info.value).startswith(f"{path}: ")
    assert info.value.line is None


def test_directory(tmp_path):
    with pytest.raises(BudgetError, match="is a directory") as info:
        load_budget_table(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: ")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(HEADER.encode() + "a,1,\ncafé,2,\n".encode("latin-1"))
    with pytest.raises(BudgetError) as info:
        load_budget_table(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: not valid UTF-8 (got '\\xe9')")
    assert "UTF-8" in info.value.fix
    assert "\n" not in message


def test_error_pickles_with_its_attributes(tmp_path):
    err = BudgetError("bad", tmp_path / "x.csv", 3, "max_macs", "-1", "fix it")
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.line, back.column, back.value, back.fix) == (
        err.path,
        3,
        "max_macs",
        "-1",
        "fix it",
    )
    assert (
        str(back)
        == str(err)
        == f"{tmp_path / 'x.csv'}:3: column 'max_macs': bad (got '-1'); fix it"
    )


@pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1M"])
def test_device_budget_rejects_bad_limits_in_code(value):
    with pytest.raises(ValueError, match="max_params"):
        DeviceBudget("x", max_params=value)


def test_device_budget_rejects_empty_name():
    with pytest.raises(ValueError, match="device"):
        DeviceBudget("  ")


# ---------------------------------------------------------------------------------------------
# Fit semantics

MCU = DeviceBudget("mcu", max_macs=2e6, max_params=4e5)
PI = DeviceBudget("pi", max_macs=5e6, max_latency_ms=2.0)
FREE = DeviceBudget("free")


def test_fits_violations_headroom():
    m = {"macs": 1.5e6, "params": 5e5, "latency_ms": 1.0}
    assert not MCU.fits(m)
    assert MCU.violations(m) == pytest.approx({"macs": -0.25, "params": 0.25})
    assert MCU.headroom(m) == pytest.approx({"macs": 0.25, "params": -0.25})
    assert PI.fits(m)
    assert PI.violations(m) == pytest.approx({"macs": -0.7, "latency_ms": -0.5})
    assert PI.headroom(m) == pytest.approx({"macs": 0.7, "latency_ms": 0.5})
    # Exactly at the limit fits.
    assert MCU.fits({"macs": 2e6, "params": 4e5})
    assert MCU.violations({"macs": 2e6, "params": 4e5}) == {"macs": 0.0, "params": 0.0}


@pytest.mark.parametrize("missing", [{}, {"latency_ms": None}, {"latency_ms": math.nan}])
def test_a_set_limit_with_a_missing_metric_does_not_fit(missing):
    m = {"macs": 1e6, **missing}
    assert not PI.fits(m)
    assert PI.violations(m)["latency_ms"] == math.inf
    assert PI.headroom(m)["latency_ms"] == -math.inf
    # Metrics nobody limits may be missing.
    assert MCU.fits({"macs": 1e6, "params": 1e5, **missing})


def test_constraint_value_and_fitting_devices():
    budgets = [MCU, PI]
    fits_pi_only = {"macs": 3e6, "params": 1e6, "latency_ms": 1.0}
    assert constraint_value(budgets, fits_pi_only) == pytest.approx(-0.4)  # pi's worst: macs
    assert fitting_devices(budgets, fits_pi_only) == ["pi"]
    fits_both = {"macs": 1e6, "params": 1e5, "latency_ms": 1.0}
    assert constraint_value(budgets, fits_both) == pytest.approx(-0.5)
    assert fitting_devices(budgets, fits_both) == ["mcu", "pi"]
    fits_none = {"macs": 6e6, "params": 1e5, "latency_ms": 3.0}
    # mcu's worst violation is 2.0 (macs), pi's 0.5 (latency): the nearest device counts.
    assert constraint_value(budgets, fits_none) == pytest.approx(0.5)
    assert fitting_devices(budgets, fits_none) == []
    assert constraint_value(budgets, {}) == math.inf
    # A device without limits fits everything.
    assert constraint_value([*budgets, FREE], fits_none) == -1.0
    assert fitting_devices([*budgets, FREE], fits_none) == ["free"]
    with pytest.raises(ValueError, match="at least one"):
        constraint_value([], fits_both)


def test_constraint_value_sign_matches_fitting_devices():
    budgets = [MCU, PI]
    for macs in (1e6, 2e6, 2.1e6, 5e6, 5.1e6):
        for params in (1e5, 4e5, 5e5):
            for latency in (None, 1.0, 2.0, 2.5):
                m = {"macs": macs, "params": params, "latency_ms": latency}
                assert (constraint_value(budgets, m) <= 0) == bool(fitting_devices(budgets, m))


# ---------------------------------------------------------------------------------------------
# File names

NASTY_NAMES = [
    "jetson-nano",
    "Jetson-Nano",
    "jetson nano",
    "jetson_nano",
    'quote"d',
    "it's",
    "café",
    "cafe\u0301",  # the same, decomposed
    "设备一",
    "设备二",
    "Ｆｕｌｌｗｉｄｔｈ",
    "a/b",
    "a\\b",
    "../../etc/passwd",
    "..\\..\\windows",
    "/abs/path",
    "C:\\x",
    "..",
    ".",
    "...",
    "",
    " ",
    "_",
    ".hidden",
    "x" * 300,
    "x" * 299 + "y",
    "nul\x00byte",
    "CON",
    "com1.txt",
    "<script>alert(1)</script>",
    "device",
]


def test_safe_filename_stays_in_the_folder_and_is_distinct(tmp_path):
    taken: set[str] = set()
    stems = [safe_filename(n, taken) for n in NASTY_NAMES]
    for name, stem in zip(NASTY_NAMES, stems, strict=True):
        assert stem, name
        assert stem not in (".", "..")
        assert "/" not in stem and "\\" not in stem and "\x00" not in stem, name
        assert len(stem) <= 80, name
        assert not stem.startswith((".", "_")), name
        assert (tmp_path / stem).resolve().parent == tmp_path.resolve(), name
        assert (tmp_path / f"{stem}.json").resolve().parent == tmp_path.resolve(), name
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stem), name
    # Distinct names give distinct files, even on case-insensitive file systems.
    assert len({s.lower() for s in stems}) == len(NASTY_NAMES)
    assert taken == set(stems)
    for stem in stems:
        (tmp_path / f"{stem}.json").write_text("{}")
    assert len(list(tmp_path.iterdir())) == len(NASTY_NAMES)


def test_safe_filename_without_taken_is_still_distinct_for_distinct_names():
    names = [n for n in NASTY_NAMES if n != "Jetson-Nano"]  # case-only twins need `taken`
    stems = [safe_filename(n) for n in names]
    assert len(set(stems)) == len(names)


def test_safe_filename_keeps_safe_names_and_marks_changed_ones():
    assert safe_filename("jetson-nano") == "jetson-nano"
    assert safe_filename("Pi_4.v2") == "Pi_4.v2"
    changed = safe_filename("jetson nano")
    assert changed.startswith("jetson_nano-") and len(changed) == len("jetson_nano-") + 8
    assert safe_filename("jetson nano") == changed  # deterministic
    assert safe_filename("").startswith("device-")
    assert safe_filename("..").startswith("device-")
    assert safe_filename("café").startswith("cafe-")
    assert safe_filename("CON").lower() != "con"


def test_safe_filename_deduplicates_case_insensitively():
    taken = {"Jetson-Nano"}
    assert safe_filename("jetson-nano", taken) == "jetson-nano-2"
    assert safe_filename("JETSON-NANO", taken) == "JETSON-NANO-3"
    assert taken == {"Jetson-Nano", "jetson-nano-2", "JETSON-NANO-3"}


# ---------------------------------------------------------------------------------------------
# Formatting


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (2_500_000, "2.50M"),
        (1.2e9, "1.20G"),
        (950, "950"),
        (0, "0"),
        (12.5, "12.50"),
        (1000, "1.00K"),
        (400_000, "400.00K"),
        (999_999, "1.00M"),
        (3e12, "3.00T"),
    ],
)
def test_format_quantity(value, text):
    assert format_quantity(value) == text


def test_a_latency_quantile_is_read_and_checks_the_tables_upper_estimate(tmp_path):
    path = write(tmp_path, QHEADER + "pi,3,t.json,0.9\njetson,3,t.json,\n")
    pi, jetson = load_budget_table(path)
    assert pi.latency_quantile == 0.9 and jetson.latency_quantile is None
    assert pi.latency_table == tmp_path / "t.json"

    class Table:  # a table predicting 2.5 ms +- 0.5 for every candidate
        def estimate(self, candidate):
            return 2.5, 0.5

        def predict(self, candidate):
            return 2.5

        def quantile(self, candidate, q):
            return 2.5 + NormalDist().inv_cdf(q) * 0.5

    pi = dataclasses.replace(pi, table=Table())
    jetson = dataclasses.replace(jetson, table=Table())
    attrs = {"config": Candidate.anchor("a").to_dict(), "latency_ms": 9.0}
    # The median (2.5 ms) fits 3 ms; the 0.9 quantile (2.5 + 1.28 * 0.5 = 3.14 ms) does not.
    assert device_latency(attrs, jetson) == 2.5 and jetson.fits(budget_metrics(attrs, jetson))
    assert device_latency(attrs, pi) == pytest.approx(3.1408, abs=1e-4)
    assert not pi.fits(budget_metrics(attrs, pi))
    assert device_latency_text(attrs, jetson) == "2.50 ms ± 0.50 (table)"
    assert device_latency_text(attrs, pi) == "2.50 ms ± 0.50 (table; q0.9 3.14 ms)"
    host = DeviceBudget("host", max_latency_ms=3)
    assert device_latency_text(attrs, host) == "9.00 ms (host-measured)"
    for bad in (0, 1, 1.2, True):
        with pytest.raises(ValueError, match="latency_quantile must be between 0 and 1"):
            DeviceBudget("d", max_latency_ms=3, latency_table=Path("t.json"), latency_quantile=bad)
    with pytest.raises(ValueError, match="needs a latency_table"):
        DeviceBudget("d", max_latency_ms=3, latency_quantile=0.9)
