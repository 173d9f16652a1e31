"""p(x|z): observation models from decoder outputs to distributions over images.

A likelihood turns the decoder's unconstrained output (logits, locations, log
scales) into a Pyro distribution over the flattened image, an event of size D.
It says how many decoder outputs it needs (``param_dim``) and refuses data
outside its support before any training starts (``check_support``). One that is
a density over continuous pixel values says so (``continuous = True``): its
log-likelihoods, and so its ELBOs, can be above 0 and do not compare with those
of a distribution over discrete values.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from ..errors import PyroVAEError
from ..registry import Registry
from .distributions import IndependentBernoulli

likelihoods = Registry("likelihood")
_SCALAR = torch.Size()


@likelihoods.register("bernoulli")
class BernoulliLikelihood(nn.Module):
    """p(x|z) = prod_d Bernoulli(x_d | sigmoid(logit_d)), parametrized by logits.

    Logits avoid the sigmoid-then-log round trip of probability-space Bernoulli
    and are numerically safer. Validation is off so that [0, 1] intensities
    (``--binarize none``, Pyro's tutorial setting) score as soft targets.
    """

    def __init__(self, data_dim: int):
        super().__init__()
        self.param_dim = data_dim

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return IndependentBernoulli(logits, validate_args=False)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval("bernoulli", x)


def _check_unit_interval(name: str, x: torch.Tensor) -> None:
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise PyroVAEError(
            f"likelihood {name!r} needs pixel values in [0, 1]; the data spans "
            f"[{x.min().item():g}, {x.max().item():g}]"
        )


@likelihoods.register("cbernoulli")
class ContinuousBernoulliLikelihood(nn.Module):
    """p(x|z) = prod_d CB(x_d | lambda_d), the continuous Bernoulli on [0, 1].

    Loaiza-Ganem & Cunningham 2019: the Bernoulli log-likelihood applied to [0, 1]
    intensities is not normalized; the continuous Bernoulli adds the missing
    normalizing constant, so the ELBO is a real bound for non-binary pixels.
    """

    continuous = True

    def __init__(self, data_dim: int):
        super().__init__()
        self.param_dim = data_dim

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.ContinuousBernoulli(logits=logits).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval("cbernoulli", x)


class _LearnedScaleLikelihood(nn.Module):
    """Location from the decoder, one learned scale per pixel, floored at ``MIN_SCALE``.

    Pixels that are constant in the data (MNIST's borders) would otherwise drive
    their scale to zero and the density to infinity.
    """

    family: type
    name: str
    continuous = True
    MIN_SCALE = 0.01

    def __init__(self, data_dim: int):
        super().__init__()
        self.param_dim = data_dim
        self.raw_scale = nn.Parameter(torch.zeros(data_dim))

    def forward(self, loc: torch.Tensor) -> dist.Distribution:
        scale = self.MIN_SCALE + nn.functional.softplus(self.raw_scale)
        return self.family(loc, scale).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise PyroVAEError(f"likelihood {self.name!r} needs finite pixel values")


@likelihoods.register("gaussian")
class GaussianLikelihood(_LearnedScaleLikelihood):
    """p(x|z) = prod_d N(x_d | mu_d(z), sigma_d^2) with a learned scale per pixel."""

    family = dist.Normal
    name = "gaussian"


@likelihoods.register("laplace")
class LaplaceLikelihood(_LearnedScaleLikelihood):
    """p(x|z) = prod_d Laplace(x_d | mu_d(z), b_d) with a learned scale per pixel."""

    family = dist.Laplace
    name = "laplace"


class DiscretizedLogistic(dist.TorchDistribution):
    """A logistic density integrated over the 256 bins of 8-bit pixels in [0, 1].

    Salimans et al. 2017 (PixelCNN++), one component: P(x) = sigmoid((x + h - mu)/s)
    - sigmoid((x - h - mu)/s) with h = 1/510, the edge bins taking the tails.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.unit_interval
    LEVELS = 255

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc.clamp(0, 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        half_bin = 0.5 / self.LEVELS
        inv_scale = self.scale.reciprocal()
        centered = value - self.loc
        upper = inv_scale * (centered + half_bin)
        lower = inv_scale * (centered - half_bin)
        log_cdf_upper = upper - nn.functional.softplus(upper)  # log sigmoid(upper)
        log_survival_lower = -nn.functional.softplus(lower)  # log (1 - sigmoid(lower))
        # log(sigmoid(upper) - sigmoid(lower)), stably: the difference of the two
        # log-CDFs, falling back to the density times the bin width when it underflows.
        mid = inv_scale * centered
        log_density_mid = mid - self.scale.log() - 2 * nn.functional.softplus(mid)
        delta = torch.sigmoid(upper) - torch.sigmoid(lower)
        log_interior = torch.where(
            delta > 1e-5,
            delta.clamp_min(1e-12).log(),
            log_density_mid - math.log(self.LEVELS),
        )
        return torch.where(
            value < half_bin,
            log_cdf_upper,
            torch.where(value > 1 - half_bin, log_survival_lower, log_interior),
        )

    def sample(self, sample_shape: torch.Size = _SCALAR) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, device=self.loc.device).clamp(1e-6, 1 - 1e-6)
            x = self.loc.expand(shape) + self.scale.expand(shape) * (u.log() - (-u).log1p())
            return (x.clamp(0, 1) * self.LEVELS).round() / self.LEVELS


@likelihoods.register("dlogistic")
class DiscretizedLogisticLikelihood(nn.Module):
    """p(x|z) = prod_d DiscretizedLogistic(x_d | mu_d(z), s_d(z)) over 256 levels.

    For 8-bit intensities (``--binarize none`` on MNIST); the decoder emits a
    location and a log scale per pixel.
    """

    def __init__(self, data_dim: int):
        super().__init__()
        self.param_dim = 2 * data_dim

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        loc, log_scale = params.chunk(2, dim=-1)
        return DiscretizedLogistic(loc, log_scale.clamp_min(-7).exp()).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        _check_unit_interval("dlogistic", x)
        levels = x * DiscretizedLogistic.LEVELS
        if x.numel() and (levels - levels.round()).abs().max() > 1e-3:
            raise PyroVAEError(
                "likelihood 'dlogistic' needs 8-bit data (multiples of 1/255); "
                "use it with --binarize none on mnist or fashion-mnist"
            )
