"""The data errors and :class:`DataRecipe`: everything needed to rebuild a dataset's splits.

A recipe is a small frozen value with a JSON round trip, so that a search can record it in
its exports and ``python -m search.export --check`` can rebuild exactly the same splits with
:func:`evaluators.make_splits`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from space import InputError

#: The datasets a recipe can describe.
#: ``images`` is a folder of unlabelled images (a label-free study; see
#: :mod:`evaluators.data.images`).
DATASETS = ("fashion-mnist", "imagefolder", "synthetic", "images")
#: The splits whose teacher labels a recipe records.
LABELLED_SPLITS = ("validation", "test")

_COUNTS = ("calibration", "validation", "test", "batch_size", "num_classes")


class DataError(InputError):
    """The data cannot be found or read, or does not fit the requested splits.

    ``str(err)`` names the directory or file, echoes the bad value and says the fix.
    """


class RecipeError(DataError):
    """A field of a :class:`DataRecipe` is invalid.

    Attributes:
        field: The recipe field at fault (``"batch_size"``).
        problem: What is wrong with it.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"data recipe field {field!r}: {problem}")

    def __reduce__(self):
        return (type(self), (self.field, self.problem))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataRecipe:
    """Everything needed to rebuild the calibration, validation and test splits of a dataset.

    ``None`` in a size field means the builder's default; the recipe a
    :class:`~evaluators.DataSplits` records (``splits.recipe``) has every size filled in and an
    absolute ``root``, so rebuilding from it gives the same data (the same ``identity``).

    Attributes:
        dataset: ``"fashion-mnist"``, ``"imagefolder"``, ``"synthetic"`` or ``"images"``.
        root: Data directory. Fashion-MNIST: the IDX folder (None: searched for, see
            :func:`~evaluators.find_fashion_mnist`); ImageFolder: the tree holding ``train/``
            and ``val/`` (required); images: the folder of images (required); synthetic:
            ignored.
        calibration: Calibration images.
        validation: Validation images.
        test: Test images; None: the whole test split (Fashion-MNIST, ImageFolder) or as
            many as ``validation`` (synthetic data has no fixed test split).
        batch_size: Batch size of every loader.
        seed: Seed of the split permutation (synthetic: of the generated images).
        input_size: ``(C, H, W)`` of the batches. ImageFolder data takes the anchor's; when
            set it must match it.
        num_classes: Synthetic: number of classes. ImageFolder: the expected class count
            (None: only the anchor's head is checked). Fashion-MNIST: None or 10.
        teacher: Images only: the anchor whose top-1 predictions label the images (a
            label-free study measures agreement with it).
        teacher_labels: Images only: the teacher's top-1 class of every validation and test
            image, in split order (``{"validation": (...), "test": (...)}``), so that a
            rebuild measures agreement without running the teacher.
        transform: Images only: the timm data config the images were transformed with
            (``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``,
            ``crop_mode``), so that a rebuild gives the same images whichever anchor it is
            given.
    """

    dataset: str
    root: str | None = None
    calibration: int | None = None
    validation: int | None = None
    test: int | None = None
    batch_size: int | None = None
    seed: int = 0
    input_size: tuple[int, int, int] | None = None
    num_classes: int | None = None
    teacher: str | None = None
    teacher_labels: Mapping[str, tuple[int, ...]] | None = None
    transform: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            expected = ", ".join(repr(d) for d in DATASETS)
            raise RecipeError("dataset", f"must be one of {expected}, got {self.dataset!r}")
        if self.root is not None:
            if not isinstance(self.root, str | os.PathLike) or not str(self.root):
                raise RecipeError("root", f"must be a directory path or null, got {self.root!r}")
            object.__setattr__(self, "root", str(self.root))
        for name in _COUNTS:
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise RecipeError(name, f"must be an integer >= 1 or null, got {value!r}")
        if not _is_int(self.seed):
            raise RecipeError("seed", f"must be an integer, got {self.seed!r}")
        if self.input_size is not None:
            size = self.input_size
            if (
                isinstance(size, str | bytes)
                or not hasattr(size, "__len__")
                or len(size) != 3
                or not all(_is_int(v) and v >= 1 for v in size)
            ):
                raise RecipeError(
                    "input_size", f"must be [C, H, W] positive integers or null, got {size!r}"
                )
            object.__setattr__(self, "input_size", tuple(size))
        if self.dataset == "fashion-mnist" and self.num_classes not in (None, 10):
            raise RecipeError(
                "num_classes", f"Fashion-MNIST has 10 classes, got {self.num_classes!r}"
            )

        self._check_teacher()

    def _check_teacher(self) -> None:
        if self.dataset != "images":
            for name in ("teacher", "teacher_labels", "transform"):
                if getattr(self, name) is not None:
                    raise RecipeError(name, f"only images data has a teacher, not {self.dataset!r}")
            return
        if self.transform is not None and not isinstance(self.transform, Mapping):
            raise RecipeError(
                "transform", f"must be a timm data config mapping or null, got {self.transform!r}"
            )
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher):
            raise RecipeError("teacher", f"must be an anchor name or null, got {self.teacher!r}")
        labels = self.teacher_labels
        if labels is None:
            return
        if self.teacher is None:
            raise RecipeError("teacher_labels", "recorded without the teacher that gave them")
        if not isinstance(labels, Mapping) or sorted(labels) != sorted(LABELLED_SPLITS):
            keys = sorted(labels) if isinstance(labels, Mapping) else labels
            raise RecipeError(
                "teacher_labels", f"must map {list(LABELLED_SPLITS)} to class lists, got {keys!r}"
            )
        fixed = {}
        for split in LABELLED_SPLITS:
            values = labels[split]
            if isinstance(values, str | bytes | Mapping) or not all(
                _is_int(v) and v >= 0 for v in values
            ):
                raise RecipeError(f"teacher_labels.{split}", "must be a list of class indices >= 0")
            fixed[split] = tuple(values)
        object.__setattr__(self, "teacher_labels", fixed)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as a JSON-compatible mapping.

        Every field (``input_size`` as a list), except ``teacher``, ``teacher_labels`` and
        ``transform`` when they are null (recipes of labelled data read as before).
        """
        doc = dataclasses.asdict(self)
        for name in ("teacher", "teacher_labels", "transform"):
            if doc[name] is None:
                del doc[name]
        if self.input_size is not None:
            doc["input_size"] = list(self.input_size)
        if self.teacher_labels is not None:
            doc["teacher_labels"] = {k: list(v) for k, v in self.teacher_labels.items()}
        return doc

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DataRecipe:
        """Reads a recipe written by :meth:`to_dict`, validating every field.

        Raises:
            DataError: ``doc`` is not a mapping.
            RecipeError: A field is missing (``dataset``), unknown or invalid.
        """
        if not isinstance(doc, Mapping):
            raise DataError(f"a data recipe must be a mapping, got {type(doc).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in doc:
            if key not in known:
                raise RecipeError(str(key), f"unknown field; expected {', '.join(known)}")
        if "dataset" not in doc:
            raise RecipeError("dataset", "missing")
        return cls(**doc)
