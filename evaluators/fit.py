"""Stitch fitting and accuracy.

:func:`fit_stitch` initialises a stitched network's stitching layer by least squares on
calibration images (SN-Net), then optionally fine-tunes that layer alone with the task loss
for a few steps (ReStNet). The anchors are never changed: they are frozen, stay in eval
mode, and only the stitching layer's parameters are given to the optimiser.

Fine-tuning reuses the front activations: the least-squares pass already computes the front
anchor's output at the stitch for every calibration batch, so when fine-tuning runs on the
same loader those activations are kept (up to ``max_cache_mb``) and each step only runs the
stitching layer and the back part.

:func:`accuracy` gives top-1 (and top-5 when there are more than 5 classes) in percent;
non-finite logits raise instead of being counted as wrong.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from space import StitchedNet, adapt_images


def _split(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, tuple | list):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def fit_input(x: torch.Tensor, input_size: tuple[int, ...] | None) -> torch.Tensor:
    """Images adapted to ``input_size`` (:func:`space.adapt_images`) when they differ from it."""
    if input_size is not None and tuple(x.shape[1:]) != tuple(input_size):
        return adapt_images(x, tuple(input_size))
    return x


@dataclass
class FitResult:
    """What :func:`fit_stitch` did.

    Attributes:
        residual: Relative least-squares residual (``1 - R^2``) per linear part.
        ls_images: Calibration images used by least squares.
        ls_seconds: Time of the least-squares pass.
        steps: Fine-tuning steps run.
        finetune_seconds: Time of fine-tuning.
        losses: Cross-entropy of every fine-tuning step.
        cached_activations: Whether fine-tuning reused the front activations.
        total_residual: Relative least-squares residual over the whole target (all parts;
            :attr:`space.StitchingLayer.residual`).
    """

    residual: dict[str, float]
    ls_images: int
    ls_seconds: float
    steps: int = 0
    finetune_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    cached_activations: bool = False
    total_residual: float | None = None

    @property
    def seconds(self) -> float:
        """Total fitting time."""
        return self.ls_seconds + self.finetune_seconds

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {**asdict(self), "seconds": self.seconds}


def _pairs(
    net: StitchedNet,
    loader: Iterable[Any],
    device: torch.device,
    keep: list[tuple[torch.Tensor, torch.Tensor]] | None,
    budget_bytes: int,
    counter: list[int],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (source, target) activation pairs; optionally keeps (source, labels)."""
    front, back = net.front, net.back
    k, j = net.config.front_block, net.config.back_block
    back_size = net.back_input_size
    one_pass = front.model is back.model and tuple(net.input_size) == tuple(back_size)
    kept = 0
    for batch in loader:
        x, y = _split(batch)
        # One resolution: the images adapted once to the stitched network's input, and the
        # same images for the back anchor (space.back_input_size).
        x = fit_input(x.to(device), net.input_size)
        if one_pass:  # a self-stitch: both cuts from one forward pass
            src, dst = front.forward_cuts(x, [k, j])
        else:
            src = front.forward_front(x, k)
            dst = back.forward_front(fit_input(x, back_size), j)
        counter[0] += x.shape[0]
        if keep is not None and y is not None:
            kept += src.numel() * src.element_size()
            if kept <= budget_bytes:
                keep.append((src, y.to(device)))
            else:
                keep.clear()
                keep = None  # too large: fine-tuning recomputes the front part
                counter[1] = 0
        yield src, dst
    if keep is not None:
        counter[1] = 1


def fit_stitch(
    net: StitchedNet,
    loader: Iterable[Any],
    *,
    steps: int = 0,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    train_loader: Iterable[Any] | None = None,
    device: str | torch.device | None = None,
    max_cache_mb: float = 256.0,
) -> FitResult:
    """Fits the stitching layer: least squares, then optionally fine-tuning it alone.

    Args:
        net: The stitched network; only ``net.stitch`` changes.
        loader: Calibration batches of images or ``(images, labels)`` for least squares.
        steps: Fine-tuning steps of the stitching layer with cross-entropy (0: least squares
            only). Needs labels.
        lr: AdamW learning rate for fine-tuning.
        weight_decay: AdamW weight decay.
        train_loader: Batches for fine-tuning (default: ``loader``, cycled as needed).
        device: Where to run (default: where the stitching layer is).
        max_cache_mb: Keep the front activations of ``loader`` in memory for fine-tuning
            up to this size; above it, fine-tuning recomputes them.

    Returns:
        The fit's residuals, timings and losses.

    Raises:
        ValueError: Non-finite activations, no calibration images, no labels for
            fine-tuning, or a fine-tuning loss that became non-finite.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    dev = torch.device(device) if device is not None else next(net.stitch.parameters()).device
    cache = steps > 0 and train_loader is None
    keep: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if cache else None
    counter = [0, 0]  # images, cache complete
    net.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        residual = net.stitch.init_least_squares(
            _pairs(net, loader, dev, keep, int(max_cache_mb * 2**20), counter)
        )
    result = FitResult(
        residual=residual,
        ls_images=counter[0],
        ls_seconds=time.perf_counter() - t0,
        total_residual=net.stitch.residual,
    )
    if steps == 0:
        return result
    cached = bool(counter[1]) and bool(keep)
    t1 = time.perf_counter()
    result.losses = finetune_stitch(
        net,
        keep if cached else (train_loader if train_loader is not None else loader),
        cached=cached,
        steps=steps,
        lr=lr,
        weight_decay=weight_decay,
        device=dev,
    )
    result.steps = steps
    result.cached_activations = cached
    result.finetune_seconds = time.perf_counter() - t1
    return result


def finetune_stitch(
    net: StitchedNet,
    batches: Iterable[Any],
    *,
    cached: bool,
    steps: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
) -> list[float]:
    """Trains the stitching layer alone (anchors frozen, in eval mode) with AdamW.

    Args:
        net: The stitched network.
        batches: ``(images, labels)`` batches (re-iterated as needed), or, with ``cached``,
            ``(front activations, labels)`` pairs.
        cached: The batches hold the front anchor's activations at the cut.
        steps: Optimiser steps.
        lr: Learning rate.
        weight_decay: AdamW weight decay.
        device: Where the batches go.

    Returns:
        The training loss of every step.

    Raises:
        ValueError: The batches have no labels, or the loss diverged.
    """
    params = [p for p in net.stitch.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    j = net.config.back_block
    losses: list[float] = []
    net.train()  # the stitching layer only; anchors stay in eval mode
    try:
        source = itertools.cycle(batches) if cached else _cycle(batches)
        for step in range(steps):
            batch = next(source)
            if cached:
                src, y = batch
                logits = net.back.forward_back(net.stitch(src), j)
            else:
                x, y = _split(batch)
                if y is None:
                    raise ValueError("fine-tuning the stitching layer needs (images, labels)")
                x = fit_input(x.to(device), net.input_size)
                logits = net(x)
            loss = F.cross_entropy(logits, y.to(device))
            if not torch.isfinite(loss):
                raise ValueError(
                    f"stitch fine-tuning diverged: the loss is {loss.item()} at step {step}; "
                    "lower the learning rate (fit_lr)"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        net.eval()
        opt.zero_grad(set_to_none=True)
    return losses


def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    """Re-iterates a re-iterable loader forever (unlike ``itertools.cycle``, keeps nothing)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the fine-tuning loader yields no batches")


@dataclass(frozen=True)
class Accuracy:
    """Classification accuracy on one split, in percent.

    Attributes:
        top1: Top-1 accuracy.
        top5: Top-5 accuracy, ``None`` for 5 classes or fewer.
        num_images: Images evaluated.
        seconds: Evaluation time.
    """

    top1: float
    top5: float | None
    num_images: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


@torch.inference_mode()
def accuracy(
    model: nn.Module | Any,
    loader: Iterable[Any],
    *,
    device: str | torch.device | None = None,
    num_images: int | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> Accuracy:
    """Top-1 (and top-5 where there are more than 5 classes) accuracy in percent.

    Args:
        model: Any module mapping images to logits (run in eval mode, restored afterwards).
        loader: Batches of ``(images, labels)``.
        device: Where to run (default: the model's device; the model is not moved).
        num_images: Evaluate only the first ``num_images`` images.
        input_size: Adapt images to this ``(C, H, W)`` when they differ
            (:func:`space.adapt_images`).

    Raises:
        ValueError: Non-finite logits, batches without labels, or no images.
    """
    param = next(model.parameters(), None)
    dev = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    correct1 = correct5 = seen = 0
    top5: bool | None = None
    try:
        for batch in loader:
            x, y = _split(batch)
            if y is None:
                raise ValueError("accuracy needs batches of (images, labels)")
            if num_images is not None:
                x, y = x[: num_images - seen], y[: num_images - seen]
                if len(x) == 0:
                    break
            x = fit_input(x.to(dev), input_size)
            y = y.to(dev)
            logits = model(x)
            if not torch.isfinite(logits).all():
                raise ValueError(
                    f"non-finite logits in images {seen}..{seen + len(x) - 1}; the model or the "
                    "stitching layer produces NaN/inf (check the weights and the fit)"
                )
            if top5 is None:
                top5 = logits.shape[1] > 5
            if top5:
                best = logits.topk(5, dim=1).indices
                hits = best == y[:, None]
                correct1 += int(hits[:, 0].sum())
                correct5 += int(hits.any(1).sum())
            else:
                correct1 += int((logits.argmax(1) == y).sum())
            seen += len(x)
            if num_images is not None and seen >= num_images:
                break
    finally:
        model.train(was_training)
    if seen == 0:
        raise ValueError("accuracy: the loader gave no images")
    return Accuracy(
        top1=100.0 * correct1 / seen,
        top5=100.0 * correct5 / seen if top5 else None,
        num_images=seen,
        seconds=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class AccuracyReport:
    """Validation accuracy, and test accuracy when asked for.

    Attributes:
        validation: On the validation split (what the search optimises).
        test: On the test split, or ``None`` (final reporting only).
    """

    validation: Accuracy
    test: Accuracy | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "validation": self.validation.to_dict(),
            "test": None if self.test is None else self.test.to_dict(),
        }


def evaluate_accuracy(
    model: nn.Module | Any,
    data: Any,
    *,
    test: bool = False,
    device: str | torch.device | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> AccuracyReport:
    """Accuracy on a :class:`evaluators.DataSplits`' validation split, and test when asked.

    Args:
        model: The module.
        data: The splits.
        test: Also evaluate on the test split (final reporting only; never search on it).
        device: Where to run.
        input_size: See :func:`accuracy`.
    """
    val = accuracy(model, data.validation, device=device, input_size=input_size)
    tst = accuracy(model, data.test, device=device, input_size=input_size) if test else None
    return AccuracyReport(validation=val, test=tst)
