"""Helpers shared by the tests: where MNIST is, and a small quick config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_vae.config import Config

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if "PYRO_VAE_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["PYRO_VAE_DATA"] = str(SHARED_DATA)


def mnist_dir() -> Path | None:
    """The folder holding MNIST/raw, or None when this machine has no MNIST."""
    root = os.environ.get("PYRO_VAE_DATA")
    if root and (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        return Path(root)
    return None


needs_mnist = pytest.mark.skipif(
    mnist_dir() is None,
    reason="MNIST not found: set PYRO_VAE_DATA to a folder with MNIST/raw (CI uses ../shared/data)",
)


def small_config(**sections) -> Config:
    """A quick digits config: small MLP, few epochs; ``sections`` override fields by section."""
    config = Config()
    config.model.hidden = [64]
    config.model.latent_dim = 8
    config.train.epochs = 3
    config.train.batch_size = 64
    config.inference.iw_samples = 20
    config.train.validate = True  # Pyro's validation stays on in tests
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(config, section), key, value)
    return config


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """``pyro-vae ARGS`` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "pyro_vae", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
