"""``python -m tools.train_zoo``: seeded training of the default zoo on Fashion-MNIST.

::

    python -m tools.train_zoo [--anchors NAME ...] [--out DIR] [--data DIR] [--epochs N]
                              [--seed N]

trains the named zoo anchors (default: all, see :mod:`tools.zoo_recipes`) from scratch and
(re)writes their ``.safetensors`` weights and ``manifest.json`` in ``--out`` (default: the
package's zoo, ``space/zoo``). ``--seed`` trains a copy with another seed (into another
``--out``): a second checkpoint of the same architecture, which a study stitches to the zoo
anchor under an ``id`` of its own (``studies/same_architecture.yaml``). Bad input prints one
line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from evaluators.data import fashion_mnist_splits
from evaluators.macs import count_macs
from evaluators.params import count_params
from space import InputError, file_sha256
from space.zoo import ZOO_DIR
from tools.zoo_recipes import DATA_CONFIG, RECIPE, SPECS, ZooSpec, spec_dict


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 28x28 crop of the 2-pixel zero-padded image, random horizontal flip."""
    b = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2))
    rows = torch.randint(0, 5, (b, 1), generator=g) + torch.arange(28)
    cols = torch.randint(0, 5, (b, 1), generator=g) + torch.arange(28)
    # Advanced indices separated by a slice go first: (B, 28, 28, C).
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    out = out.permute(0, 3, 1, 2).contiguous()
    flip = torch.rand(b, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy (%) of ``model`` on a loader."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def train_anchor(
    spec: ZooSpec, data, *, epochs: int | None = None, seed: int | None = None, log=print
) -> tuple[nn.Module, dict]:
    """Trains one zoo anchor from scratch; returns the model and its metrics.

    ``seed`` (default: the recipe's) seeds the initialisation, the augmentation and the
    data order.
    """
    seed = RECIPE["seed"] if seed is None else seed
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = timm.create_model(spec.timm_name, **spec.timm_kwargs)
    epochs = epochs or spec.epochs
    opt = torch.optim.AdamW(_param_groups(model, 0.05), lr=spec.lr, betas=(0.9, 0.999))
    train = data.train
    steps_per_epoch = len(train)
    total = epochs * steps_per_epoch
    warmup = steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
        ),
    )
    t0 = time.time()
    history = []
    for epoch in range(epochs):
        model.train()
        running = n = 0.0
        for x, y in train:
            x = _augment(x, g)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += loss.item() * len(y)
            n += len(y)
        val = evaluate(model, data.validation)
        history.append(
            {"epoch": epoch + 1, "loss": round(running / n, 4), "val_acc": round(val, 2)}
        )
        log(
            f"  {spec.name} epoch {epoch + 1}/{epochs} loss {running / n:.4f} val {val:.2f}% "
            f"({time.time() - t0:.0f}s)"
        )
    model.eval()
    metrics = {
        "val_acc": round(evaluate(model, data.validation), 2),
        "test_acc": round(evaluate(model, data.test), 2),
        "train_seconds": round(time.time() - t0, 1),
        "epochs": epochs,
        "history": history,
    }
    return model, metrics


def run_training(
    names: list[str],
    out_dir: Path,
    *,
    data_root: str | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    log=print,
) -> dict:
    """Trains the named anchors and (re)writes their weights and the manifest in ``out_dir``.

    A ``seed`` other than the recipe's is recorded in each anchor's entry (``seed``).
    """
    torch.set_num_threads(RECIPE["threads"])
    data = fashion_mnist_splits(
        data_root, validation=5000, calibration=512, batch_size=RECIPE["batch_size"]
    )
    data.train.shuffle = True
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault("anchors", {})
    manifest["recipe"] = RECIPE
    for name in names:
        spec = SPECS[name]
        n_epochs = spec.epochs if epochs is None else epochs
        log(f"training {name} ({spec.timm_name}, {n_epochs} epochs)")
        model, metrics = train_anchor(spec, data, epochs=epochs, seed=seed, log=log)
        weights = out_dir / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        manifest["anchors"][name] = {
            **spec_dict(spec),
            "input_size": [1, 28, 28],
            "data_config": DATA_CONFIG,
            "weights": weights.name,
            "sha256": file_sha256(weights),
            "macs": count_macs(model, (1, 1, 28, 28)),
            "params": count_params(model),
            **metrics,
            **({"seed": seed} if seed is not None and seed != RECIPE["seed"] else {}),
            "trained_on": f"{platform.machine()} CPU, {RECIPE['threads']} threads, "
            f"torch {torch.__version__}, timm {timm.__version__}, python {sys.version.split()[0]}",
        }
        manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        log(f"  {name}: test {metrics['test_acc']:.2f}% in {metrics['train_seconds']:.0f}s")
    return manifest


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (the flags of the former ``python -m space.zoo train``)."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.train_zoo",
        description="Train zoo anchors from scratch (seeded) and write the manifest.",
    )
    parser.add_argument(
        "--anchors",
        nargs="+",
        default=sorted(SPECS),
        metavar="NAME",
        help=f"which anchors (default: all of {', '.join(sorted(SPECS))})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ZOO_DIR,
        help="output folder for weights and manifest.json (default: the package's zoo)",
    )
    parser.add_argument(
        "--data", default=None, help="Fashion-MNIST directory (default: auto-detect)"
    )
    parser.add_argument("--epochs", type=int, default=None, help="override every anchor's epochs")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"train with another seed (default: the recipe's, {RECIPE['seed']}); needs an --out "
        "other than the package's zoo",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2: bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = [a for a in args.anchors if a not in SPECS]
    if bad:
        parser.exit(2, f"error: --anchors: unknown {bad}; choose from {sorted(SPECS)}\n")
    if args.epochs is not None and args.epochs < 1:
        parser.exit(2, f"error: --epochs must be >= 1, got {args.epochs}\n")
    if args.seed not in (None, RECIPE["seed"]) and args.out.resolve() == ZOO_DIR.resolve():
        parser.exit(
            2,
            f"error: --seed {args.seed} would overwrite the package's zoo (seed "
            f"{RECIPE['seed']}); give --out DIR for the copy\n",
        )
    try:
        run_training(
            args.anchors, args.out, data_root=args.data, epochs=args.epochs, seed=args.seed
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
