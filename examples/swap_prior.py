"""Swap the prior by name, and add your own with one decorator.

python examples/swap_prior.py
pyro-vae train --plugin examples/swap_prior.py --prior laplace --epochs 30   # same, from the CLI
"""

import pyro.distributions as dist
import torch
from torch import nn

import pyro_vae
from pyro_vae import priors


@priors.register("laplace")
class LaplacePrior(nn.Module):
    """p(z) = prod_d Laplace(z_d | 0, 1/sqrt(2)): unit variance, sparser codes than N(0, I)."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.full((latent_dim,), 0.5**0.5))

    def forward(self) -> dist.Distribution:
        return dist.Laplace(self.loc, self.scale).to_event(1)


if __name__ == "__main__":
    for prior in ["normal", "mog:10", "vamp:50", "flow:2", "laplace"]:
        config = pyro_vae.Config()
        config.model.prior, config.model.latent_dim, config.model.hidden = prior, 8, [128]
        config.train.epochs = 40
        out = f"runs/swap_prior/{prior.replace(':', '')}"
        summary = pyro_vae.train(config, out, overwrite=True, progress=False)
        print(
            f"{prior:8s} test ELBO {summary['test_elbo']:7.2f}  log p(x) {summary['log_px']:7.2f}"
        )
