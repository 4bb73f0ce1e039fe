"""Each benchmark script runs on a tiny study and writes its JSON and markdown section.

No timing is asserted: only that the scripts run and their outputs hold what they promise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import (
    bench_claims,
    bench_ground_truth,
    bench_pruning,
    bench_rung1,
    bench_scaling,
    bench_search,
    bench_signals,
    bench_trial_cost,
    run_all,
)
from benchmarks.lib import (
    GroundTruth,
    Hypervolume,
    kendall_tau,
    pareto_mask,
    rule_spec,
    spearman,
    update_markdown,
)
from search.inputs import load_study

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
STUDY = DATA / "tiny_bench.yaml"
DEVICES = DATA / "devices.csv"
N_CANDIDATES = 2 + 4 * 2 * 2  # two anchors, 4 x 2 stitch points in each order


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A complete ground truth of the tiny study, built in two sessions (resumed)."""
    tmp = tmp_path_factory.mktemp("bench")
    gt, md = tmp / "gt.json", tmp / "BENCH.md"
    common = ["--study", str(STUDY), "--budget-table", str(DEVICES), "--out", str(gt)]
    common += ["--md", str(md), "--processes", "1"]
    assert bench_ground_truth.main([*common, "--limit", "5"]) == 0
    partial = json.loads(gt.read_text())
    assert len(partial["entries"]) == 5 and "summary" not in partial
    assert bench_ground_truth.main(common) == 0
    return tmp, gt, md


def _args(tmp: Path, gt: Path, md: Path, name: str) -> list[str]:
    return ["--ground-truth", str(gt), "--md", str(md), "--out", str(tmp / f"{name}.json")]


def test_ground_truth_is_complete_and_cached(built) -> None:
    _, gt_path, md = built
    raw = json.loads(gt_path.read_text())
    s = raw["summary"]
    assert s["candidates"] == N_CANDIDATES == len(raw["entries"])
    assert s["front_size"] >= 1 and s["hypervolume"] > 0
    assert set(raw["cka"]) == {
        "resnet18|vit_tiny_patch16_224",
        "vit_tiny_patch16_224|resnet18",
    }
    gt = GroundTruth.load(gt_path)
    assert len(gt.records) == N_CANDIDATES
    assert all(r["kind"] == "anchor" or r["cka"] is not None for r in gt.records.values())
    # A second session finds everything cached and evaluates nothing.
    before = {k: v["seconds"] for k, v in raw["entries"].items()}
    args = ["--study", str(STUDY), "--budget-table", str(DEVICES), "--out", str(gt_path)]
    assert bench_ground_truth.main([*args, "--no-md", "--processes", "1"]) == 0
    after = json.loads(gt_path.read_text())["entries"]
    assert {k: v["seconds"] for k, v in after.items()} == before
    # ... and leaves the table untouched: it keeps the date and machine of its build.
    assert json.loads(gt_path.read_text())["machine"] == raw["machine"]
    # The section names it: when, where and from which commit the entries were evaluated.
    assert f"| table built | {raw['machine']['date']} on {raw['machine']['cpu']}, commit" in (
        md.read_text()
    )
    assert "## 1. Ground truth" in md.read_text()


def test_search_replay_exhausts_the_space_without_repeats(built) -> None:
    tmp, gt, md = built
    argv = _args(tmp, gt, md, "search")
    argv += ["--study", str(STUDY), "--budget-table", str(DEVICES), "--seeds", "2"]
    argv += ["--budgets", "0.2,1.0", "--processes", "1", "--concurrency", "2"]
    argv += ["--samplers", "default,nsga2,random,uniform,tpe-independent,default+nearest"]
    assert bench_search.main(argv) == 0
    res = json.loads((tmp / "search.json").read_text())
    assert res["budgets"] == [round(0.2 * N_CANDIDATES), N_CANDIDATES]
    for v in res["variants"]:
        whole = res["summary"][v]["per_budget"]["1.0"]
        assert whole["hv_fraction"] == pytest.approx([1.0, 1.0]), v
        assert whole["front_found"] == [res["front_size"]] * 2
        part = res["summary"][v]["per_budget"]["0.2"]["hv_fraction"]
        assert all(0.0 <= x <= 1.0 + 1e-9 for x in part)
    # The study's own rule (the tiny study sets none, so the default kl depth 3) prunes
    # before every run; the runs exhaust what it leaves.
    assert res["study_rule"] == rule_spec(load_study(STUDY))
    assert res["study_rule"]["signal"] == "kl" and res["study_rule"]["depth"] == 3
    pruned = {r["pruned"] for r in res["runs"]}
    assert len(pruned) == 1 and min(pruned) > 0
    for r in res["runs"]:
        assert len(r["order"]) == len(set(r["order"])) == N_CANDIDATES - r["pruned"]
        assert r["order"][:2] == ["anchor|resnet18", "anchor|vit_tiny_patch16_224"]
    text = md.read_text()
    assert "## 2. Search efficiency" in text
    hv = np.mean(res["summary"]["default"]["per_budget"]["0.2"]["hv_fraction"])
    assert ("so it **meets** it" in text) == (hv >= 0.98)
    assert "- Best at 20% (4):" in text and "- Best at 100% (18):" in text
    # The draws quoted are the filtered sampler's own setting, read from the runs.
    from search.strategy import FilteredSampler

    tries = FilteredSampler.__init__.__kwdefaults__["max_tries"]
    assert res["summary"]["default"]["max_tries"] == [tries]
    assert f"{tries} draws all explored or pruned" in text


def test_pruning_sweep(built) -> None:
    tmp, gt, md = built
    argv = _args(tmp, gt, md, "pruning")
    argv += ["--study", str(STUDY), "--budget-table", str(DEVICES), "--search-seeds", "1"]
    argv += ["--processes", "1", "--compare", "k1,t0.5k2"]
    assert bench_pruning.main(argv) == 0
    res = json.loads((tmp / "pruning.json").read_text())
    assert res["stitches"] == N_CANDIDATES - 2
    assert "chosen" in res and {"all", "per_pair_mean"} <= set(res["correlation"])
    for r in res["rules"]:
        assert 0 <= r["stitch_hv_fraction"] <= 1 + 1e-9 and r["front_lost"] >= 0
    search = res["search"]
    assert search["budget"] == 8  # the tiny study's trials
    rules = [(v["rule"]["threshold"], v["rule"]["top_k"]) for v in search["resolved"].values()]
    assert {(0.0, None), (0.0, 1), (0.5, 2)} <= set(rules)
    removed = [r["removed"] for r in res["rules"] if r["top_k"] is None]
    assert removed == sorted(removed)  # a higher threshold never removes less
    assert all(0 <= r["hv_fraction"] <= 1 + 1e-9 for r in res["rules"])
    rec = res["recommended"]
    assert (rec["threshold"], rec["top_k"]) in set(rules)
    assert "**Recommended rule:" in md.read_text()
    assert "## 3. CKA pruning" in md.read_text()


def test_claims(built) -> None:
    tmp, gt, md = built
    argv = _args(tmp, gt, md, "claims")
    argv += ["--study", str(STUDY), "--budget-table", str(DEVICES)]
    argv += ["--sample", "2", "--ft-steps", "3", "--threads", "1", "--ft-calibration", "48"]
    assert bench_claims.main(argv) == 0
    res = json.loads((tmp / "claims.json").read_text())
    assert {"a", "b", "c", "d"} <= set(res)
    assert res["a"]["zoo"]["front_size"] >= 1
    assert res["d"]["sample"] == 2
    for s in ("random", "ls", "ls_ft", "random_ft"):
        assert 0 <= res["d"][f"{s}_mean"] <= 100
    assert "**(d) Initialisation" in md.read_text()
    front = res["d_front"]
    assert front["calibration_sizes"] == [32, 48]
    gt_front = GroundTruth.load(gt).front_keys(GroundTruth.load(gt).stitch_keys())
    assert sorted(r["key"] for r in front["rows"]) == sorted(gt_front)
    for r in front["rows"]:
        # least squares on the study's own calibration reproduces the ground truth
        assert r["cal32_steps0"] == pytest.approx(r["ground_truth"], abs=1e-6)
        assert 0 <= r["cal48_steps3"] <= 100
    for col in front["summary"].values():
        assert 0 <= col["on_true_front"] <= len(front["rows"])
    assert "**(d) on the best stitches." in md.read_text()


def test_trial_cost_breakdown(tmp_path) -> None:
    out, md = tmp_path / "tc.json", tmp_path / "B.md"
    argv = ["--study", str(STUDY), "--budget-table", str(DEVICES), "--out", str(out)]
    argv += ["--md", str(md), "--sample", "2", "--skip-ray"]
    assert bench_trial_cost.main(argv) == 0
    res = json.loads(out.read_text())
    assert len(res["breakdown"]) == 2 + 2
    for k in (*bench_trial_cost.STEPS, "total", "pure_forward", "evaluate_candidate"):
        assert res["stitch_mean"][k] >= 0
    assert res["stitch_mean"]["total"] > 0 and "search_run" not in res


def _run_module(module: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_trial_cost_with_ray(tmp_path) -> None:
    out = tmp_path / "tc.json"
    _run_module(
        "benchmarks.bench_trial_cost",
        *("--study", str(STUDY), "--budget-table", str(DEVICES), "--out", str(out)),
        *("--md", str(tmp_path / "B.md"), "--sample", "1", "--trials", "4", "--noop-trials", "3"),
    )
    res = json.loads(out.read_text())
    assert res["search_run"]["evaluated"] == 4 and res["search_run"]["workers"] == 1
    assert res["noop_ray"]["per_trial_seconds"] > 0


@pytest.mark.slow
def test_scaling(tmp_path) -> None:
    out = tmp_path / "scaling.json"
    _run_module(
        "benchmarks.bench_scaling",
        *("--study", str(STUDY), "--budget-table", str(DEVICES), "--out", str(out)),
        *("--md", str(tmp_path / "B.md"), "--trials", "4", "--repeats", "1"),
    )
    res = json.loads(out.read_text())
    assert [r["workers"] for r in res["runs"]] == [1, 2]
    assert all(r["evaluated"] == 4 for r in res["runs"])
    # The speed-up is the runs' throughput over the one-worker runs', each run's throughput
    # its evaluated trials over its tuning window.
    for r in res["runs"]:
        assert r["trials_per_minute"] == pytest.approx(60 * r["evaluated"] / r["window_seconds"])
    rate = {r["workers"]: r["trials_per_minute"] for r in res["runs"]}
    assert res["summary"]["2"]["speedup"] == pytest.approx(rate[2] / rate[1])
    assert res["summary"]["2"]["trials_per_minute"] == [rate[2]]


def test_scaling_summary_averages_repeats_and_divides_by_the_baseline() -> None:
    runs = [
        {"workers": 1, "trials_per_minute": 10.0, "wall": 6.0},
        {"workers": 1, "trials_per_minute": 14.0, "wall": 5.0},
        {"workers": 2, "trials_per_minute": 18.0, "wall": 4.0},
        {"workers": 2, "trials_per_minute": 30.0, "wall": 2.0},
        {"workers": 4, "trials_per_minute": 6.0, "wall": 9.0},
    ]
    columns = {"trials_per_minute": "trials_per_minute", "wall_seconds": "wall"}
    summary = bench_scaling.summarise(runs, [1, 2, 4], columns)
    assert summary["2"]["speedup"] == pytest.approx(24.0 / 12.0)  # mean over mean, not per run
    assert summary["4"]["speedup"] == pytest.approx(0.5)  # a slow-down stays visible
    assert summary["2"]["wall_seconds"] == [4.0, 2.0]
    # The baseline need not be one worker: the first count listed is.
    assert bench_scaling.summarise(runs, [2, 1], columns)["1"]["speedup"] == pytest.approx(0.5)


@pytest.mark.slow
def test_scaling_at_rung1_fine_tunes_the_same_stitches(tmp_path) -> None:
    out = tmp_path / "scaling_rung1.json"
    study = tmp_path / "study.yaml"
    study.write_text(
        STUDY.read_text() + "finetune: {enabled: true, train_images: 64, steps: 2, batch_size: 16, "
        "max_trials: 3, promote: {per_device: 2}}\n"
    )
    _run_module(
        "benchmarks.bench_scaling",
        *("--study", str(study), "--budget-table", str(DEVICES), "--out", str(out)),
        *("--md", str(tmp_path / "B.md"), "--trials", "4", "--repeats", "1", "--rung", "1"),
    )
    res = json.loads(out.read_text())
    assert res["rung"] == 1 and [r["workers"] for r in res["runs"]] == [1, 2]
    finetuned = [r["finetuned"] for r in res["runs"]]
    assert finetuned[0] >= 1 and finetuned[0] == finetuned[1]
    assert "5b. Worker scaling at rung 1" in (tmp_path / "B.md").read_text()


def test_run_all_builds_every_command() -> None:
    cmds = run_all.commands(
        argparse.Namespace(
            study=STUDY,
            budget_table=DEVICES,
            ground_truth=Path("gt.json"),
            md=Path("B.md"),
            only=None,
            rebuild_ground_truth=True,
        )
    )
    names = [n for n, _ in cmds]
    assert names == [
        "ground_truth",
        "pruning",
        "signals",
        "search",
        "trial_cost",
        "scaling",
        "scaling_rung1",
        "claims",
        "rung1",
        "latency_table",
        "real_pair",
        "real_trials",
    ]
    gt_cmd = dict(cmds)["ground_truth"]
    assert "--rebuild" in gt_cmd and "gt.json" in gt_cmd
    assert "--ground-truth" in dict(cmds)["search"]


def test_helpers(tmp_path) -> None:
    mask = pareto_mask([90, 80, 85, 70], [10, 5, 12, 5])
    assert mask.tolist() == [True, True, False, False]
    hv = Hypervolume(acc_best=90, acc_chance=10, macs_min=5, macs_max=10)
    assert hv([90], [5]) == pytest.approx(1.0 * 1.1)
    assert hv([10], [5]) == 0.0  # chance accuracy adds nothing
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    md = tmp_path / "B.md"
    info = {"date": "d", "cpu": "c", "cores": 2, "commit": "x"}
    update_markdown("pruning", "first", info, "cmd", md)
    update_markdown("pruning", "second", info, "cmd", md)
    text = md.read_text()
    assert "second" in text and "first" not in text and text.count("BEGIN pruning") == 1
    assert "(not run yet)" in text  # the other sections are placeholders


def test_rung1_table_and_promotion_replay(built) -> None:
    tmp, gt_path, md = built
    # The tiny study with a cheap rung 1 (same data and anchors as the rung-0 table).
    study = tmp / "tiny_rung1.yaml"
    study.write_text(
        STUDY.read_text()
        + "finetune:\n  enabled: true\n  train_images: 64\n  steps: 3\n  batch_size: 16\n"
        + "  promote: {per_device: 2, front: true}\n  max_trials: 3\n"
    )
    table, out = tmp / "r1_gt.json", tmp / "rung1.json"
    argv = ["--study", str(study), "--budget-table", str(DEVICES), "--ground-truth", str(gt_path)]
    argv += ["--rung1", str(table), "--out", str(out), "--md", str(md), "--processes", "1"]
    argv += ["--seeds", "2", "--holdout-seeds", "2", "--replay-processes", "1"]
    assert bench_rung1.main([*argv, "--build", "--limit", "3"]) == 0
    assert len(json.loads(table.read_text())["entries"]) == 3 and not out.exists()
    with pytest.raises(SystemExit, match="lacks 13 stitches"):
        bench_rung1.main(argv)  # analyses need the whole table
    assert bench_rung1.main([*argv, "--build"]) == 0
    raw = json.loads(table.read_text())
    stitches = N_CANDIDATES - 2
    assert len(raw["entries"]) == stitches  # anchors are not fine-tuned
    for rec in raw["entries"].values():
        assert rec["key"].startswith("stitch|") and rec["steps"] == 3
        assert rec["rung0_val_acc"] == GroundTruth.load(gt_path).records[rec["key"]]["val_acc"]
        assert rec["loss_first"] > 0 and rec["seconds"] > 0
    # Analyses alone read the cache and fine-tune nothing.
    before = {k: v["seconds"] for k, v in raw["entries"].items()}
    assert bench_rung1.main(argv) == 0
    assert {k: v["seconds"] for k, v in json.loads(table.read_text())["entries"].items()} == before
    res = json.loads(out.read_text())
    for rung in ("0", "1"):
        front = res["fronts"][rung]
        acc = [r["val_acc"] for r in front["rows"]]
        assert front["size"] >= 1 and pareto_mask(acc, [r["macs"] for r in front["rows"]]).all()
        lo, hi = res["anchor_span"]
        assert all(lo < r["macs"] < hi for r in front["rows"] if r["between"])
    assert -1 <= res["correlation"]["spearman"] <= 1
    seeds = res["replay"]["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    for s in seeds:
        assert s["rung0_evaluations"] == 8  # the tiny study's trials
        default = s["default"]["promoted"]
        assert len(default) == len(set(default)) <= 3
        assert all(k.startswith("stitch|") for k in default)
        assert s["random"]["rung1_evaluations"] == s["oracle"]["rung1_evaluations"] == len(default)
        assert s["none"]["rung1_evaluations"] == 0
        for rule in ("default", "random", "oracle", "none"):
            assert 0 < s[rule]["hv_fraction"] <= 1.5
            assert s[rule]["front_found"] <= len(res["replay"]["truth"]["front"])
    # Held-out seeds follow the first ones and are scored at every rung-0 budget of the grid.
    holdout = res["replay"]["holdout"]
    assert (holdout["first_seed"], holdout["seeds"]) == (2, 2)
    assert {g["seeds"] for g in holdout["grid"]} == {2}
    assert {g["trials"] for g in holdout["grid"]} == {g["trials"] for g in res["replay"]["grid"]}
    targets = res["targets"]
    assert targets["device_met"] is None  # no jetson-nano in the tiny budget table
    assert targets["between_met"] == (targets["between_on_front"] >= 4)
    text = md.read_text()
    assert "<!-- BEGIN rung1 -->" in text and "**The issue's targets**" in text
    # A table measured with other fine-tuning settings is refused, not silently reused.
    other = tmp / "tiny_rung1_other.yaml"
    other.write_text(study.read_text().replace("steps: 3", "steps: 4"))
    with pytest.raises(SystemExit, match="other fine-tuning settings"):
        bench_rung1.main(["--study", str(other), *argv[2:]])


def test_signals_prints_what_it_measured(built) -> None:
    tmp, gt_path, md = built
    table = tmp / "sig_r1.json"
    study = tmp / "tiny_sig_rung1.yaml"
    study.write_text(
        STUDY.read_text()
        + "finetune:\n  enabled: true\n  train_images: 64\n  steps: 2\n  batch_size: 16\n"
    )
    common = ["--study", str(study), "--budget-table", str(DEVICES), "--ground-truth", str(gt_path)]
    r1 = [*common, "--rung1", str(table), "--out", str(tmp / "r1.json"), "--no-md"]
    assert bench_rung1.main([*r1, "--processes", "1", "--seeds", "1", "--build"]) == 0
    argv = [*common, "--rung1", str(table), "--cache", str(tmp / "sigcache"), "--md", str(md)]
    argv += ["--out", str(tmp / "signals.json")]
    assert bench_signals.main(argv) == 0
    res = json.loads((tmp / "signals.json").read_text())
    gt = GroundTruth.load(gt_path)
    acc1 = bench_signals.rung1_accuracy(table, gt)
    pairs: dict = {}
    for k in gt.stitch_keys():
        r = gt.records[k]
        pairs.setdefault((r["front"], r["back"]), []).append(k)
    expected = np.nanmean(
        [
            spearman([gt.records[k]["val_acc"] for k in ks], [acc1[k] for k in ks])
            for ks in pairs.values()
        ]
    )
    assert res["correlation"]["_rung0_acc"]["rung1"] == pytest.approx(expected)
    assert res["signal_pairs"] == len(pairs) == 2 and res["signal_pairs_computed_now"] == 2
    text = md.read_text()
    section = text.split("<!-- BEGIN signals -->")[1].split("<!-- END signals -->")[0]
    assert f"ranks rung 1 at {expected:.3f} within pairs" in section
    assert f"all 2 ordered pairs in {res['signal_seconds']:.0f} s" in section
    assert f"computed in this run, {res['machine']['cpu']}, {res['machine']['cores']} cores" in (
        section
    )
    assert "12 ordered pairs" not in section and "shared cores" not in section
    assert res["heldout_pairs"]["folds"] == []  # one anchor pair: nothing to hold out
    # A second run reads every pair from the cache and says so.
    assert bench_signals.main(argv) == 0
    again = json.loads((tmp / "signals.json").read_text())
    assert again["signal_pairs_computed_now"] == 0
    assert again["signal_seconds"] == pytest.approx(res["signal_seconds"])
    assert "read from the cache" in md.read_text()


def test_gpu_runs_keep_their_own_section_and_results(tmp_path) -> None:
    from benchmarks.lib import RESULTS, device_out, device_section

    assert device_section("real_trials", "cpu") == "real_trials"
    assert device_section("real_trials", "cuda:0") == "real_trials_gpu"
    args = argparse.Namespace(out=RESULTS / "real_trials.json")
    device_out(args, "real_trials_gpu")
    assert args.out == RESULTS / "real_trials_gpu.json"
    args = argparse.Namespace(out=tmp_path / "mine.json")  # an explicit --out is kept
    device_out(args, "real_trials_gpu")
    assert args.out == tmp_path / "mine.json"
    md = tmp_path / "B.md"
    info = {"date": "d", "cpu": "c", "cores": 2, "commit": "x"}
    update_markdown("real_trials_gpu", "on the GPU", info, "cmd", md)
    update_markdown("real_trials", "on the CPU", info, "cmd", md)
    text = md.read_text()
    assert "on the GPU" in text and "on the CPU" in text


def test_run_all_records_step_times(tmp_path) -> None:
    times = tmp_path / "times.json"
    info = {"date": "d", "cpu": "c", "cores": 2, "commit": "abc", "load_avg_1min": 0.5}
    run_all.record_step(times, "search", ["py", "-m", "x"], 0, 12.34, info)
    run_all.record_step(times, "ground_truth", ["py", "-m", "y"], 0, 3.0, info)
    raw = json.loads(times.read_text())
    assert list(raw["steps"]) == ["ground_truth", "search"]  # in run order
    assert raw["steps"]["search"]["seconds"] == 12.3 and raw["total_seconds"] == 15.3


def test_a_stamp_names_repository_paths_relative_to_its_root() -> None:
    from benchmarks.lib import ROOT
    from benchmarks.lib.output import command_line

    argv = ["--md", str(ROOT / "BENCHMARKS.md"), "--study", "/elsewhere/s.yaml", "--quick"]
    assert command_line("benchmarks.bench_x", argv) == (
        "python -m benchmarks.bench_x --md BENCHMARKS.md --study /elsewhere/s.yaml --quick"
    )
