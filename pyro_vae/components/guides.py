"""q(z|x): amortized posterior families from encoder outputs to distributions over z.

A guide family turns the encoder's output for a batch into a Pyro distribution
with event shape ``(latent_dim,)``; ``param_dim`` says how many encoder outputs
it needs per image.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from ..registry import Arg, Registry, check_positive
from .distributions import DiagonalNormal

guides = Registry("guide")


@guides.register("normal")
class DiagonalNormalGuide(nn.Module):
    """q(z|x) = N(mu(x), diag(sigma(x)^2)), the encoder of Kingma & Welling 2014.

    The encoder emits mu and log sigma; exp keeps sigma positive as in Pyro's
    and NumPyro's VAE examples. ``DiagonalNormal`` is Pyro's Normal, parametrized
    by log sigma (see ``pyro_vae.distributions``).
    """

    def __init__(self, latent_dim: int):
        super().__init__()
        self.param_dim = 2 * latent_dim

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        loc, log_scale = params.chunk(2, dim=-1)
        return DiagonalNormal(loc, log_scale).to_event(1)


@guides.register("lowrank", Arg("R"))
class LowRankNormalGuide(nn.Module):
    """q(z|x) = N(mu(x), W(x) W(x)^T + diag(d(x))) with a rank-R factor W.

    ``LowRankMultivariateNormal``: correlations between latent dimensions at a cost
    linear in the latent size.
    """

    def __init__(self, latent_dim: int, R: int):
        check_positive(latent_dim=latent_dim, R=R)
        super().__init__()
        self.latent_dim, self.rank = latent_dim, R
        self.param_dim = latent_dim * (2 + R)

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        L, R = self.latent_dim, self.rank
        loc, factor, log_diag = params.split([L, L * R, L], dim=-1)
        factor = factor.reshape(*factor.shape[:-1], L, R) / math.sqrt(R)
        return dist.LowRankMultivariateNormal(loc, factor, log_diag.exp())


@guides.register("iaf", Arg("N"))
class IAFGuide(nn.Module):
    """Inverse autoregressive flow posterior (Kingma et al. 2016).

    z_0 ~ N(mu(x), diag sigma(x)^2), then N affine autoregressive steps, each
    conditioned on a context vector h(x) from the encoder. Sampling and the density
    of the sample cost one pass per step; the steps use the paper's sigmoid-gated
    ("stable") update.
    """

    def __init__(self, latent_dim: int, N: int):
        check_positive(latent_dim=latent_dim, N=N)
        super().__init__()
        self.latent_dim = latent_dim
        self.context_dim = latent_dim
        self.param_dim = 2 * latent_dim + self.context_dim
        self.flows = nn.ModuleList(
            T.conditional_affine_autoregressive(
                latent_dim, self.context_dim, hidden_dims=[4 * latent_dim], stable=True
            )
            for _ in range(N)
        )

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        L = self.latent_dim
        loc, log_scale, context = params.split([L, L, self.context_dim], dim=-1)
        base = DiagonalNormal(loc, log_scale).to_event(1)
        return dist.TransformedDistribution(base, [f.condition(context) for f in self.flows])
