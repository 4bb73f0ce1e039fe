"""Developer tools on top of every package (they may import space, evaluators and search).

``python -m tools.train_zoo`` reproduces the default anchor zoo shipped in ``space/zoo``.
"""
