"""Shared fixtures: Pyro validation on, a fresh param store, one trained digits run."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest

from .helpers import small_config


@pytest.fixture(autouse=True)
def pyro_validation():
    pyro.enable_validation(True)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A digits run trained for 30 epochs (a few seconds), shared read-only by tests."""
    from pyro_vae import train

    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    train(small_config(train={"epochs": 30}), run_dir, progress=False)
    return run_dir
