"""The study's sampler: one that models the objectives, filtered to worthwhile candidates.

Several parameter vectors decode to one configuration, and CKA prunes part of the space. A
plain sampler would keep proposing explored or pruned configurations (multi-objective TPE
and NSGA-II ignore PRUNED trials), filling the study with repeats. :class:`FilteredSampler`
draws from the wrapped sampler until the decoded candidate is accepted (not evaluated, not
under evaluation, not pruned), and after ``max_tries`` rejections falls back to a random
unexplored candidate. Only accepted proposals become trials.

The wrapped sampler learns only from the trials ``learn_from`` admits (by default
:func:`stitch_trials`: evaluated stitch points; no anchors, repeats or CKA-pruned points).

- The anchors are evaluated first and never proposed again, yet they dominate a zoo's front:
  a multi-objective TPE that sees them puts its density on ``front == back``, and most of
  its draws decode to an explored anchor.
- Optuna's TPE fills its "good" set with PRUNED trials when too few trials are complete; a
  CKA-pruned point is one judged *not* worth evaluating, so it must not count as good.

Without them the sampler models where good *stitch points* lie (measured in BENCHMARKS.md,
section 2). The trials are read once per proposal, not once per draw.

**One place sets the study's sampler**: :func:`install_sampler`, which the searcher calls
when it is built. The driver builds the sampler that models the objectives once
(:func:`make_sampler`, from the study's ``sampler`` setting) and hands that same object to
the searcher of every round, so that its state carries over; the search assigns
``study.sampler`` nowhere else.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Container, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from search.core import Attr, SearchSpace, is_repeat
from space import Candidate

#: The samplers a study may name (``sampler`` in the study YAML).
SAMPLERS = ("tpe", "nsga2", "random")


def make_sampler(name: str, seed: int, n_objectives: int) -> BaseSampler:
    """The sampler that models the objectives, as a study's ``sampler`` setting names it.

    Args:
        name: ``tpe`` (multivariate TPE, 10 startup trials), ``nsga2`` (population 16) or
            ``random``.
        seed: The sampler's seed.
        n_objectives: How many objectives the study has (every sampler here handles several).

    Raises:
        ValueError: For another name.
    """
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    raise ValueError(f"unknown sampler {name!r}: use one of {', '.join(SAMPLERS)}")


def stitch_trials(trial: FrozenTrial) -> bool:
    """Whether a trial teaches the sampler: a stitch point, not an anchor, repeat or pruned."""
    return (
        trial.state != TrialState.PRUNED
        and trial.user_attrs.get(Attr.KIND) != "anchor"
        and not is_repeat(trial)
    )


class _ModelView:
    """The study as the wrapped sampler sees it: only the admitted trials, read once.

    Everything but the trial lists is the real study (storage, directions, system
    attributes), so samplers that write to the storage keep working. Optuna 5.1's GA samplers
    (NSGA-II) index the list of all trials by trial number, which a filtered list breaks: the
    project requires ``optuna<5.1`` until this view renumbers what it shows.
    """

    def __init__(self, study: optuna.Study, learn_from: Callable[[FrozenTrial], bool]) -> None:
        self._study = study
        self._learn_from = learn_from
        self._cache: dict[tuple[TrialState, ...] | None, list[FrozenTrial]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)

    def _get_trials(
        self,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
        use_cache: bool = False,
    ) -> list[FrozenTrial]:
        key = tuple(sorted(states, key=lambda s: s.value)) if states is not None else None
        if key not in self._cache:
            trials = self._study._get_trials(deepcopy=False, states=states, use_cache=use_cache)
            self._cache[key] = [t for t in trials if self._learn_from(t)]
        trials = self._cache[key]
        return copy.deepcopy(trials) if deepcopy else list(trials)

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        return self._get_trials(deepcopy=deepcopy, states=states)

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials()


class FilteredSampler(BaseSampler):
    """Wraps a sampler so that every proposal decodes to an acceptable candidate.

    Args:
        inner: The sampler that models the objectives (TPE, NSGA-II, random).
        space: The search space (its four distributions are sampled jointly).
        accept: Whether a decoded candidate may be proposed.
        fallback: A candidate to propose when ``inner`` keeps proposing rejected ones.
        max_tries: Proposals drawn from ``inner`` before the fallback.
        learn_from: Which finished trials ``inner`` models (``None``: all of them).
    """

    def __init__(
        self,
        inner: BaseSampler,
        space: SearchSpace,
        accept: Callable[[Candidate], bool],
        fallback: Callable[[], Candidate | None],
        *,
        max_tries: int = 64,
        learn_from: Callable[[FrozenTrial], bool] | None = stitch_trials,
    ) -> None:
        self.inner = inner
        self.learn_from = learn_from
        self.space = space
        self.accept = accept
        self.fallback = fallback
        self.max_tries = max_tries
        self.fallbacks = 0

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.space.distributions()

    def _view(self, study: optuna.Study) -> optuna.Study:
        if self.learn_from is None:
            return study
        return _ModelView(study, self.learn_from)  # type: ignore[return-value]

    def _propose(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, Any]:
        inner_space = self.inner.infer_relative_search_space(study, trial)
        params = dict(self.inner.sample_relative(study, trial, inner_space)) if inner_space else {}
        for name, dist in self.space.distributions().items():
            if name not in params:
                params[name] = self.inner.sample_independent(study, trial, name, dist)
        return params

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        if not search_space:
            return {}
        params: dict[str, Any] = {}
        view = self._view(study)
        for _ in range(self.max_tries):
            params = self._propose(view, trial)
            if self.accept(self.space.decode(params)):
                return params
        c = self.fallback()
        if c is None:
            return params
        self.fallbacks += 1
        return self.space.encode(c)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self.inner.sample_independent(
            self._view(study), trial, param_name, param_distribution
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.inner.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def install_sampler(
    study: optuna.Study,
    inner: BaseSampler,
    space: SearchSpace,
    accept: Callable[[Candidate], bool],
    fallback: Callable[[], Candidate | None],
) -> FilteredSampler:
    """Makes the study propose with ``inner``, filtered (the one place that sets it).

    Args:
        study: The study.
        inner: The sampler that models the objectives (:func:`make_sampler`).
        space: The search space.
        accept: Whether a decoded candidate may be proposed.
        fallback: A candidate to propose when ``inner`` keeps proposing rejected ones.

    Returns:
        The filtered sampler, now ``study.sampler``.

    Raises:
        TypeError: If ``inner`` is itself filtered (pass the sampler it wraps).
    """
    if isinstance(inner, FilteredSampler):
        raise TypeError(
            "install_sampler got a FilteredSampler as the inner sampler; pass the sampler "
            "that models the objectives (e.g. make_sampler(...)), which it wraps"
        )
    study.sampler = FilteredSampler(inner, space, accept, fallback)
    return study.sampler
