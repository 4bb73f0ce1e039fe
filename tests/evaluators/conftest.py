"""Evaluator tests run torch single-threaded: the suite's models are tiny, and on a shared
2-core host more threads only contend."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
