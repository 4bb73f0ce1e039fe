"""Benchmarks and evidence: ground truth, search efficiency, pruning, trial cost, scaling, claims.

Run everything with ``python -m benchmarks.run_all``; see ``BENCHMARKS.md``.
"""
