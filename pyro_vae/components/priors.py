"""p(z): prior families over the latent code.

A prior is an ``nn.Module`` whose ``forward()`` returns a Pyro distribution
with event shape ``(latent_dim,)``. Learnable priors keep their parameters on
the module, so the SVI step that trains the networks trains them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from torch import nn

from ..registry import Arg, Registry, check_positive
from .distributions import DiagonalNormal, Normal

priors = Registry("prior")
_SCALAR = torch.Size()


@priors.register("normal")
class StandardNormalPrior(nn.Module):
    """p(z) = N(0, I), the prior of Kingma & Welling 2014."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return Normal(self.loc, self.scale).to_event(1)


@priors.register("normal-learned")
class LearnedNormalPrior(nn.Module):
    """p(z) = N(mu, diag(sigma^2)) with mu and log sigma learned by the same SVI step."""

    def __init__(self, latent_dim: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


@priors.register("mog", Arg("K"))
class MixtureOfGaussiansPrior(nn.Module):
    """p(z) = sum_k pi_k N(z | mu_k, diag(sigma_k^2)): K learned diagonal Gaussians.

    ``MixtureSameFamily`` over a ``Categorical``; weights, means and scales are
    trained with the networks (cf. Dilokthanakul et al. 2016, Tomczak & Welling 2018).
    """

    def __init__(self, latent_dim: int, K: int):
        check_positive(latent_dim=latent_dim, K=K)
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(K))
        self.locs = nn.Parameter(torch.randn(K, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(K, latent_dim))

    def forward(self) -> dist.Distribution:
        components = dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


_NORMALS = (torch.distributions.Normal, dist.Normal, Normal, DiagonalNormal)


def _diagonal_normal(d: dist.Distribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(loc, log scale) of shape (K, L) if ``d`` is K diagonal Normals over vectors, else None.

    PyTorch's, Pyro's and this library's Normals count, the guide's ``DiagonalNormal``
    (which keeps its log scale) included; a subclass of them elsewhere may have a
    density of its own, so it takes the general path.
    """
    if (
        isinstance(d, torch.distributions.Independent)
        and d.reinterpreted_batch_ndims == 1
        and type(d.base_dist) in _NORMALS
        and d.base_dist.loc.dim() == 2
    ):
        base = d.base_dist
        log_scale = base.log_scale if isinstance(base, DiagonalNormal) else base.scale.log()
        return base.loc.expand(base.batch_shape), log_scale.expand(base.batch_shape)
    return None


def _diagonal_normal_log_prob(z: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor):
    """log N(z | loc_k, diag exp(log_scale_k)^2) for every z (..., L) and component k: (..., K).

    sum_d (z_d - mu_kd)^2 / s_kd^2 expands into two matrix products, so K components
    cost two GEMMs rather than a (..., K, L) tensor of elementwise work. The expanded
    terms z^2/s^2 and mu^2/s^2 are large and nearly cancel where z is near a
    component far from the origin, so the products and the sum run in float64: in
    float32 they lost up to 0.1 nats at |z| = 10 with posterior scales of 0.05
    (tests/test_components.py pins the accuracy).
    """
    precision = (-2 * log_scale).exp().double()
    z64, loc64 = z.double(), loc.double()
    quadratic = (
        z64.square() @ precision.T
        - 2 * z64 @ (loc64 * precision).T
        + (loc64.square() * precision).sum(-1)
    )
    log_norm = log_scale.sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)
    return (-0.5 * quadratic).to(z.dtype) - log_norm


class UniformMixture(dist.TorchDistribution):
    """(1/K) sum_k component_k over vectors, for components of batch shape (..., K)."""

    arg_constraints: dict = {}

    def __init__(self, components: dist.Distribution, validate_args=None):
        if len(components.event_shape) != 1:
            raise ValueError("UniformMixture mixes distributions over vectors (event dim 1)")
        self.components = components
        self.num_components = components.batch_shape[-1]
        super().__init__(
            components.batch_shape[:-1], components.event_shape, validate_args=validate_args
        )

    @property
    def support(self):
        return self.components.support

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        normal = _diagonal_normal(self.components)
        if normal is not None:
            per_component = _diagonal_normal_log_prob(value, *normal)
        else:
            # Expanded, not broadcast: a flow's inverse (an IAF guide's) needs the full shape.
            value = value.unsqueeze(-2).expand(*value.shape[:-1], self.num_components, -1)
            per_component = self.components.log_prob(value)
        return per_component.logsumexp(-1) - math.log(self.num_components)

    def sample(self, sample_shape: torch.Size = _SCALAR) -> torch.Tensor:
        with torch.no_grad():
            draws = self.components.sample(sample_shape)  # (..., K, L)
            index = torch.randint(self.num_components, draws.shape[:-2], device=draws.device)
            index = index[..., None, None].expand(*index.shape, 1, draws.shape[-1])
            return draws.gather(-2, index).squeeze(-2)


@priors.register("vamp", Arg("K"))
class VampPrior(nn.Module):
    """VampPrior (Tomczak & Welling 2018): p(z) = (1/K) sum_k q(z | u_k).

    The mixture of the guide itself at K learned pseudo-inputs u_k, which live in
    data space and are initialized as in the paper (N(0.05, 0.01), clipped to [0, 1]).
    """

    def __init__(self, latent_dim: int, data_dim: int, encode: Callable, K: int):
        check_positive(latent_dim=latent_dim, K=K)
        super().__init__()
        self.encode = encode
        self.pseudo_inputs = nn.Parameter(0.05 + 0.01 * torch.randn(K, data_dim))
        self.evaluation_width = K * latent_dim  # log p(z) holds K values per latent entry

    def forward(self) -> dist.Distribution:
        return UniformMixture(self.encode(self.pseudo_inputs.clamp(0, 1)))


@priors.register("flow", Arg("N"))
class FlowPrior(nn.Module):
    """N(0, I) pushed through N learned affine autoregressive flows (Papamakarios et al. 2017).

    The flows are used in their masked-autoregressive direction, so the density of
    a z proposed by the guide costs one network pass per flow; sampling (pictures
    only) is the sequential direction.
    """

    def __init__(self, latent_dim: int, N: int):
        check_positive(latent_dim=latent_dim, N=N)
        super().__init__()
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))
        self.flows = nn.ModuleList(T.affine_autoregressive(latent_dim) for _ in range(N))

    def forward(self) -> dist.Distribution:
        base = Normal(self.loc, self.scale).to_event(1)
        return dist.TransformedDistribution(base, [flow.inv for flow in self.flows])
