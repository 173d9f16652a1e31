"""Pyro's Normal, Bernoulli and Independent, with cheaper log-densities and the same values.

Trace_ELBO scores the guide's sample under the guide: log q(z|x) at the very z
that ``rsample`` just drew as loc + scale * eps. There (z - loc) / scale is eps
itself, so log q(z) = -eps^2/2 - log scale - log sqrt(2 pi): the same value, and
the same gradient, since this expression and the textbook one are the same
function of (loc, log scale) for the drawn eps. It skips the subtraction, the
division and the logarithm, and their backward passes, which at batch 128 were
a twentieth of a training step. Any other value takes the textbook formula.

The standard normal prior skips subtracting 0 and dividing by 1. The Bernoulli
image likelihood sums each image's log-density before negating it, so the
negation (forward and backward) touches one number per image, not every pixel.

Pyro's plates expand every sample site's distribution to the plate's batch
shape on every step, even when it has that shape already; these return
themselves then, instead of a copy (1.5 % of a step at batch 128).

All stay subclasses of Pyro's distributions, so KL registrations
(TraceMeanField_ELBO's analytic KL), ``expand`` under plates and every other
property keep working.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions.utils import _standard_normal
from torch.nn.functional import binary_cross_entropy_with_logits

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _unchanged(d: dist.Distribution, batch_shape, _instance) -> bool:
    """Whether ``d.expand(batch_shape)`` may be ``d`` itself."""
    return _instance is None and torch.Size(batch_shape) == d.batch_shape


def _expand(cls: type, d: dist.Distribution, batch_shape, _instance) -> dist.Distribution:
    """``cls.expand`` for a class with nothing of its own to copy: ``d`` itself when unchanged."""
    if _unchanged(d, batch_shape, _instance):
        return d
    new = d._get_checked_instance(cls, _instance)
    return super(cls, d).expand(batch_shape, _instance=new)


class Independent(dist.Independent):
    """``dist.Independent``, its own expansion to its own batch shape."""

    def expand(self, batch_shape, _instance=None):
        return _expand(Independent, self, batch_shape, _instance)


class _ToEvent:
    """``to_event`` that wraps in our ``Independent``."""

    def to_event(self, reinterpreted_batch_ndims: int | None = None) -> dist.Distribution:
        n = (
            len(self.batch_shape)
            if reinterpreted_batch_ndims is None
            else reinterpreted_batch_ndims
        )
        return Independent(self, n) if n else self


class DiagonalNormal(_ToEvent, dist.Normal):
    """N(loc, exp(log_scale)^2) per element, which remembers the noise of its last draw.

    Args:
        loc: the mean.
        log_scale: the log standard deviation (the encoder's output, kept as is).
    """

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor, validate_args=None):
        self.log_scale = log_scale
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None
        super().__init__(loc, log_scale.exp(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        if _unchanged(self, batch_shape, _instance):
            return self
        new = self._get_checked_instance(DiagonalNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.log_scale = self.log_scale.expand(batch_shape)
        new._drawn = None
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = self._extended_shape(sample_shape)
        eps = _standard_normal(shape, dtype=self.loc.dtype, device=self.loc.device)
        z = self.loc + eps * self.scale
        self._drawn = (z, eps)
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        if self._drawn is not None and value is self._drawn[0]:
            eps = self._drawn[1]
        else:
            eps = (value - self.loc) / self.scale
        return -0.5 * eps.square() - self.log_scale - _LOG_SQRT_2PI


class StandardNormal(_ToEvent, dist.Normal):
    """N(0, 1) per element: log p(z) = -z^2/2 - log sqrt(2 pi), nothing subtracted or divided.

    Built from tensors of zeros and ones (a prior's buffers), which are its loc and
    scale for everything but the density.
    """

    def __init__(self, zeros: torch.Tensor, ones: torch.Tensor, validate_args=None):
        super().__init__(zeros, ones, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return _expand(StandardNormal, self, batch_shape, _instance)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        log_p = -0.5 * value.square() - _LOG_SQRT_2PI
        if value.shape != self.loc.shape:  # broadcast as Normal.log_prob would
            log_p = log_p.expand(torch.broadcast_shapes(value.shape, self.loc.shape))
        return log_p


class IndependentBernoulli(Independent):
    """Bernoulli(sigmoid(logits)) per element, the last dimension an event: an image.

    ``dist.Bernoulli(logits=logits).to_event(1)`` but for ``log_prob``, which sums
    the binary cross-entropy over each image before negating the sum.
    """

    def __init__(self, logits: torch.Tensor, validate_args=None):
        base = dist.Bernoulli(logits=logits, validate_args=validate_args)
        super().__init__(base, 1, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return _expand(IndependentBernoulli, self, batch_shape, _instance)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self.base_dist._validate_sample(value)
        logits = self.base_dist.logits
        if value.shape != logits.shape:  # e.g. K importance samples of logits for one x
            logits, value = torch.broadcast_tensors(logits, value)
        return -binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)
