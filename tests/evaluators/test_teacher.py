"""Label-free data: a teacher's predictions label the images; agreement is accuracy on them."""

from __future__ import annotations

import pytest
import torch

from evaluators import (
    DataError,
    FinetuneSettings,
    accuracy,
    finetune_stitch_layer,
    fit_stitch,
    label_by_teacher,
    largest_anchor,
    make_splits,
    synthetic_splits,
    top1_predictions,
)
from evaluators.data import UNLABELLED, image_splits
from space import StitchConfig, build_stitched
from tests.conftest import make_tiny
from tests.evaluators.test_images import write_pngs


@pytest.fixture(scope="module")
def anchors():
    return {"resnet": make_tiny("resnet"), "vit": make_tiny("vit")}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, anchors):
    root = write_pngs(tmp_path_factory.mktemp("images"), 40)
    plain = image_splits(root, anchors["resnet"], validation=12, test=10, calibration=8)
    out = label_by_teacher(plain, anchors["vit"], name="vit", anchor=anchors["resnet"])
    return plain, out


def test_labels_are_the_teachers_top1_and_it_agrees_fully(labelled, anchors) -> None:
    plain, out = labelled
    vit = anchors["vit"]
    expected = top1_predictions(vit.model, plain.validation, vit.input_size)
    got = [int(v) for _, y in out.validation for v in y]
    assert got == expected
    assert accuracy(vit.model, out.validation, input_size=vit.input_size).top1 == 100.0
    assert accuracy(vit.model, out.test, input_size=vit.input_size).top1 == 100.0
    other = accuracy(anchors["resnet"].model, out.validation).top1
    assert 0.0 <= other <= 100.0
    # Calibration and training images stay unlabelled; the identity names the labels.
    assert all((y == UNLABELLED).all() for _, y in out.train)
    assert out.identity != plain.identity
    assert out.recipe.teacher == "vit"
    assert len(out.recipe.teacher_labels["test"]) == 10


def test_recipe_rebuilds_the_labels_without_the_teacher(labelled, anchors) -> None:
    _, out = labelled
    # Rebuilt with another anchor (another timm data config): the recorded transform wins.
    rebuilt = make_splits(out.recipe, anchor=anchors["vit"])
    assert rebuilt.identity == out.identity
    x_out, _ = next(iter(out.test))
    x_rebuilt, _ = next(iter(rebuilt.test))
    assert torch.equal(x_out, x_rebuilt)
    assert [int(v) for _, y in rebuilt.test for v in y] == list(out.recipe.teacher_labels["test"])


def test_only_images_data_takes_a_teacher(anchors) -> None:
    with pytest.raises(DataError, match="only images data"):
        label_by_teacher(synthetic_splits(), anchors["vit"], name="vit", anchor=anchors["vit"])


def test_largest_anchor_counts_macs(anchors) -> None:
    from evaluators import count_macs

    macs = {n: count_macs(a.model, a.input_size) for n, a in anchors.items()}
    assert largest_anchor(anchors) == max(macs, key=macs.get)


def test_pure_distillation_trains_on_unlabelled_images(labelled, anchors) -> None:
    _, out = labelled
    front, back = anchors["resnet"], anchors["vit"]
    net = build_stitched(front, back, StitchConfig(front.name, back.name, 1, 1))
    fit_stitch(net, out.calibration)
    before = {k: v.clone() for k, v in net.stitch.state_dict().items()}
    settings = FinetuneSettings(steps=4, batch_size=8, distill=1.0)
    result = finetune_stitch_layer(net, out.train, settings, teacher=back)
    assert result.steps == 4
    assert all(torch.isfinite(torch.tensor(result.loss_curve)))
    changed = any(not torch.equal(before[k], v) for k, v in net.stitch.state_dict().items())
    assert changed
    # Without distillation the unlabelled images (-1) cannot train.
    with pytest.raises((IndexError, RuntimeError, ValueError)):
        finetune_stitch_layer(net, out.train, FinetuneSettings(steps=1, batch_size=8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_teacher_labels_cpu_images(labelled) -> None:
    # Regression: top1_predictions moves the loader's CPU images to the teacher's device.
    plain, _ = labelled
    vit = make_tiny("vit")
    on_cpu = top1_predictions(vit.model, plain.validation, vit.input_size)
    vit.model.to("cuda")
    try:
        on_gpu = top1_predictions(vit.model, plain.validation, vit.input_size)
    finally:
        vit.model.to("cpu")
    assert next(vit.model.parameters()).device.type == "cpu"
    assert len(on_gpu) == len(on_cpu) == plain.validation.num_images
    # The same classes up to float differences between the kernels: nearly all equal.
    assert sum(a == b for a, b in zip(on_gpu, on_cpu, strict=True)) >= len(on_cpu) - 1
