"""One local Ray cluster for the whole test session (bound to 127.0.0.1)."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.ERROR,
            _node_ip_address="127.0.0.1",
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_table(tmp_path_factory):
    """A latency table of this host for ``tests/search/data/tiny_study.yaml`` (torch only)."""
    from pathlib import Path

    from search.profile import main

    study = Path(__file__).resolve().parent / "data" / "tiny_study.yaml"
    out = tmp_path_factory.mktemp("tiny_table") / "dev.json"
    argv = ["--study", str(study), "--device", "dev", "--out", str(out), "--runtimes", "torch"]
    rc = main([*argv, "--rounds", "3", "--warmup", "1", "--calibration", "4", "--threads", "1"])
    assert rc == 0
    return out
