"""Data: calibration, validation and test splits for stitch fitting and evaluation.

Splits follow one rule for every dataset: **validation** and **calibration** are carved from
the *training* split with a seeded permutation, validation is what the search optimises, and
the **test** split is touched only for final reporting. For Fashion-MNIST the first
:data:`FMNIST_HOLDOUT` images of the permutation (seed 0) are held out of anchor training
(the default zoo is trained on the other 50,000), so validation images were never seen by the
shipped anchors; calibration images come from the training remainder.

A :class:`DataRecipe` says which data and splits; :func:`make_splits` builds them, and every
:class:`DataSplits` records the recipe that rebuilds it (``splits.recipe``).
"""

from evaluators.data.factory import make_splits
from evaluators.data.fashion_mnist import (
    FMNIST_CLASSES,
    FMNIST_DEBIAN_DIR,
    FMNIST_ENV,
    FMNIST_HOLDOUT,
    FMNIST_MEAN,
    FMNIST_SPLIT_SEED,
    FMNIST_STD,
    fashion_mnist_splits,
    find_fashion_mnist,
    load_fashion_mnist,
)
from evaluators.data.imagefolder import imagefolder_splits
from evaluators.data.images import IMAGE_SUFFIXES, UNLABELLED, ImageFiles, find_images, image_splits
from evaluators.data.loaders import ArrayLoader, DatasetLoader, DataSplits
from evaluators.data.recipe import DATASETS, DataError, DataRecipe, RecipeError
from evaluators.data.synthetic import synthetic_splits

__all__ = [
    "DATASETS",
    "FMNIST_CLASSES",
    "FMNIST_DEBIAN_DIR",
    "FMNIST_ENV",
    "FMNIST_HOLDOUT",
    "FMNIST_MEAN",
    "FMNIST_SPLIT_SEED",
    "FMNIST_STD",
    "IMAGE_SUFFIXES",
    "UNLABELLED",
    "ArrayLoader",
    "DataError",
    "DataRecipe",
    "DataSplits",
    "DatasetLoader",
    "ImageFiles",
    "RecipeError",
    "fashion_mnist_splits",
    "find_fashion_mnist",
    "find_images",
    "image_splits",
    "imagefolder_splits",
    "load_fashion_mnist",
    "make_splits",
    "synthetic_splits",
]
