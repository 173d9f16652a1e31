"""p(z): prior families over the latent code.

A prior is an ``nn.Module`` whose ``forward()`` returns a Pyro distribution
with event shape ``(latent_dim,)``. Learnable priors keep their parameters on
the module, so the SVI step that trains the networks trains them too.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .registry import Registry

priors = Registry("prior")


@priors.register("normal")
class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I), the prior of Kingma & Welling 2014."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


@priors.register("normal-learned")
class LearnedNormalPrior(nn.Module):
    """p(z) = N(mu, diag(sigma^2)) with mu and log sigma learned by the same SVI step."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)
