"""Benchmark of the evaluators on two small Fashion-MNIST-sized anchors.

Measures: the CKA matrix on 1,024 images, one MACs count, least squares on 512 images,
validation on 5,000 images, the peak memory of CKA at 1k and 10k images (torch tensors
alive at once, and the process's RSS growth in a fresh child process), and the ratio of one
end-to-end candidate evaluation to the pure forward passes over the images it touches.

    python benchmarks/bench_evaluators.py --out bench.json          # full
    python benchmarks/bench_evaluators.py --quick --out /tmp/b.json  # tiny, for tests

Anchors: the zoo's ``resnet-s`` and ``vit-s`` when ``space/zoo/manifest.json`` lists all four
zoo anchors (``--anchors auto``), else randomly initialised timm models of the same
architecture (timings do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.lib import md_table, pure_forward_seconds, timed  # noqa: E402
from evaluators import (  # noqa: E402
    ArrayLoader,
    DataSplits,
    LiveBytes,
    accuracy,
    cka_matrix,
    count_macs,
    evaluate_candidate,
    fashion_mnist_splits,
    fit_stitch,
    synthetic_splits,
)
from space import Anchor, StitchConfig, build_stitched, load_anchor  # noqa: E402

ZOO = ("resnet-l", "resnet-s", "vit-l", "vit-s")
FULL = {"cka": 1024, "cal": 512, "val": 5000, "mem": (1000, 10000), "batch": 256}
QUICK = {"cka": 128, "cal": 64, "val": 256, "mem": (128, 512), "batch": 64}


def load_anchors(which: str) -> tuple[Anchor, Anchor, str]:
    """The front (ResNet) and back (ViT) anchors, and where they came from."""
    manifest = ROOT / "space" / "zoo" / "manifest.json"
    if which in ("auto", "zoo") and manifest.is_file():
        try:
            names = set(json.loads(manifest.read_text()).get("anchors", {}))
        except (OSError, ValueError):
            names = set()
        if set(ZOO) <= names:
            return load_anchor("zoo:resnet-s"), load_anchor("zoo:vit-s"), "zoo"
    if which == "zoo":
        raise SystemExit("error: the zoo manifest does not list resnet-s, resnet-l, vit-s, vit-l")
    torch.manual_seed(0)
    resnet = load_anchor(
        "resnet18",
        layers=(1, 1, 1, 1),
        channels=(16, 32, 64, 128),
        stem_width=16,
        in_chans=1,
        num_classes=10,
        input_size=(1, 28, 28),
    )
    vit = load_anchor(
        "vit_tiny_patch16_224",
        img_size=28,
        patch_size=4,
        in_chans=1,
        embed_dim=32,
        depth=4,
        num_heads=2,
        num_classes=10,
    )
    return resnet, vit, "timm (random init)"


def load_data(which: str, sizes: dict[str, Any]) -> tuple[DataSplits, ArrayLoader, str]:
    """The splits and a pool of training images for CKA (at least the largest memory size)."""
    if which in ("auto", "fashion-mnist"):
        try:
            data = fashion_mnist_splits(
                calibration=sizes["cal"], validation=sizes["val"], batch_size=sizes["batch"]
            )
            return data, data.train, "fashion-mnist"
        except ValueError:
            if which == "fashion-mnist":
                raise
    n = max(sizes["mem"][1], sizes["cka"])
    data = synthetic_splits(
        num_classes=10,
        input_size=(1, 28, 28),
        calibration=sizes["cal"],
        validation=sizes["val"],
        test=64,
        batch_size=sizes["batch"],
    )
    pool = synthetic_splits(
        num_classes=10, input_size=(1, 28, 28), calibration=n, validation=4, test=4, seed=1
    ).calibration
    pool = ArrayLoader(pool.images, pool.labels, batch_size=sizes["batch"])
    return data, pool, "synthetic"


def cka_tensor_peak(front: Anchor, back: Anchor, loader: ArrayLoader) -> int:
    """Most bytes of torch tensors alive at once during one CKA matrix computation."""
    with LiveBytes(set()) as tracker:
        cka_matrix(front, back, loader, use_cache=False)
    return tracker.peak


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (Linux ``clear_refs`` 5); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _rss_child(args: argparse.Namespace) -> None:
    """Child mode: RSS growth of one CKA computation on ``--cka-memory`` images."""
    sizes = QUICK if args.quick else FULL
    front, back, _ = load_anchors(args.anchors)
    _, pool, _ = load_data(args.data, sizes)
    loader = pool.subset(args.cka_memory)
    front.features()
    back.features()
    # Warm up the code paths on a few images so one-off allocations do not count.
    cka_matrix(front, back, loader.subset(sizes["batch"]), use_cache=False)
    reset = _reset_peak_rss()
    before = _status_kb("VmRSS") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cka_matrix(front, back, loader, use_cache=False)
    after = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rss_growth_kb": after - before, "peak_reset": reset}))


def rss_growth_kb(args: argparse.Namespace, n: int) -> int | None:
    """Runs :func:`_rss_child` in a fresh process."""
    cmd = [sys.executable, __file__, "--cka-memory", str(n), "--anchors", args.anchors]
    cmd += ["--data", args.data] + (["--quick"] if args.quick else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        return None
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["rss_growth_kb"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement of the evaluators, as the results JSON."""
    sizes = QUICK if args.quick else FULL
    front, back, anchors_from = load_anchors(args.anchors)
    data, pool, data_from = load_data(args.data, sizes)
    anchors = {front.name: front, back.name: back}
    k = max(1, front.num_blocks // 2)
    j = max(1, back.num_blocks // 2)
    config = StitchConfig(front.name, back.name, k, j)
    out: dict[str, Any] = {
        "quick": args.quick,
        "anchors": anchors_from,
        "front": repr(front),
        "back": repr(back),
        "config": str(config),
        "data": data_from,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "torch": torch.__version__,
    }
    front.features()
    back.features()
    net = build_stitched(front, back, config)

    cka_loader = pool.subset(sizes["cka"])
    cka_matrix(front, back, cka_loader.subset(sizes["batch"]), use_cache=False)  # warm-up
    out["cka_images"] = sizes["cka"]
    out["cka_seconds"], matrix = timed(lambda: cka_matrix(front, back, cka_loader, use_cache=False))
    out["cka_at_stitch"] = float(matrix[k, j])
    out["macs_seconds"], out["macs"] = timed(lambda: count_macs(net, net.input_size))
    out["ls_images"] = data.calibration.num_images
    out["ls_seconds"], _ = timed(lambda: fit_stitch(net, data.calibration))
    out["val_images"] = data.validation.num_images
    out["val_seconds"], acc = timed(lambda: accuracy(net, data.validation))
    out["val_acc"] = acc.top1

    small, large = sizes["mem"]
    out["cka_mem_images"] = [small, large]
    out["cka_tensor_peak_mb"] = [
        round(cka_tensor_peak(front, back, pool.subset(n)) / 2**20, 3) for n in (small, large)
    ]
    if not args.quick:
        rss = [rss_growth_kb(args, n) for n in (small, large)]
        out["cka_rss_growth_mb"] = [None if r is None else round(r / 1024, 1) for r in rss]

    # End to end vs the pure forward passes of the same images (best of `repeats`).
    repeats = 1 if args.quick else args.repeats
    pure, _ = timed(lambda: pure_forward_seconds(net, front, back, config, data), repeats)
    e2e, result = timed(lambda: evaluate_candidate(config, anchors, data), repeats)
    out["pure_forward_seconds"] = pure
    out["candidate_seconds"] = e2e
    out["candidate_ratio"] = e2e / pure
    out["candidate_fit_seconds"] = result.fit_seconds
    out["candidate_eval_seconds"] = result.eval_seconds
    out["candidate_latency_ms"] = result.latency_ms
    out["candidate_memory_mb"] = result.memory_mb

    def anchor_pure() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x, _ in data.validation:
                front.model(x)
        return time.perf_counter() - t0

    pure_a, _ = timed(anchor_pure, repeats)
    e2e_a, _ = timed(lambda: evaluate_candidate(front.name, anchors, data), repeats)
    out["anchor_candidate_ratio"] = e2e_a / pure_a
    return out


def table(r: dict[str, Any]) -> str:
    """The results as a markdown table."""
    mem = r["cka_mem_images"]
    rows = [
        ("anchors", f"{r['anchors']}; stitch {r['config']}; data {r['data']}"),
        ("threads", r["threads"]),
        (f"CKA matrix, {r['cka_images']} images", f"{r['cka_seconds']:.3f} s"),
        ("one MACs count (fvcore)", f"{r['macs_seconds']:.3f} s ({r['macs'] / 1e6:.2f} MMACs)"),
        (f"least squares, {r['ls_images']} images", f"{r['ls_seconds']:.3f} s"),
        (f"validation, {r['val_images']} images", f"{r['val_seconds']:.3f} s"),
        (
            f"CKA peak tensor memory, {mem[0]} / {mem[1]} images",
            f"{r['cka_tensor_peak_mb'][0]} / {r['cka_tensor_peak_mb'][1]} MB",
        ),
    ]
    if "cka_rss_growth_mb" in r:
        g = r["cka_rss_growth_mb"]
        rows.append((f"CKA RSS growth, {mem[0]} / {mem[1]} images", f"{g[0]} / {g[1]} MB"))
    rows += [
        (
            "stitch candidate: end to end / pure forward",
            f"{r['candidate_seconds']:.3f} s / {r['pure_forward_seconds']:.3f} s = "
            f"{r['candidate_ratio']:.2f}",
        ),
        ("anchor candidate: end to end / pure forward", f"{r['anchor_candidate_ratio']:.2f}"),
    ]
    return md_table(["measurement", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds, for tests)")
    parser.add_argument("--anchors", choices=("auto", "zoo", "timm"), default="auto")
    parser.add_argument("--data", choices=("auto", "fashion-mnist", "synthetic"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--repeats", type=int, default=2, help="best-of repeats for the ratio")
    parser.add_argument("--cka-memory", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cka_memory is not None:
        _rss_child(args)
        return 0
    if args.out is None:
        parser.error("--out is required")
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
