"""Whether this driver may evaluate a candidate it has just asked the study for.

Several drivers may share one study. Each asks for a trial, and only then claims it against
every driver's trials: a trial that repeats a configuration evaluated before, or one another
driver evaluates now, or that would exceed the requested total, is not dispatched.
"""

from __future__ import annotations

import time
from typing import Literal, NamedTuple

import optuna
from optuna.trial import TrialState

from search.core import Attr, is_repeat
from search.store import optuna_access
from space import Candidate

#: How long to wait for a RUNNING trial asked just before ours to record its configuration.
_WAIT_S = 2.0
#: A keyless RUNNING trial started longer ago than this belongs to a driver that died.
_KEYLESS_S = 10.0
_POLL_S = 0.05

Verdict = Literal["ok", "done", "running", "surplus"]


class Claim(NamedTuple):
    """The outcome of a claim.

    Attributes:
        verdict: ``"ok"`` (dispatch it), ``"done"`` (evaluated before: answer from storage),
            ``"running"`` (another trial evaluates it now) or ``"surplus"`` (the study holds
            the requested total already).
        number: For ``"done"``, the trial that evaluated the configuration.
    """

    verdict: Verdict
    number: int | None = None


class ClaimPolicy:
    """Decides, against every driver's trials, whether this driver may evaluate a candidate.

    Trials are ordered by their storage id: of two trials asked at the same time for the same
    configuration, or for the last free slot of the total, the earlier one wins. A RUNNING
    trial asked just before this one whose configuration is not recorded yet is waited for
    (briefly).

    Args:
        study: The study (other drivers may share it).
        total: How many candidate evaluations the study should hold (all drivers together).
    """

    def __init__(self, study: optuna.Study, total: int) -> None:
        self.study = study
        self.total = total

    def decide(self, trial: optuna.Trial, c: Candidate) -> Claim:
        """Claims ``trial``, asked for and annotated with candidate ``c``."""
        mine = optuna_access.storage_id(trial)
        deadline = time.monotonic() + _WAIT_S
        recent = time.time() - _KEYLESS_S
        while True:
            trials = optuna_access.trials(self.study, (TrialState.COMPLETE, TrialState.RUNNING))
            evaluated = ahead = 0
            done: int | None = None
            running = unknown = False
            for t in trials:
                if optuna_access.storage_id(t) == mine:
                    continue
                key = t.user_attrs.get(Attr.KEY)
                if t.state == TrialState.COMPLETE:
                    if not is_repeat(t):
                        evaluated += 1
                        if key == c.key:
                            done = t.number
                elif optuna_access.storage_id(t) < mine:
                    ahead += 1
                    running = running or key == c.key
                    started = t.datetime_start.timestamp() if t.datetime_start else 0.0
                    unknown = unknown or (key is None and started > recent)
            if not unknown or time.monotonic() > deadline:
                break
            time.sleep(_POLL_S)
        if done is not None:
            return Claim("done", done)
        if running:
            return Claim("running")
        if evaluated + ahead >= self.total:
            return Claim("surplus")
        return Claim("ok")
