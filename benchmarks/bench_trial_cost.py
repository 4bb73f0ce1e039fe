"""Trial cost: where one candidate's time goes, and what Ray and the driver add per trial.

1. **Breakdown** (in this process, ``--threads`` torch threads: a trial's share when the
   study's workers split the cores): for a seeded sample of stitch points (``--sample``,
   spread over the ordered pairs) and every anchor, each step of an evaluation is timed as
   :func:`evaluators.evaluate_candidate` runs it: the CKA lookup and pruning decision, the
   CKA matrices amortised over the pair's stitch points, building the network, least
   squares, validation, the fvcore MACs count, parameter counts, latency and memory. The
   sum is compared with the pure forward passes over the images the trial touches
   (calibration images through both anchors up to the cuts, validation images through the
   stitched network), and with one end-to-end ``evaluate_candidate`` call.
2. **Ray and the driver**: one real ``python -m search.run`` with ``--workers 1`` and
   ``--trials`` trials: per trial, the Optuna duration (ask to tell) against the worker's own
   ``trial_seconds``, and the tuning window against the sum of the workers' time; plus a
   no-op trainable run under the same Tune settings (``reuse_actors=True``), which isolates
   Ray's own per-trial overhead.

    python -m benchmarks.bench_trial_cost
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import tune

from benchmarks.lib import (
    bench_parser,
    load_plan,
    machine_info,
    md_table,
    publish,
    pure_forward_seconds,
    sample_stitches,
    search_run,
    study_space,
    timed,
)
from evaluators import (
    accuracy,
    anchor_used_parameters,
    cka_matrix,
    count_macs,
    evaluate_candidate,
    fit_stitch,
    measure_latency,
    measure_memory,
    stitched_param_counts,
    stitched_parameters,
)
from search.core import PruningRule
from search.execution import trial_data
from search.inputs import Plan
from space import Candidate, build_stitched

STEPS = (
    "cka_lookup",
    "build",
    "least_squares",
    "validation",
    "macs",
    "params",
    "latency",
    "memory",
)


def breakdown(
    plan: Plan,
    candidate: Candidate,
    matrices: dict[tuple[str, str], np.ndarray],
    rule: PruningRule,
) -> dict[str, Any]:
    """Times each step of one evaluation (as ``evaluate_candidate`` runs them)."""
    data = trial_data(plan)
    study = plan.study
    t: dict[str, float] = {}
    if candidate.is_anchor:
        anchor = plan.anchors[candidate.front]
        net, size = anchor.model, anchor.input_size
        t["cka_lookup"] = t["build"] = t["least_squares"] = 0.0
        t["validation"], _ = timed(lambda: accuracy(net, data.validation, input_size=size))
        t["macs"], _ = timed(lambda: count_macs(net, size))
        t["params"], used = timed(lambda: anchor_used_parameters(anchor))

        def pure() -> None:
            with torch.inference_mode():
                for x, _ in data.validation:
                    net(x)

    else:
        front, back = plan.anchors[candidate.front], plan.anchors[candidate.back]
        k, j = candidate.front_block, candidate.back_block
        m = matrices[(candidate.front, candidate.back)]
        # The rule's lookup on a pair's matrix (the CKA matrix stands in for the signal's and,
        # for a depth rule, the MACs': the cost is the same lookup).
        t["cka_lookup"], _ = timed(lambda: (float(m[k, j]), rule.reason(candidate, m, m)))
        t["build"], net = timed(lambda: build_stitched(front, back, candidate.config))
        t["least_squares"], _ = timed(
            lambda: fit_stitch(net, data.calibration, steps=study.fit.steps, lr=study.fit.lr)
        )
        size = net.input_size
        t["validation"], _ = timed(lambda: accuracy(net, data.validation, input_size=size))
        t["macs"], _ = timed(lambda: count_macs(net, size))

        def params() -> list:
            stitched_param_counts(net)
            return stitched_parameters(net)

        t["params"], used = timed(params)

        def pure() -> None:
            pure_forward_seconds(net, front, back, candidate.config, data)

    t["latency"], _ = timed(lambda: measure_latency(net, size, batch_size=1, max_seconds=1.0))
    t["memory"], _ = timed(lambda: measure_memory(net, size, batch_size=1, parameters=used))
    pure_s, _ = timed(pure)
    e2e, _ = timed(
        lambda: evaluate_candidate(
            candidate.config,
            plan.anchors,
            data,
            fit_steps=study.fit.steps,
            fit_lr=study.fit.lr,
            latency_batch=study.latency_batch,
        )
    )
    return {
        "key": candidate.key,
        "kind": "anchor" if candidate.is_anchor else "stitch",
        **t,
        "total": sum(t.values()),
        "pure_forward": pure_s,
        "evaluate_candidate": e2e,
    }


def noop_ray_overhead(trials: int, cpus: int) -> dict[str, float]:
    """Seconds per trial of a no-op trainable under the searcher's Tune settings."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        _node_ip_address="127.0.0.1",
    )
    init = time.perf_counter() - t0

    def noop(config: dict) -> None:
        tune.report({"x": config["i"]})

    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tuner = tune.Tuner(
                tune.with_resources(noop, {"cpu": cpus}),
                param_space={"i": tune.grid_search(list(range(trials)))},
                tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
                run_config=tune.RunConfig(storage_path=tmp, verbose=0),
            )
            t1 = time.perf_counter()
            tuner.fit()
            fit = time.perf_counter() - t1
    finally:
        ray.shutdown()
    return {"ray_init_seconds": init, "trials": trials, "per_trial_seconds": fit / trials}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Breakdown, the real run and the no-op run."""
    torch.set_num_threads(args.threads)
    plan = load_plan(args.study, args.budget_table)
    space = study_space(plan)
    rule = plan.study.pruning_rule
    loader = plan.data.calibration.subset(plan.study.cka.images)
    matrices, pair_seconds = {}, {}
    for a, b in space.pairs():
        s, matrices[(a, b)] = timed(
            lambda a=a, b=b: cka_matrix(plan.anchors[a], plan.anchors[b], loader, use_cache=False)
        )
        pair_seconds[f"{a}|{b}"] = s
    n_stitches = len(space) - len(space.anchors())
    cka_amortised = sum(pair_seconds.values()) / n_stitches
    cands = space.anchors() + sample_stitches(space, args.sample, args.seed)
    rows = []
    for i, c in enumerate(cands, 1):
        rows.append(breakdown(plan, c, matrices, rule))
        print(f"\r  breakdown {i}/{len(cands)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    stitches = [r for r in rows if r["kind"] == "stitch"]
    out: dict[str, Any] = {
        "machine": machine_info(),
        "study": str(args.study),
        "threads": args.threads,
        "cka_pair_seconds": pair_seconds,
        "cka_amortised_per_stitch": cka_amortised,
        "breakdown": rows,
        "stitch_mean": {k: float(np.mean([r[k] for r in stitches])) for k in _columns()},
        "anchor_mean": {
            k: float(np.mean([r[k] for r in rows if r["kind"] == "anchor"])) for k in _columns()
        },
    }
    if not args.skip_ray:
        with tempfile.TemporaryDirectory() as tmp:
            out["search_run"] = search_run(
                args.study,
                args.budget_table,
                trials=args.trials,
                workers=1,
                seed=args.seed,
                out=Path(tmp) / "run",
                cka_cache=args.cka_cache,
            )
        out["noop_ray"] = noop_ray_overhead(args.noop_trials, cpus=max(1, args.threads))
    return out


def _columns() -> tuple[str, ...]:
    return (*STEPS, "total", "pure_forward", "evaluate_candidate")


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    s, a = res["stitch_mean"], res["anchor_mean"]
    n_st = sum(r["kind"] == "stitch" for r in res["breakdown"])
    n_an = len(res["breakdown"]) - n_st
    labels = {
        "cka_lookup": "CKA lookup + pruning decision",
        "build": "build the stitched network",
        "least_squares": "least-squares fit (calibration)",
        "validation": "validation accuracy",
        "macs": "MACs (fvcore)",
        "params": "parameter counts",
        "latency": "latency (batch 1)",
        "memory": "memory (batch 1)",
    }

    def ms(v: float) -> str:
        return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s"

    rows = [(labels[k], ms(s[k]), f"{s[k] / s['total']:.0%}", ms(a[k])) for k in STEPS]
    rows.append(("CKA matrices, amortised per stitch point", ms(res["cka_amortised_per_stitch"])))
    rows[-1] = (*rows[-1], "-", "-")
    rows.append(("**sum of the steps**", ms(s["total"]), "100%", ms(a["total"])))
    rows.append(
        (
            "one `evaluate_candidate` call",
            ms(s["evaluate_candidate"]),
            "",
            ms(a["evaluate_candidate"]),
        )
    )
    rows.append(
        ("pure forward of the images touched", ms(s["pure_forward"]), "", ms(a["pure_forward"]))
    )
    rows.append(
        (
            "**overhead: evaluate_candidate / pure forward**",
            f"{s['evaluate_candidate'] / s['pure_forward']:.1f}x",
            "",
            f"{a['evaluate_candidate'] / a['pure_forward']:.1f}x",
        )
    )
    lines = [
        f"Per candidate, {res['threads']} torch thread(s); mean over {n_st} stitch points "
        f"(spread over the ordered pairs) and the {n_an} anchors.",
        "",
        md_table(["step", "stitch point", "share", "anchor"], rows),
    ]
    if "search_run" in res:
        r = res["search_run"]
        noop = res["noop_ray"]
        lines += [
            "",
            f"Real run `python {r['command']}` ({r['evaluated']} evaluated trials, "
            f"{r['pruned']} pruned, {r['failed']} failed):",
            "",
            md_table(
                ["measurement", "value"],
                [
                    (
                        "command wall time (start-up, CKA, trials, selection, exports)",
                        f"{r['wall_seconds']:.1f} s",
                    ),
                    (
                        "tuning window (first trial start to last trial end)",
                        f"{r['window_seconds']:.1f} s",
                    ),
                    (
                        "worker time per trial (`trial_seconds`, mean)",
                        f"{r['worker_seconds_mean']:.2f} s",
                    ),
                    (
                        "driver + Ray overhead per trial: (window - sum of worker time) / trials",
                        f"{r['slot_overhead_per_trial']:.2f} s",
                    ),
                    (
                        "of which inside the Optuna trial (ask to tell, minus worker time)",
                        f"{r['duration_minus_worker_mean']:.2f} s",
                    ),
                    (
                        f"Ray alone: no-op trainable, {noop['trials']} trials, reuse_actors",
                        f"{noop['per_trial_seconds']:.3f} s per trial",
                    ),
                    ("`ray.init` of a local cluster", f"{noop['ray_init_seconds']:.1f} s"),
                    ("trials per minute", f"{r['trials_per_minute']:.1f}"),
                ],
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "trial_cost", ground_truth=False, cka_cache=True)
    parser.add_argument("--sample", type=int, default=24, help="stitch points to break down")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a trial's share)")
    parser.add_argument("--trials", type=int, default=24, help="trials of the real run")
    parser.add_argument("--noop-trials", type=int, default=20, help="trials of the no-op run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ray", action="store_true", help="only the in-process breakdown")
    args = parser.parse_args(argv)
    res = run(args)
    return publish("trial_cost", res, markdown(res), args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
