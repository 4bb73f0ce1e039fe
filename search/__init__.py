"""Which candidates to try, where, and what to hand each device.

The package is layered by the stage of a run; each layer imports only the layers below it
(``tests/test_architecture.py`` enforces the order) and is used through its public face
(its ``__init__``):

- :mod:`search.core`: the trial record, the search-space encoding, budgets, text;
- :mod:`search.inputs`: the study YAML, the budget CSV, latency tables, the plan;
- :mod:`search.store`: the Optuna RDB storage, opening studies, liveness;
- :mod:`search.strategy`: the Ray Tune searchers of both rungs and their policies;
- :mod:`search.workers`: what Ray's worker processes run;
- :mod:`search.execution`: the driver: pair signals, the run session, Ray Tune rounds;
- :mod:`search.delivery`: picks, exports, the report, the summary, ONNX, ``--check``.

The commands sit on top: ``python -m search.run``, ``python -m search.export`` and
``python -m search.profile``.
"""
