"""What the person at the terminal sees and does: progress, Optuna's log level, Ctrl-C, SIGTERM."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import IO, Any

import optuna
from optuna.trial import FrozenTrial
from tqdm import tqdm

from search.core import OBJECTIVES, Attr, format_quantity


@contextlib.contextmanager
def optuna_logging(verbose: bool = False) -> Iterator[None]:
    """Optuna's own log lines at WARNING for the block (INFO when ``verbose``).

    Optuna logs an INFO line per study created and per trial told (``[I 2026-12-02 ...] A
    new study created in RDB ...``) that would interrupt the progress bar; ``--verbose``
    shows them. The previous level is restored afterwards.
    """
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


class Progress:
    """A live progress line: trials done of total, best so far per objective, time left."""

    def __init__(
        self,
        total: int,
        done: int,
        objectives: list[str],
        stream: IO[str] | None = None,
        *,
        desc: str = "trials",
        show_pruned: bool = True,
    ) -> None:
        stream = sys.stderr if stream is None else stream
        self.objectives = objectives
        self.stream = stream
        self.show_pruned = show_pruned
        self.bar = tqdm(
            total=total,
            initial=min(done, total),
            desc=desc,
            unit="trial",
            file=stream,
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=0.5,
        )
        self.best: dict[str, float] = {}
        self.pruned = self.failed = self.repeats = 0

    def seed(self, trials: Iterable[FrozenTrial]) -> None:
        """Takes the best values from trials finished in earlier runs."""
        for t in trials:
            self._update_best(t)
        self._refresh()

    def _update_best(self, t: FrozenTrial) -> None:
        if t.values is None or not t.user_attrs.get(Attr.FEASIBLE, True):
            return
        for name, v in zip(self.objectives, t.values, strict=False):
            better = max if OBJECTIVES[name].direction == "maximize" else min
            self.best[name] = better(self.best.get(name, v), v)

    def _refresh(self) -> None:
        parts = []
        for name in self.objectives:
            if name in self.best:
                v = self.best[name]
                if name == "accuracy":
                    parts.append(f"acc {v:.2f}%")
                elif name == "agreement":
                    parts.append(f"agreement {v:.2f}%")
                else:
                    parts.append(f"{name} {format_quantity(v)}")
        if self.show_pruned:
            parts.append(f"pruned {self.pruned}")  # CKA-pruned points and pruned repeats
        if self.failed:
            parts.append(f"failed {self.failed}")
        self.bar.set_postfix_str(", ".join(parts))

    def __call__(self, kind: str, trial: FrozenTrial) -> None:
        if kind == "complete":
            self._update_best(trial)
            self.bar.update(1)
        elif kind == "pruned":
            self.pruned += 1
        elif kind == "failed":
            self.failed += 1
            reason = " ".join(str(trial.user_attrs.get(Attr.FAIL_REASON, "")).split())
            self.bar.write(f"trial {trial.number} failed: {reason[:300]}", file=self.stream)
        else:
            self.repeats += 1
        self._refresh()

    def close(self) -> None:
        """Ends the bar."""
        self.bar.close()


class FamilyProgress:
    """The family's progress line: steps over all epochs, the epoch and loss, time left.

    Args:
        epochs: Epochs to train.
        steps: Steps per epoch.
        stream: Where to draw (default: standard error).
    """

    def __init__(self, epochs: int, steps: int, stream: IO[str] | None = None) -> None:
        self.epochs, self.steps = epochs, steps
        self.bar = tqdm(
            total=epochs * steps,
            desc="family",
            unit="step",
            file=sys.stderr if stream is None else stream,
            dynamic_ncols=True,
            smoothing=0.1,
            mininterval=0.5,
        )

    def update(self, epoch: int, step: int, loss: float) -> None:
        """Shows step ``step`` of epoch ``epoch`` (0-based) and its loss."""
        self.bar.update(max(0, epoch * self.steps + step + 1 - self.bar.n))
        self.bar.set_postfix_str(f"epoch {epoch + 1}/{self.epochs}, loss {loss:.3f}")

    def follow(self, queue: Any, done: threading.Event) -> None:
        """Shows what the training reports on ``queue`` until ``done`` is set (a thread)."""
        while not done.is_set():
            try:
                item = queue.get(timeout=0.5)
            except Exception:  # empty, or the queue is gone with the cluster
                continue
            self.update(*item)

    def close(self) -> None:
        """Ends the bar."""
        self.bar.close()


class SignalGuard:
    """Turns SIGINT and SIGTERM into KeyboardInterrupt, deferred inside critical sections.

    Ray Tune's own SIGINT handler (which ends the run as if it had finished) is switched
    off; an interrupt raised while the searcher writes a trial waits until the write is done,
    so that no trial is left half-written.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        #: The name of the last signal received (``"SIGTERM"``), or ``None``.
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def name(self, interrupt: BaseException) -> str:
        """The signal behind a KeyboardInterrupt (Ray Tune re-raises it without its text)."""
        return str(interrupt) or self.received or "SIGINT"

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name
        if self.depth:
            self.pending = signum
            return
        raise KeyboardInterrupt(self.received)

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """Defers interrupts until the block is done."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> SignalGuard:
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def reinstall(self) -> None:
        """Takes SIGINT and SIGTERM back after a library installed its own handlers.

        ``ray.init`` installs Ray's C++ failure handler for SIGTERM, which prints a stack
        dump and kills the driver with no summary and trials left RUNNING; call this after
        starting or joining Ray.
        """
        if self._previous and threading.current_thread() is threading.main_thread():
            for sig in self._previous:
                signal.signal(sig, self._handler)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def ignored(self) -> Iterator[None]:
        """Ignores further interrupts while cleaning up."""
        if not self._previous:
            yield
            return
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)
        try:
            yield
        finally:
            for sig in self._previous:
                signal.signal(sig, self._handler)


def exit_code(signal_name: str) -> int:
    """The exit code of a run stopped by a signal: 143 for SIGTERM, else 130 (Ctrl-C)."""
    return 143 if signal_name == "SIGTERM" else 130
