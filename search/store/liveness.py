"""Driver liveness: heartbeats in the study, and failing the trials of drivers that died.

Several drivers may share one study. Each writes a heartbeat naming its host and process
into the study's user attributes (``heartbeat:<driver id>``), so that trials left RUNNING by
a driver that died are marked failed: at once when it ran on this machine (its process is
gone), after :data:`STALE_AFTER_S` without a heartbeat when it ran elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.core import Attr
from search.store import optuna_access
from search.store.rdb import cause_line

#: Study user-attribute key prefix of a driver's heartbeat (``heartbeat:<driver id>``).
HEARTBEAT_KEY = "heartbeat:"
#: A driver on another machine whose heartbeat is older than this is taken for dead.
STALE_AFTER_S = 60.0
#: Seconds between two heartbeats of a driver.
HEARTBEAT_INTERVAL_S = 10.0


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (``/proc``), or None when it is gone or a zombie."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def driver_identity() -> dict[str, Any]:
    """Where this driver runs: host, boot, PID namespace, pid and process start time."""
    pidns = None
    with contextlib.suppress(OSError):
        pidns = os.readlink("/proc/self/ns/pid")
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": pidns,
        "pid": os.getpid(),
        "start": _process_start(os.getpid()),
    }


def driver_status(
    beat: Any, *, now: float | None = None, stale_after: float = STALE_AFTER_S
) -> tuple[bool, str]:
    """Whether a driver is alive, from its heartbeat, and why not.

    A driver on this machine (same host, boot and PID namespace) is alive exactly while its
    process is (so a killed driver is recognised at once); one elsewhere while its heartbeat
    is younger than ``stale_after`` seconds. A plain number is an old-style heartbeat time.

    Returns:
        ``(alive, why_not)``: ``why_not`` explains a dead driver (empty when alive).
    """
    now = time.time() if now is None else now
    if isinstance(beat, int | float):
        age = now - float(beat)
        return age < stale_after, f"no heartbeat for {age:.0f} s"
    if not isinstance(beat, Mapping):
        return False, "no heartbeat"
    if beat.get("stopped"):
        return False, "it stopped"
    here = driver_identity()
    same_machine = here["boot"] is not None and all(
        beat.get(k) == here[k] for k in ("host", "boot", "pidns")
    )
    if same_machine and isinstance(beat.get("pid"), int):
        start = _process_start(beat["pid"])
        if start is None or (beat.get("start") is not None and start != beat["start"]):
            return False, f"its process {beat['pid']} on {beat['host']} is gone"
        return True, ""
    age = now - float(beat.get("time", 0.0))
    return age < stale_after, f"no heartbeat for {age:.0f} s"


def heartbeats(study: optuna.Study) -> dict[str, Any]:
    """Driver id -> its last heartbeat, from the study's user attributes."""
    return {
        k.removeprefix(HEARTBEAT_KEY): v
        for k, v in optuna_access.study_attrs(study).items()
        if k.startswith(HEARTBEAT_KEY)
    }


def live_drivers(study: optuna.Study, *, now: float | None = None) -> set[str]:
    """Ids of the drivers of a study that are alive."""
    return {d for d, beat in heartbeats(study).items() if driver_status(beat, now=now)[0]}


def fail_stale_trials(
    study: optuna.Study, *, now: float | None = None, stale_after: float = STALE_AFTER_S
) -> list[int]:
    """Marks RUNNING trials whose driver died as FAIL, with the reason.

    Drivers write ``heartbeat:<driver id>`` into the study's user attributes (see
    :func:`driver_status` for when a driver counts as dead). A RUNNING trial that names no
    driver (its driver died between asking and annotating it) is failed once it is older
    than ``stale_after``.

    Returns:
        The numbers of the trials marked failed.
    """
    now = time.time() if now is None else now
    beats = heartbeats(study)
    status: dict[str, tuple[bool, str]] = {}
    failed = []
    for t in optuna_access.trials(study, (TrialState.RUNNING,)):
        driver = t.user_attrs.get(Attr.DRIVER)
        if driver is None:
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if now - started < stale_after:
                continue
            why = "the trial names no driver"
        else:
            if driver not in status:
                status[driver] = driver_status(beats.get(driver), now=now, stale_after=stale_after)
            alive, why = status[driver]
            if alive:
                continue
            why = f"driver {driver[:8]}: {why}"
        reason = f"left RUNNING by a driver that stopped (killed or crashed): {why}"
        if optuna_access.fail_trial(study, t, reason):  # else finished meanwhile by its driver
            failed.append(t.number)
    return failed


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Heartbeat:
    """Writes this driver's heartbeat (time, host, process) into the study periodically.

    A beat that cannot be written does not stop the run, but it is not silent either: the
    first failed beat of an outage prints one warning line through ``log`` (other drivers
    sharing the study take this driver for dead after :data:`STALE_AFTER_S` without one, at
    least five beats later); a beat written again re-arms the warning.

    Args:
        study: The study.
        driver_id: This driver.
        interval: Seconds between two beats.
        log: Prints the warning line (default: standard error).
    """

    def __init__(
        self,
        study: optuna.Study,
        driver_id: str,
        interval: float = HEARTBEAT_INTERVAL_S,
        *,
        log: Callable[[str], Any] = _stderr,
    ) -> None:
        self.study = study
        self.key = HEARTBEAT_KEY + driver_id
        self.interval = interval
        self.identity = driver_identity()
        self.log = log
        self.failing = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _beat(self, **extra: Any) -> None:
        self.study.set_user_attr(self.key, {**self.identity, "time": time.time(), **extra})

    def beat(self) -> None:
        """Writes one heartbeat; a failure warns once (until a beat succeeds again)."""
        try:
            self._beat()
        except Exception as e:  # the storage being unavailable must not kill the run
            if not self.failing:
                self.failing = True
                self.log(
                    f"warning: this driver's heartbeat could not be written to study "
                    f"{self.study.study_name!r} ({cause_line(e)}); other drivers "
                    f"sharing the study take it for dead after {STALE_AFTER_S:g} s without one "
                    "and fail its running trials"
                )
            return
        self.failing = False

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def __enter__(self) -> Heartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            self._beat(stopped=True)  # its RUNNING trials (if any) are stale now
