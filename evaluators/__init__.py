"""How good and how costly a candidate is: data, CKA, MACs, latency, stitch fitting, accuracy."""

from evaluators.data import (
    ArrayLoader,
    DataSplits,
    fashion_mnist_splits,
    find_fashion_mnist,
    load_fashion_mnist,
    synthetic_splits,
)

__all__ = [
    "ArrayLoader",
    "DataSplits",
    "fashion_mnist_splits",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "synthetic_splits",
]
