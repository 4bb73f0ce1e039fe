"""A sampler wrapper that proposes only candidates worth evaluating.

Several parameter vectors decode to one configuration, and CKA prunes part of the space. A
plain sampler would keep proposing explored or pruned configurations (multi-objective TPE
and NSGA-II ignore PRUNED trials), filling the study with repeats. :class:`FilteredSampler`
draws from the wrapped sampler until the decoded candidate is accepted (not evaluated, not
under evaluation, not pruned), and after ``max_tries`` rejections falls back to a random
unexplored candidate. Only accepted proposals become trials.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from search.space import Candidate, SearchSpace


class FilteredSampler(BaseSampler):
    """Wraps a sampler so that every proposal decodes to an acceptable candidate.

    Args:
        inner: The sampler that models the objectives (TPE, NSGA-II, random).
        space: The search space (its four distributions are sampled jointly).
        accept: Whether a decoded candidate may be proposed.
        fallback: A candidate to propose when ``inner`` keeps proposing rejected ones.
        max_tries: Proposals drawn from ``inner`` before the fallback.
    """

    def __init__(
        self,
        inner: BaseSampler,
        space: SearchSpace,
        accept: Callable[[Candidate], bool],
        fallback: Callable[[], Candidate | None],
        *,
        max_tries: int = 64,
    ) -> None:
        self.inner = inner
        self.space = space
        self.accept = accept
        self.fallback = fallback
        self.max_tries = max_tries
        self.fallbacks = 0

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self.space.distributions()

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
        for _ in range(self.max_tries):
            params = self._propose(study, trial)
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
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

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
