"""The evaluation process's choice of device (issue 26, 5d)."""

from __future__ import annotations

import pytest
import torch

from evaluators import synthetic_splits
from search.workers.evaluation import TrialContext, run_candidate, trial_device
from space import Candidate


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is usable here")
def test_an_assigned_gpu_without_cuda_fails_the_trial_with_the_reason() -> None:
    data = synthetic_splits(num_classes=4, calibration=8, validation=8, test=8)
    specs = {"resnet10t": {"num_classes": 4, "input_size": (3, 32, 32)}}
    config = {"candidate": Candidate.anchor("resnet10t").to_json()}
    out = run_candidate(config, TrialContext(anchors=specs, data=data, use_gpu=True))
    error = out["error"]
    assert error.startswith(
        "RuntimeError: this trial's worker was assigned a GPU, but CUDA is not usable in its "
        "evaluation process"
    )
    assert "it is not measured on the CPU instead" in error and "\n" not in error
    assert "macs" not in out  # nothing was measured
    ok = run_candidate(config, TrialContext(anchors=specs, data=data, use_gpu=False))
    assert "error" not in ok and ok["device"] == "cpu"


def test_the_device_follows_the_assignment() -> None:
    assert trial_device(False) == "cpu"
    if torch.cuda.is_available():
        assert trial_device(True) == "cuda"
    else:
        with pytest.raises(RuntimeError, match="assigned a GPU, but CUDA is not usable"):
            trial_device(True)
