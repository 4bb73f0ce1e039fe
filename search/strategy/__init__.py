"""The strategy: which candidates to evaluate, and how each outcome is recorded.

Both rungs' Ray Tune searchers share one lifecycle (:mod:`~search.strategy.base`): rung 0
(:mod:`~search.strategy.rung0`) asks the Optuna study for candidates through a filtered
sampler (:mod:`~search.strategy.sampler`), a ledger of what is done or running
(:mod:`~search.strategy.ledger`) and a claim policy for shared studies
(:mod:`~search.strategy.claims`); rung 1 (:mod:`~search.strategy.rung1`) fine-tunes the
stitches the promotion policy picks (:mod:`~search.strategy.promotion`). The recorder
writes outcomes; pruning and set-up record what is never evaluated. Strategies never
train: the workers evaluate.
"""

from search.strategy.base import (
    WORKER_LOST,
    RetryCounter,
    StudySearcher,
    stops_on_storage_loss,
)
from search.strategy.claims import Claim, ClaimPolicy
from search.strategy.family import (
    FAMILY_RUNG,
    FAMILY_SUFFIX,
    best_of_rungs,
    family_anchors,
    family_members,
    family_study_name,
    family_trials,
    record_family,
    spread_stitches,
)
from search.strategy.ledger import Ledger
from search.strategy.promotion import (
    RUNG1_SUFFIX,
    best_rung,
    promotion_order,
    rung1_study_name,
    rung1_trials,
)
from search.strategy.pruning import (
    CkaMatrices,
    PruningSignals,
    cka_at,
    pruned_reasons,
    record_pruned_trials,
)
from search.strategy.recorder import BUDGET_CONSTRAINT, Recorder, objective_values
from search.strategy.rung0 import SearcherSettings, StitchSearcher
from search.strategy.rung1 import Rung1Searcher, with_lower_costs
from search.strategy.sampler import (
    SAMPLERS,
    FilteredSampler,
    install_sampler,
    make_sampler,
    stitch_trials,
)
from search.strategy.setup import setup_study

__all__ = [
    "BUDGET_CONSTRAINT",
    "FAMILY_RUNG",
    "FAMILY_SUFFIX",
    "RUNG1_SUFFIX",
    "SAMPLERS",
    "WORKER_LOST",
    "CkaMatrices",
    "Claim",
    "ClaimPolicy",
    "FilteredSampler",
    "Ledger",
    "PruningSignals",
    "Recorder",
    "RetryCounter",
    "Rung1Searcher",
    "SearcherSettings",
    "StitchSearcher",
    "StudySearcher",
    "best_of_rungs",
    "best_rung",
    "cka_at",
    "family_anchors",
    "family_members",
    "family_study_name",
    "family_trials",
    "install_sampler",
    "make_sampler",
    "objective_values",
    "promotion_order",
    "pruned_reasons",
    "record_family",
    "record_pruned_trials",
    "rung1_study_name",
    "rung1_trials",
    "setup_study",
    "spread_stitches",
    "stitch_trials",
    "stops_on_storage_loss",
    "with_lower_costs",
]
