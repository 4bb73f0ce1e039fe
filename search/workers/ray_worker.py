"""What a Ray worker runs for one trial: evaluate one candidate and report its metrics.

A Ray Tune worker (an actor, reused across trials) does not evaluate candidates itself: it
keeps one *evaluation process*, a child Python process that loads the anchors and data once
and then evaluates candidates on request. This makes the study's per-trial time limit hard:

- the worker waits for an evaluation at most ``trial_timeout_s`` seconds; past that it kills
  the evaluation process (a stuck evaluation cannot keep running, nor be reused by the next
  trial), reports ``{"error": "timed out after ... s"}`` and the trial is recorded as failed;
- an evaluation that raises, or yields NaN, comes back as an error or a non-finite metric
  and the driver records the trial as failed with the reason;
- an evaluation process that dies mid-trial (killed, out of memory) makes the worker raise,
  as a worker process that dies does, so Ray Tune retries the trial on a fresh worker up to
  ``FailureConfig(max_failures)`` (the study's ``max_retries``) times.

The worker process itself imports neither torch nor the evaluators (this module imports
nothing of the project); only the evaluation process (:mod:`search.workers.evaluation`) does, once.

Test-only fault injection (read by the worker; never set it in production): with
``STITCHSEARCH_TEST_FAULT=raise,nan,sleep:30,die,crash`` and ``STITCHSEARCH_TEST_FAULT_DIR``
naming a folder shared by every worker, the k-th distinct trial to start gets the k-th fault
(retries of a trial get its fault again; ``none`` for no fault; trials after the last fault
get none): ``raise`` raises in the evaluation, ``nan`` yields
a NaN accuracy, ``sleep:N`` sleeps N seconds in the evaluation, ``die`` SIGKILLs the Ray
worker process, ``crash`` SIGKILLs the evaluation process. Each attempt at a trial appends a
line to ``attempts-<trial number>`` in that folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ray import tune

#: Environment variables of the test-only fault injection (see the module docstring).
FAULT_ENV = "STITCHSEARCH_TEST_FAULT"
FAULT_DIR_ENV = "STITCHSEARCH_TEST_FAULT_DIR"

#: Longest wait for an evaluation process to import, load the anchors and say it is ready.
STARTUP_TIMEOUT_S = 600.0

_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class WorkerJob:
    """What every trial of a run shares: the pickled context and the limits.

    Attributes:
        context: ``pickle.dumps(search.workers.evaluation.TrialContext)``; only the evaluation
            process unpickles it.
        timeout_s: The per-trial time limit (the study's ``trial_timeout_s``).
        test_env: ``STITCHSEARCH_TEST_*`` variables of the driver (test-only fault
            injection), handed to the workers of an already running cluster.
    """

    context: bytes
    timeout_s: float
    test_env: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Identifies the context: an evaluation process serves one context."""
        return hashlib.sha256(self.context).hexdigest()

    @classmethod
    def build(cls, ctx: Any, timeout_s: float) -> WorkerJob:
        """Pickles ``ctx`` and picks up the test-only variables of this process."""
        test_env = {k: v for k, v in os.environ.items() if k.startswith("STITCHSEARCH_TEST_")}
        return cls(pickle.dumps(ctx), float(timeout_s), test_env)


def _exit_status(code: int | None) -> str:
    if code is None:
        return "an unknown status"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"


class EvaluationProcessDied(RuntimeError):
    """The evaluation process died mid-trial (Ray Tune retries the trial)."""


class EvaluationProcess:
    """The worker's handle on its evaluation process.

    Args:
        job: The run's shared job (context, limits, test environment).
    """

    def __init__(self, job: WorkerJob) -> None:
        self.key = job.key
        parent_end, child_end = socket.socketpair()
        env = {**os.environ, **job.test_env}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        with child_end:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "search.workers.evaluation", str(child_end.fileno())],
                pass_fds=(child_end.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        self.conn = Connection(parent_end.detach())
        self.conn.send_bytes(job.context)
        self._ready = False

    @property
    def pid(self) -> int:
        """The evaluation process's id."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.poll() is None

    def _receive(self, timeout: float) -> tuple[str, Any] | None:
        """The next message, or None when ``timeout`` passed first.

        Raises:
            EvaluationProcessDied: The process exited instead of answering.
        """
        try:
            if not self.conn.poll(timeout):
                return None
            return self.conn.recv()
        except (EOFError, OSError):
            try:
                code = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # it closed the socket but hangs: kill it
                self.kill()
                code = self.proc.returncode
            how = _exit_status(code)
            raise EvaluationProcessDied(
                f"the evaluation process (pid {self.proc.pid}) died mid-trial with {how}"
            ) from None

    def evaluate(
        self, config: dict[str, Any], timeout: float, fault: str | None = None
    ) -> dict[str, Any] | None:
        """Evaluates a candidate; None when it took longer than ``timeout`` seconds.

        Raises:
            EvaluationProcessDied: The process died mid-trial.
        """
        if not self._ready:
            msg = self._receive(max(STARTUP_TIMEOUT_S, timeout))
            if msg is None:
                self.kill()
                return {"error": f"the evaluation process did not start in {STARTUP_TIMEOUT_S} s"}
            if msg[0] == "error":
                return {"error": msg[1]}
            self._ready = True
        self.conn.send((config, fault))
        msg = self._receive(timeout)
        return None if msg is None else msg[1]

    def kill(self) -> None:
        """Kills the process and waits for it."""
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.conn.close()


_PROCESS: EvaluationProcess | None = None


def _evaluation_process(job: WorkerJob) -> EvaluationProcess:
    """This worker's evaluation process for ``job`` (started when missing or stale)."""
    global _PROCESS
    if _PROCESS is not None and (_PROCESS.key != job.key or not _PROCESS.alive()):
        _PROCESS.kill()
        _PROCESS = None
    if _PROCESS is None:
        _PROCESS = EvaluationProcess(job)
    return _PROCESS


def evaluate_with_limit(config: dict[str, Any], job: WorkerJob) -> dict[str, Any]:
    """Evaluates a candidate in the evaluation process, killing it past the time limit.

    Raises:
        EvaluationProcessDied: The evaluation process died mid-trial.
    """
    global _PROCESS
    fault = _test_fault(config.get("number"), job.test_env)
    if fault == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    proc = _evaluation_process(job)
    start = time.perf_counter()
    try:
        result = proc.evaluate(config, job.timeout_s, fault)
    except EvaluationProcessDied:
        _PROCESS = None
        raise
    if result is None:
        proc.kill()
        _PROCESS = None
        result = {
            "error": f"timed out after {job.timeout_s:g} s (the study's trial_timeout_s); "
            "the evaluation was stopped",
            "timed_out": True,
            "trial_seconds": round(time.perf_counter() - start, 3),
            "host": socket.gethostname(),
            "eval_pid": proc.pid,
        }
    return result


def trainable(config: dict[str, Any], job: WorkerJob) -> None:
    """Ray Tune function trainable: one report per trial.

    Raises:
        EvaluationProcessDied: After reporting ``{"worker_error": ...}``, so that Ray Tune
            retries the trial and the driver knows why.
    """
    try:
        result = evaluate_with_limit(config, job)
    except EvaluationProcessDied as e:
        tune.report({"worker_error": str(e)})
        raise
    tune.report(result)


def _test_fault(number: Any, env: dict[str, str]) -> str | None:
    """The test-only fault for trial ``number`` (see the module docstring), or None."""
    spec = env.get(FAULT_ENV) or os.environ.get(FAULT_ENV)
    folder = env.get(FAULT_DIR_ENV) or os.environ.get(FAULT_DIR_ENV)
    if not spec or not folder or number is None:
        return None
    d = Path(folder)
    with open(d / f"attempts-{number}", "a") as f:
        f.write(f"{os.getpid()}\n")
    mine = d / f"trial-{number}"
    if mine.exists():
        return mine.read_text() or None
    for i, fault in enumerate(s.strip() for s in spec.split(",")):
        try:
            fd = os.open(d / f"slot-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, str(number).encode())
        os.close(fd)
        mine.write_text(fault)
        return fault
    mine.write_text("")
    return None
