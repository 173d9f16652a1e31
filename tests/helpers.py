"""Helpers shared by the tests: where MNIST is, and a small quick config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyro
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


def tiny_vae(image_shape=(8, 8), latent_dim=4, hidden=32):
    """A user's own Pyro program, written from scratch with the library's parts: what
    ``pyro_vae.fit`` and a plugin's model kind train (built here, in a function, so that
    importing this module does not import torch)."""
    import math

    import pyro
    import torch

    from pyro_vae import PyroProgram, guides, likelihoods
    from pyro_vae.components.nets import mlp

    class TinyVAE(PyroProgram):
        pyro_name = "tiny"

        def __init__(self):
            super().__init__()
            self.image_shape, self.data_dim = tuple(image_shape), math.prod(image_shape)
            self.posterior = guides.build("normal", latent_dim=latent_dim)
            self.likelihood = likelihoods.build("bernoulli", data_dim=self.data_dim)
            self.encoder = mlp([self.data_dim, hidden, self.posterior.param_dim])
            self.decoder = mlp([latent_dim, hidden, self.data_dim])
            self.register_buffer("zeros", torch.zeros(latent_dim))

        def model_modules(self):
            return (self.decoder, self.likelihood)

        def model(self, x, size=None):
            self.register("model")
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", pyro.distributions.Normal(self.zeros, 1.0).to_event(1))
                pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

        def guide(self, x, size=None):
            self.register("guide")
            with pyro.plate("data", x.shape[0]):
                pyro.sample("z", self.posterior(self.encoder(x)))

    return TinyVAE()


def static_digits():
    """The bundled digits' test images, binarized once, and their labels."""
    from pyro_vae import ImageBatches, load_dataset

    data = ImageBatches(load_dataset("digits"), "static")
    return data.test_images, data.dataset.test_labels


def one_hot(labels, n=10):
    import torch

    return torch.nn.functional.one_hot(labels, n).float()


def pyro_and_our_loss(params, pyro_step, our_loss, seed=1):
    """(loss, gradients) of Pyro's ``loss_and_grads`` call ``pyro_step()`` and of our
    differentiable ``our_loss()``, each from the same seed: for checking that a loss we
    trace is Pyro's in value and gradient."""
    results = []
    for ours in (False, True):
        pyro.set_rng_seed(seed)
        for p in params:
            p.grad = None
        if ours:
            loss = our_loss()
            loss.backward()
            loss = loss.item()
        else:
            loss = pyro_step()
        results.append((loss, [p.grad for p in params]))
    return results
