"""The ELBO's KL term reweighted: beta-VAE, KL warm-up and free bits, as effect handlers.

ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)). Pyro's estimators assemble it from the
log-densities of the sample sites: the observed site gives the reconstruction term,
the latent sites (log p(z) in the model, log q(z|x) in the guide) the KL term. A
weight on the KL term (the beta-VAE, Higgins et al. 2017; warm-up from 0, Bowman et
al. 2016 and Sonderby et al. 2016) is therefore ``poutine.scale``'s effect on the
latent sites of model and guide alike, and every estimator honours it as it honours
any scale: ``trace``, ``meanfield`` (its analytic KL is scaled by the guide site's
scale), ``iwae`` and ``dreg`` (inside the importance weights), and M2's enumerated y.

Free bits (Kingma et al. 2016) replace the KL of each latent dimension j by
max(lambda, KL_j), KL_j averaged over the minibatch. That is no scale; it is done
by replacing the model's density of a latent site by

    log p~(z) = log p(z) + sum_{j in C} (log q_j(z_j) - log p_j(z_j) - lambda),

C the dimensions whose minibatch KL is below lambda (held fixed in the gradient).
Against the guide's log q(z|x), a clamped dimension then contributes exactly
-lambda: no value of its own and no gradient, as max(lambda, KL_j) has none there;
the others keep their Monte Carlo KL. Inside an importance weight (``iwae``,
``renyi``) it is the same: each log w_k = log p~(x, z_k) - log q(z_k|x) carries
-lambda for a clamped dimension. It needs q and p that factorize over z's
dimensions, and an estimator that differentiates its objective through those
densities (``free_bits`` in the estimators' registry: not ``dreg``, whose gradient
leaves out, by design, any dependence of the model's density on the guide). Where
y is enumerated (M2), and over K importance samples, z's minibatch KL averages
over the enumerated classes and the samples too, unweighted. ``meanfield`` has no
closed form for q against p~, so under free bits it estimates z's term by Monte
Carlo, as ``trace`` does.

Held-out numbers (test ELBO, log p(x)) run the model and guide without these
handlers: they are always those of the model as written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Independent, kl_divergence

from ..errors import PyroVAEError


class KLTerm:
    """The weight on the KL term through training, and free bits.

    Args:
        weight: beta, the KL term's weight once warm-up is over (1: the ELBO).
        warmup: epochs over which the weight rises linearly from 0 to ``weight``, step
            by step (0: no warm-up).
        free_bits: lambda, nats per latent dimension below which a dimension's KL is
            not penalized (0: none).
    """

    def __init__(self, weight: float = 1.0, warmup: int = 0, free_bits: float = 0.0):
        if not weight >= 0 or not warmup >= 0 or not free_bits >= 0:
            raise PyroVAEError("KL weight, warm-up and free bits must be >= 0")
        self.final_weight, self.warmup, self.free_bits = float(weight), warmup, float(free_bits)
        self.weight: float | torch.Tensor = self.at(0.0)
        """The weight in force: set by the loop before each step (a tensor while traced)."""
        self._posteriors: dict[str, dist.Distribution] = {}

    @property
    def modified(self) -> bool:
        """Whether training optimizes anything but the ELBO itself."""
        return self.final_weight != 1 or self.warmup > 0 or self.free_bits > 0

    def at(self, epochs_done: float) -> float:
        """The weight after ``epochs_done`` epochs (fractions count: 2.5 is half of the
        third): ``weight * min(1, epochs_done / warmup)``."""
        if self.warmup == 0:
            return self.final_weight
        return self.final_weight * min(1.0, epochs_done / self.warmup)

    def wrap(self, model: Callable, guide: Callable) -> tuple[Callable, Callable]:
        """``model`` and ``guide`` run under this KL term's handlers (as they are, when it
        leaves the ELBO as it is)."""
        if not self.modified:
            return model, guide
        model = _under(model, _LatentSites(self, "model"))
        return model, _under(guide, _LatentSites(self, "guide"))

    @contextlib.contextmanager
    def weighted(self, weight: float | torch.Tensor) -> Iterator[None]:
        """The weight is ``weight`` inside (a traced step's input stands in for it)."""
        saved, self.weight = self.weight, weight
        try:
            yield
        finally:
            self.weight = saved


def _under(fn: Callable, handler: Messenger) -> Callable:
    def run(*args, **kwargs):
        with handler:
            return fn(*args, **kwargs)

    run.__name__ = getattr(fn, "__name__", "program")
    return run


class _LatentSites(Messenger):
    """Scales every latent site by the KL term's weight; with free bits, the guide's
    q(z|x) of each reparameterized latent site is kept for the model's p~(z)."""

    def __init__(self, kl: KLTerm, side: str):
        super().__init__()
        self.kl, self.side = kl, side

    def _process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or site_is_subsample(msg):
            return
        weight = self.kl.weight
        if not (isinstance(weight, float) and weight == 1.0):
            if isinstance(weight, float):  # a float32 scalar, as the traced step's input is
                weight = torch.tensor(weight)
            msg["scale"] = weight * msg["scale"]
        if not self.kl.free_bits:
            return
        if self.side == "guide":
            if msg["fn"].has_rsample:  # not M2's y, whose KL stays as it is
                self.kl._posteriors[msg["name"]] = msg["fn"]
        else:
            q = self.kl._posteriors.get(msg["name"])  # the guide's latest, for every model run
            if q is not None:
                msg["fn"] = FreeBitsPrior(msg["fn"], q, self.kl.free_bits, msg["name"])


def factorizes(d: dist.Distribution) -> bool:
    """Whether ``d`` is independent over z's one event dimension (per-dimension factors)."""
    return isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1


def _factors(d: dist.Distribution, role: str, site: str) -> dist.Distribution:
    """The per-dimension distribution under an ``Independent`` over z's one event dim."""
    if factorizes(d):
        return d.base_dist
    raise PyroVAEError(
        f"--free-bits needs a {role} that factorizes over the dimensions of {site!r} "
        f"(a Normal with a diagonal covariance: prior normal or normal-learned, guide "
        f"normal); {type(d).__name__} does not"
    )


class FreeBitsPrior(TorchDistribution):
    """p~(z) of free bits (see the module's docstring): ``prior``'s density plus, for each
    dimension whose minibatch KL(q_j || p_j) is below ``nats``, log q_j - log p_j - nats.

    The minibatch KL of a dimension is the mean over every batch dimension of the
    closed-form KL where PyTorch has one for the pair, else of log q_j(z_j) - log p_j(z_j)
    at the drawn z.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, prior: dist.Distribution, posterior: dist.Distribution, nats: float, site):
        self.prior, self.posterior, self.nats, self.site = prior, posterior, nats, site
        self.prior_factors = _factors(prior, "prior", site)
        self.posterior_factors = _factors(posterior, "guide", site)
        try:
            self.closed_form = kl_divergence(self.posterior_factors, self.prior_factors)
        except NotImplementedError:
            self.closed_form = None
        super().__init__(prior.batch_shape, prior.event_shape, validate_args=False)

    @property
    def support(self):
        return self.prior.support

    def expand(self, batch_shape, _instance=None):
        """Under an outer plate (K importance samples, say): the prior expanded, q as it is."""
        if torch.Size(batch_shape) == self.batch_shape:
            return self
        prior = self.prior.expand(batch_shape)
        return FreeBitsPrior(prior, self.posterior, self.nats, self.site)

    def sample(self, sample_shape=torch.Size()):  # noqa: B008
        return self.prior.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        log_q = self.posterior_factors.log_prob(value)
        log_p = self.prior_factors.log_prob(value)
        per_dim = self.closed_form if self.closed_form is not None else log_q - log_p
        kl = per_dim.detach().reshape(-1, per_dim.shape[-1]).mean(0)
        clamped = (kl < self.nats).to(log_q.dtype)
        return self.prior.log_prob(value) + ((log_q - log_p - self.nats) * clamped).sum(-1)
