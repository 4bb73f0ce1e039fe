"""Timing helpers: best-of-N wall time of a call, and the pure forward passes of a trial.

The pure forward passes (:func:`pure_forward_seconds`) are the floor a candidate evaluation
is compared with: the images it touches through the networks, and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import torch

from evaluators import DataSplits
from space import Anchor, StitchConfig, StitchedNet

T = TypeVar("T")


def timed(fn: Callable[[], T], repeats: int = 1) -> tuple[float, T]:
    """The fastest of ``repeats`` calls of ``fn`` in seconds, and the last call's result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def pure_forward_seconds(
    net: StitchedNet, front: Anchor, back: Anchor, config: StitchConfig, data: DataSplits
) -> float:
    """Forward passes over the images an evaluation touches, and nothing else.

    The calibration images through both anchors up to the cuts, the validation images
    through the stitched network.
    """
    k, j = config.front_block, config.back_block
    t0 = time.perf_counter()
    with torch.inference_mode():
        for x, _ in data.calibration:
            front.forward_front(x, k)
            back.forward_front(x, j)
        for x, _ in data.validation:
            net(x)
    return time.perf_counter() - t0
