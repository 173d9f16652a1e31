"""q(z|x): amortized posterior families from encoder outputs to distributions over z.

A guide family turns the encoder's output for a batch into a Pyro distribution
with event shape ``(latent_dim,)``; ``param_dim`` says how many encoder outputs
it needs per image.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .registry import Registry

guides = Registry("guide")


@guides.register("normal")
class DiagonalNormalGuide(nn.Module):
    """q(z|x) = N(mu(x), diag(sigma(x)^2)), the encoder of Kingma & Welling 2014.

    The encoder emits mu and log sigma; exp keeps sigma positive as in Pyro's
    and NumPyro's VAE examples.
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.param_dim = 2 * latent_dim

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        loc, log_scale = params.chunk(2, dim=-1)
        return dist.Normal(loc, log_scale.exp()).to_event(1)
