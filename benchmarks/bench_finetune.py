"""Rung 1: what fine-tuning the stitching layer alone buys over least squares, and at what cost.

For a fixed sample of stitches of the shipped zoo on Fashion-MNIST: least squares on 256
calibration images (rung 0), then :func:`evaluators.finetune.finetune_stitch_layer` from
that same least-squares fit on the 50,000-image training remainder (disjoint from the
2,000 validation images) for a grid of peak learning rates x steps (AdamW, one-cycle, batch
128), and distillation from resnet-l's logits against plain cross-entropy at each stitch's
best learning rate. Every run records validation accuracy, wall and CPU seconds on one
torch thread, and the training-loss curve. The summary picks the default: the cheapest
setting that captures most of the best setting's gain over least squares.

A short micro-benchmark compares the fine-tuning step with the front part under
``torch.no_grad()`` (what the evaluator does) against a plain ``net(x)`` step.

    python -m benchmarks.bench_finetune --out benchmarks/results/finetune.json
    python -m benchmarks.bench_finetune --quick --out /tmp/finetune.json   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.lib import RESULTS, machine_info, md_table, spearman, write_json
from evaluators import (
    ArrayLoader,
    DataSplits,
    FinetuneSettings,
    accuracy,
    fashion_mnist_splits,
    finetune_stitch_layer,
    fit_stitch,
    stitched_macs,
)
from space import Anchor, StitchConfig, build_stitched, load_anchor

#: (front, k, back, j): the four stitches of issue 13's table, then other pair kinds.
STITCHES: tuple[tuple[str, int, str, int], ...] = (
    ("resnet-l", 6, "resnet-s", 3),
    ("resnet-l", 3, "resnet-s", 2),
    ("resnet-s", 2, "resnet-l", 3),
    ("vit-s", 2, "resnet-l", 4),
    ("vit-l", 3, "vit-s", 2),  # vit -> vit
    ("resnet-s", 2, "vit-s", 2),  # resnet -> vit
)
LRS = (1e-3, 3e-3, 1e-2)
STEPS = (78, 156, 312)
DISTILL_STEPS = (156, 312)
#: Stitches with distillation runs (the two with the largest least-squares gap by default).
DISTILL_ON = ("zoo:resnet-s[:2] -> zoo:resnet-l[3:]", "zoo:vit-s[:2] -> zoo:resnet-l[4:]")
TEACHER = "resnet-l"
BATCH = 128
#: Settings every run shares (their FinetuneSettings defaults).
FIXED = ("weight_decay", "schedule", "warmup", "temperature", "seed")
#: A setting "captures most of the gain" when it reaches this fraction of the best gain.
CAPTURE = 0.9


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--out", type=Path, default=RESULTS / "finetune.json", help="results JSON")
    p.add_argument("--validation", type=int, default=2000, help="validation images")
    p.add_argument("--calibration", type=int, default=256, help="least-squares images")
    p.add_argument(
        "--only", default="", help="comma-separated stitch indices into STITCHES (default: all)"
    )
    p.add_argument(
        "--distill-on",
        default=";".join(DISTILL_ON),
        help="semicolon-separated stitch names with distillation runs ('all' for every one)",
    )
    p.add_argument("--lrs", default="", help="comma-separated peak learning rates (default: LRS)")
    p.add_argument("--steps", default="", help="comma-separated step counts (default: STEPS)")
    p.add_argument(
        "--resume", action="store_true", help="keep the runs already in --out and skip them"
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1 stitch, 4-8 steps")
    return p.parse_args(argv)


def _run_key(r: dict[str, Any]) -> tuple:
    return (r["lr"], r["steps"], r["distill"])


def _one_run(net, state, data, settings, teacher) -> dict[str, Any]:
    net.stitch.load_state_dict(state)  # every run starts from the same least-squares fit
    c0 = time.thread_time()
    res = finetune_stitch_layer(net, data.train, settings, teacher=teacher)
    cpu = time.thread_time() - c0
    acc = accuracy(net, data.validation).top1
    return {
        "lr": settings.lr,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "distill": settings.distill,
        "val_acc": acc,
        "seconds": res.seconds,
        "cpu_seconds": cpu,
        "loss_first": res.loss_first,
        "loss_last": res.loss_last,
        "loss_min": res.loss_min,
        "loss_curve": res.loss_curve,
        "images_seen": res.images_seen,
    }


def _fast_path(net, data, steps: int = 12) -> dict[str, float]:
    """Seconds per step: front under no_grad (the evaluator's path) against ``net(x)``."""
    t = data.train
    n = BATCH * steps
    loader = ArrayLoader(
        t.images[:n],
        t.labels[:n],
        batch_size=BATCH,
        mean=t.mean,
        std=t.std,
        input_size=t.input_size,
    )
    batches = list(loader)  # normalised once, outside the timing
    k, j = net.config.front_block, net.config.back_block
    state = {n: t.clone() for n, t in net.stitch.state_dict().items()}
    out = {}
    for name in ("plain", "no_grad_front", "plain", "no_grad_front"):
        opt = torch.optim.AdamW(net.stitch.parameters(), lr=1e-4)
        net.train()
        t0 = time.perf_counter()
        for x, y in batches:
            if name == "plain":
                logits = net(x)
            else:
                with torch.no_grad():
                    h = net.front.forward_front(x, k)
                logits = net.back.forward_back(net.stitch(h), j)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        out[name] = (time.perf_counter() - t0) / len(batches)  # second round kept (warm)
        net.eval()
    net.stitch.load_state_dict(state)
    return out


def _summary(stitches: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (lr, steps) with plain cross-entropy: mean accuracy, gain, captured gain, seconds."""
    settings = sorted(
        {(r["lr"], r["steps"]) for s in stitches for r in s["runs"] if not r["distill"]}
    )
    rows = []
    for lr, steps in settings:
        accs, gains, caps, secs = [], [], [], []
        for s in stitches:
            ce = [r for r in s["runs"] if not r["distill"]]
            mine = [r for r in ce if (r["lr"], r["steps"]) == (lr, steps)]
            if not mine:
                continue
            best = max(r["val_acc"] for r in ce)
            gain = mine[0]["val_acc"] - s["ls"]["val_acc"]
            accs.append(mine[0]["val_acc"])
            gains.append(gain)
            caps.append(gain / max(best - s["ls"]["val_acc"], 1e-9))
            secs.append(mine[0]["seconds"])
        rows.append(
            {
                "lr": lr,
                "steps": steps,
                "stitches": len(accs),
                "mean_val_acc": float(np.mean(accs)),
                "mean_gain": float(np.mean(gains)),
                "mean_captured": float(np.mean(caps)),
                "min_captured": float(np.min(caps)),
                "mean_seconds": float(np.mean(secs)),
                "gain_per_second": float(np.mean(gains) / np.mean(secs)),
            }
        )
    full = [r for r in rows if r["stitches"] == len(stitches)]
    best = max(full, key=lambda r: r["mean_val_acc"]) if full else None
    ok = [r for r in full if r["mean_captured"] >= CAPTURE]
    default = min(ok, key=lambda r: (r["mean_seconds"], -r["mean_val_acc"])) if ok else best
    return {"per_setting": rows, "best": best, "default": default, "capture": CAPTURE}


def _rank_agreement(stitches: list[dict[str, Any]], default: dict[str, Any] | None):
    if default is None:
        return None
    ls, ft = [], []
    for s in stitches:
        mine = [
            r
            for r in s["runs"]
            if not r["distill"] and (r["lr"], r["steps"]) == (default["lr"], default["steps"])
        ]
        if mine:
            ls.append(s["ls"]["val_acc"])
            ft.append(mine[0]["val_acc"])
    best = [max(r["val_acc"] for r in s["runs"]) for s in stitches]
    rho = spearman(ls, ft)
    rho_best = spearman([s["ls"]["val_acc"] for s in stitches], best)
    return {
        "spearman_ls_vs_default": None if np.isnan(rho) else rho,
        "spearman_ls_vs_best_finetuned": None if np.isnan(rho_best) else rho_best,
        "n": len(ls),
    }


def _table(res: dict[str, Any]) -> str:
    rows = []
    for s in res["stitches"]:
        ce = {(r["lr"], r["steps"]): r for r in s["runs"] if not r["distill"]}
        kd = {(r["lr"], r["steps"]): r for r in s["runs"] if r["distill"]}
        for lr in sorted({lr for lr, _ in ce}):
            cells = []
            for steps in sorted({st for _, st in ce}):
                r = ce.get((lr, steps))
                cells.append("-" if r is None else f"{r['val_acc']:.2f} ({r['seconds']:.0f}s)")
            rows.append(
                [
                    s["stitch"],
                    f"{s['macs'] / 1e6:.2f}M",
                    f"{s['ls']['val_acc']:.2f}",
                    f"{lr:g}",
                    *cells,
                ]
            )
        for (lr, steps), r in sorted(kd.items()):
            rows.append(
                [
                    s["stitch"],
                    "",
                    "",
                    f"{lr:g} KD{r['distill']:g} {steps} steps",
                    f"{r['val_acc']:.2f} ({r['seconds']:.0f}s)",
                ]
            )
    steps = sorted({r["steps"] for s in res["stitches"] for r in s["runs"] if not r["distill"]})
    out = [md_table(["stitch", "MACs", "LS", "lr", *[f"{n} steps" for n in steps]], rows)]
    summ = res.get("summary") or {}
    if summ.get("per_setting"):
        out.append("")
        out.append(
            md_table(
                ["lr", "steps", "mean acc", "mean gain", "captured (mean/min)", "mean s", "gain/s"],
                [
                    [
                        f"{r['lr']:g}",
                        r["steps"],
                        f"{r['mean_val_acc']:.2f}",
                        f"{r['mean_gain']:.2f}",
                        f"{r['mean_captured']:.2f}/{r['min_captured']:.2f}",
                        f"{r['mean_seconds']:.1f}",
                        f"{r['gain_per_second']:.2f}",
                    ]
                    for r in summ["per_setting"]
                ],
            )
        )
        d = summ.get("default")
        if d:
            out.append(
                f"\ndefault: lr={d['lr']:g}, steps={d['steps']}, batch {BATCH}, onecycle: mean "
                f"{d['mean_val_acc']:.2f} (captures {d['mean_captured']:.0%} of the best gain) "
                f"in {d['mean_seconds']:.1f} s"
            )
    if res.get("rank_agreement"):
        out.append(f"rank agreement: {json.dumps(res['rank_agreement'])}")
    return "\n".join(out)


def _results(
    args: argparse.Namespace, data: DataSplits, anchors: dict[str, Anchor]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The results so far (``--resume``: those in ``--out``), and their stitches by name."""
    previous: dict[str, dict[str, Any]] = {}
    earlier: dict[str, Any] = {}
    if args.resume and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        previous = {s["stitch"]: s for s in earlier["stitches"]}
    res: dict[str, Any] = {
        "machine": machine_info(),
        "torch_threads": torch.get_num_threads(),
        "data": {
            "dataset": "fashion-mnist",
            "train": data.train.num_images,
            "calibration": args.calibration,
            "validation": args.validation,
        },
        "fixed": {k: v for k, v in FinetuneSettings().to_dict().items() if k in FIXED},
        "anchors": {
            n: {"val_acc": accuracy(a.model, data.validation).top1} for n, a in anchors.items()
        },
        "stitches": list(previous.values()),
        "bench_seconds": earlier.get("bench_seconds", 0.0),
    }
    if earlier:
        res["machine_earlier_runs"] = [*earlier.get("machine_earlier_runs", []), earlier["machine"]]
    return res, previous


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    args = _parse(argv)
    torch.set_num_threads(1)
    stitches = list(STITCHES)
    lrs, steps_grid, distill_steps = LRS, STEPS, DISTILL_STEPS
    if args.lrs:
        lrs = tuple(float(v) for v in args.lrs.split(","))
    if args.steps:
        steps_grid = tuple(int(v) for v in args.steps.split(","))
    if args.only:
        stitches = [STITCHES[int(i)] for i in args.only.split(",")]
    if args.quick:
        stitches, lrs, steps_grid, distill_steps = stitches[:1], (3e-3,), (4, 8), (4,)
        args.validation = min(args.validation, 200)
    distill_on = (
        "all" if args.distill_on == "all" else {s.strip() for s in args.distill_on.split(";")}
    )
    data = fashion_mnist_splits(
        None, calibration=args.calibration, validation=args.validation, test=100, batch_size=256
    )
    anchors = {n: load_anchor(f"zoo:{n}") for n in ("resnet-s", "resnet-l", "vit-s", "vit-l")}
    teacher = anchors[TEACHER]
    res, previous = _results(args, data, anchors)
    t_start = time.perf_counter()
    for front_name, k, back_name, j in stitches:
        front, back = anchors[front_name], anchors[back_name]
        cfg = StitchConfig(front.name, back.name, k, j)
        name = str(cfg)
        entry = previous.get(name)
        net = build_stitched(front, back, cfg)
        fit = fit_stitch(net, data.calibration)
        state = {n: t.clone() for n, t in net.stitch.state_dict().items()}
        if entry is None:
            entry = {
                "stitch": name,
                "config": cfg.to_dict(),
                "macs": stitched_macs(net)["total"],
                "kind": net.stitch.kind,
                "ls": {
                    "val_acc": accuracy(net, data.validation).top1,
                    "seconds": fit.ls_seconds,
                    "residual": fit.residual,
                },
                "runs": [],
            }
            res["stitches"].append(entry)
        done = {_run_key(r) for r in entry["runs"]}
        todo = [(lr, n, 0.0) for n in steps_grid for lr in lrs]
        for lr, n, distill in todo:
            if (lr, n, distill) in done:
                continue
            settings = FinetuneSettings(steps=n, batch_size=BATCH, lr=lr, distill=distill)
            entry["runs"].append(_one_run(net, state, data, settings, None))
            r = entry["runs"][-1]
            print(
                f"{name}: lr={lr:g} steps={n}: {r['val_acc']:.2f} "
                f"({r['seconds']:.1f}s, LS {entry['ls']['val_acc']:.2f})",
                flush=True,
            )
            write_json(args.out, res)
        if distill_on == "all" or name in distill_on:
            for n in distill_steps:
                ce = [r for r in entry["runs"] if not r["distill"] and r["steps"] == n]
                lr = max(ce, key=lambda r: r["val_acc"])["lr"]
                if (lr, n, 0.5) in {_run_key(r) for r in entry["runs"]}:
                    continue
                settings = FinetuneSettings(steps=n, batch_size=BATCH, lr=lr, distill=0.5)
                entry["runs"].append(_one_run(net, state, data, settings, teacher.model))
                r = entry["runs"][-1]
                print(
                    f"{name}: KD lr={lr:g} steps={n}: {r['val_acc']:.2f} ({r['seconds']:.1f}s)",
                    flush=True,
                )
                write_json(args.out, res)
        if "fast_path" not in entry:
            net.stitch.load_state_dict(state)
            entry["fast_path"] = _fast_path(net, data, steps=4 if args.quick else 12)
            write_json(args.out, res)
    ce_runs = [r for s in res["stitches"] for r in s["runs"] if not r["distill"]]
    res["grid"] = {
        "lr": sorted({r["lr"] for r in ce_runs}),
        "steps": sorted({r["steps"] for r in ce_runs}),
        "batch_size": BATCH,
    }
    res["bench_seconds"] = time.perf_counter() - t_start + res.get("bench_seconds", 0.0)
    res["summary"] = _summary(res["stitches"])
    res["rank_agreement"] = _rank_agreement(res["stitches"], res["summary"]["default"])
    write_json(args.out, res)
    print(_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
