"""ELBO estimators by name: spec strings -> ``pyro.infer`` ELBO objects.

Most estimators are Pyro's own, mapped onto names and arguments so that runs
compare on equal footing; ``num_particles`` comes from the config, estimators
whose spec carries K use K. Two are ours, both written as Pyro ELBOs over
poutine traces so they work for any model and guide: the score-function
estimator (Pyro's ``TraceGraph_ELBO`` with the guide's latents made
non-reparameterized and a learned baseline) and DReG (Tucker et al. 2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
)
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from ..errors import PyroVAEError
from ..registry import Arg, Registry, nonnegative_float

estimators = Registry(
    "estimator",
    has_bound=True,
    works_under_ddp=False,
    traceable=False,
    enumerated=None,
    bound_as=None,
    free_bits=False,
    jit=False,
)
"""Estimators by spec. Each entry says whether its loss is a bound (``has_bound``: held-out
numbers and the divergence check read it), whether DDP can differentiate its loss
(``works_under_ddp``), whether ``--compile`` can trace its loss and gradients into
one graph (``traceable``: a differentiable loss, not already compiled by PyTorch's
JIT), its enumerating form for models that sum a discrete latent
out (``enumerated``: a function of the number of particles that returns Pyro's
TraceEnum_ELBO or its jitted twin; None where there is none), and which estimator
evaluates its bound on held-out data (``bound_as``, a spec with its arguments in
braces; None: itself), whether free bits apply (``free_bits``: its gradient is autograd's
of its objective through the sites' log-densities, so a clamped dimension's terms cancel
exactly; not ``dreg``, which leaves the model density's dependence on the guide out of its
gradient by design, nor the score-function estimators), and whether PyTorch's JIT
compiles it at the first step, fixing whatever the host computes then (``jit``: a KL
weight that changes in warm-up cannot reach it)."""

# Our models and guides use exactly one plate (the batch); saying so spares
# Pyro a trial run of the model to discover it.
_PLATES = 1


def _particles(n: int) -> dict:
    return {"num_particles": n, "vectorize_particles": n > 1, "max_plate_nesting": _PLATES}


class Enum_ELBO(TraceEnum_ELBO):
    """Pyro's ``TraceEnum_ELBO``, which takes the eager steps, with a loss that
    ``--compile`` can trace (:meth:`traceable_loss`).

    Pyro's own differentiable loss cannot be traced: ``Dice.compute_expectation`` asks
    whether every enumerated probability is positive (``mask.all()``, a read on the
    host) to choose its branch.
    """

    def traceable_loss(self, model, guide, *args, **kwargs):
        """-ELBO with the guide's enumerated sites summed out, from Pyro's own traces.

        The traces are ``TraceEnum_ELBO``'s (the same draws, the same scaled and masked
        log-densities). Each cost term (a model site's log-density, a guide site's
        negated) is weighted by q of the guide's enumerated site whose dimension it has,
        the unscaled log q that Pyro's DiCE factor uses, gradients to the classifier
        included; a term where q is 0 counts nothing, as Pyro's masked branch. Supported:
        parallel enumeration in the guide, each enumerated site independent of the others
        given the data, the other guide sites reparameterized (M2, the ADGM); anything
        else is refused, so ``--compile`` falls back to Pyro's eager step.
        """
        elbo = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            weights = _enumerated_weights(model_trace, guide_trace)
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] == "sample" and not site_is_subsample(site):
                        elbo = elbo + sign * _expectation(site["log_prob"], weights)
        return -elbo / self.num_particles


def _enumerated_weights(model_trace, guide_trace) -> dict[int, torch.Tensor]:
    """q of each parallel-enumerated guide site (unscaled), by its enumeration dimension."""
    weights = {}
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None:
            if name not in guide_trace.nodes:
                raise ValueError(f"the model enumerates {name!r}: only guide enumeration traces")
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        score = site["score_parts"].score_function
        dim = site["infer"].get("_enumerate_dim")
        if site["infer"].get("enumerate") != "parallel" or site["infer"].get("num_samples"):
            if not is_identically_zero(score):
                raise ValueError(
                    f"the guide's site {name!r} is neither enumerated in parallel "
                    f"nor reparameterized"
                )
            continue
        # Pyro gives each later enumerated site a dimension left of the earlier ones'; a q
        # that spans an earlier site's dimension depends on that site.
        if any(score.dim() >= -d and score.shape[d] > 1 for d in weights):
            raise ValueError(f"q of the guide's enumerated site {name!r} depends on another one")
        weights[dim] = score.exp()
    return weights


def _expectation(cost: torch.Tensor, weights: dict[int, torch.Tensor]) -> torch.Tensor:
    """The sum of ``cost`` with each enumeration dimension it has weighted by its q."""
    for dim, q in weights.items():
        if cost.dim() >= -dim and cost.shape[dim] > 1:
            if torch.broadcast_shapes(q.shape, cost.shape) != cost.shape:
                raise ValueError("an enumerated site's q spans dimensions its cost term lacks")
            cost = q * torch.where(q > 0, cost, torch.zeros_like(cost))
    return cost.sum()


def _enumerated(jit: bool) -> Callable[[int], ELBO]:
    """TraceEnum_ELBO (or its jitted twin) with ``num_particles``, vectorized."""

    def build(num_particles: int) -> ELBO:
        options = {"num_particles": num_particles, "vectorize_particles": True}
        if jit:  # as the other JIT estimators: shape tests in densities hold for any batch
            return JitTraceEnum_ELBO(**options, max_plate_nesting=_PLATES, ignore_jit_warnings=True)
        return Enum_ELBO(**options, max_plate_nesting=_PLATES)

    return build


@estimators.register(
    "trace", works_under_ddp=True, traceable=True, enumerated=_enumerated(jit=False), free_bits=True
)
def trace(num_particles: int = 1) -> ELBO:
    """Trace_ELBO: E_q[log p(x,z) - log q(z|x)] by reparameterized Monte Carlo."""
    return Trace_ELBO(**_particles(num_particles))


@estimators.register("meanfield", works_under_ddp=True, traceable=True, free_bits=True)
def meanfield(num_particles: int = 1) -> ELBO:
    """TraceMeanField_ELBO: analytic KL(q || p) where registered, Monte Carlo otherwise."""
    return TraceMeanField_ELBO(**_particles(num_particles))


@estimators.register(
    "jit-trace",
    works_under_ddp=True,
    enumerated=_enumerated(jit=True),
    bound_as="trace",
    free_bits=True,
    jit=True,
)
def jit_trace(num_particles: int = 1) -> ELBO:
    """JitTrace_ELBO: Trace_ELBO compiled with the PyTorch JIT (traced on the first call)."""
    return JitTrace_ELBO(**_particles(num_particles), ignore_jit_warnings=True)


@estimators.register(
    "jit-meanfield", works_under_ddp=True, bound_as="meanfield", free_bits=True, jit=True
)
def jit_meanfield(num_particles: int = 1) -> ELBO:
    """JitTraceMeanField_ELBO: TraceMeanField_ELBO compiled with the PyTorch JIT."""
    return JitTraceMeanField_ELBO(**_particles(num_particles), ignore_jit_warnings=True)


class Renyi_ELBO(RenyiELBO):
    """Pyro's ``RenyiELBO``, which takes the eager steps, with the differentiable loss it
    lacks (Pyro's computes its gradients in place), for ``--compile`` to trace.

    The loss is -(1/(1-alpha)) log (1/K) sum_k w_k^(1-alpha) over the same vectorized
    guide and replayed model traces, each site's scale and mask honoured as Pyro does.
    For a reparameterized guide its gradient is Pyro's surrogate's,
    sum_k softmax((1-alpha) log w)_k d log w_k: autograd of the log-sum-exp. The two agree
    where the data plate is not subsampled, as in every single-process step; with a
    subsampled plate (``size=``) this loss scales the per-datum bound by N / B (as
    ``dreg`` does), where Pyro's scales the log-densities inside the weights. A guide with
    a site that is not reparameterized (Pyro adds a score-function term for it) is
    refused, so ``--compile`` falls back to Pyro's eager step for it.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """The negated bound, to differentiate; scaled like the data plate."""
        model_trace, guide_trace, _ = vectorized_traces(
            model, guide, self.num_particles, -1 - self.max_plate_nesting, *args, **kwargs
        )
        for name, site in guide_trace.nodes.items():
            if _is_latent(site) and not site["fn"].has_rsample:
                raise ValueError(
                    f"the guide's site {name!r} is not reparameterized: its Renyi bound needs "
                    f"Pyro's score-function term"
                )
        log_w = (1.0 - self.alpha) * (log_density(model_trace) - log_density(guide_trace))
        bound = (log_w.logsumexp(0) - math.log(self.num_particles)).sum() / (1.0 - self.alpha)
        return -data_scale(model_trace, guide_trace) * bound


@estimators.register("iwae", Arg("K"), traceable=True, free_bits=True)
def iwae(K: int) -> ELBO:
    """Importance-weighted bound with K samples (Burda et al. 2016): Renyi alpha = 0."""
    return Renyi_ELBO(alpha=0.0, **_particles(K))


def _renyi_alpha(text: str) -> float:
    alpha = nonnegative_float(text)
    if alpha == 1:
        raise ValueError("must not be 1 (alpha = 1 is the ELBO: use 'trace')")
    return alpha


@estimators.register(
    "renyi", Arg("ALPHA", _renyi_alpha, example="0.5"), Arg("K"), traceable=True, free_bits=True
)
def renyi(ALPHA: float, K: int) -> ELBO:
    """Renyi alpha-divergence bound with K samples (Li & Turner 2016)."""
    return Renyi_ELBO(alpha=ALPHA, **_particles(K))


def _tail_particles(text: str) -> int:
    k = int(text) if text.isdigit() else 0
    if k < 2:
        raise ValueError("must be a whole number >= 2 (the tail weights rank K samples)")
    return k


@estimators.register("tail", Arg("K", _tail_particles), has_bound=False)
def tail(K: int) -> ELBO:
    """TraceTailAdaptive_ELBO with K samples (Wang et al. 2018). Its loss is a surrogate,
    not a bound; gradients only."""
    return TraceTailAdaptive_ELBO(num_particles=K, vectorize_particles=True, max_plate_nesting=1)


class _NotReparameterized(dist.TorchDistribution):
    """``base`` with ``has_rsample = False``: Pyro then uses the score function for it."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base: dist.Distribution):
        self.base = base
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:  # noqa: B008
        return self.base.sample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value)


class _ScoreFunctionSites(Messenger):
    """Makes every latent site of the guide non-reparameterized, with an nn baseline."""

    def __init__(self, baseline: nn.Module, baseline_input: torch.Tensor):
        super().__init__()
        self.baseline, self.baseline_input = baseline, baseline_input

    def _pyro_sample(self, msg: dict) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        msg["fn"] = _NotReparameterized(msg["fn"])
        msg["infer"] = {
            **msg["infer"],
            "baseline": {"nn_baseline": self.baseline, "nn_baseline_input": self.baseline_input},
        }


class ScoreFunctionELBO(TraceGraph_ELBO):
    """The ELBO with score-function (REINFORCE) gradients for the guide's latents.

    Williams 1992; Mnih & Gregor 2014 for the learned, data-dependent baseline
    b(x), trained by Pyro's ``TraceGraph_ELBO`` to regress the downstream cost.
    Unbiased, model-agnostic and much noisier than the reparameterized gradient.
    """

    def __init__(self, data_dim: int, hidden: int = 100, num_particles: int = 1):
        super().__init__(num_particles=num_particles, max_plate_nesting=_PLATES)
        self.baseline = nn.Sequential(
            nn.Linear(data_dim, hidden), nn.Softplus(), nn.Linear(hidden, 1), nn.Flatten(0)
        )

    def state_dict(self) -> dict:
        """The baseline's weights, for checkpoints."""
        return self.baseline.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.baseline.load_state_dict(state)

    def _score_function_guide(self, guide: Callable) -> Callable:
        def wrapped(x, *args, **kwargs):
            if next(self.baseline.parameters()).device != x.device:
                self.baseline.to(x.device)
            pyro.module("scorefn_baseline", self.baseline)
            with _ScoreFunctionSites(self.baseline, x):
                return guide(x, *args, **kwargs)

        return wrapped

    def loss(self, model, guide, *args, **kwargs):
        return super().loss(model, self._score_function_guide(guide), *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return super().loss_and_grads(model, self._score_function_guide(guide), *args, **kwargs)


@estimators.register("scorefn", bound_as="trace")
def scorefn(data_dim: int, num_particles: int = 1) -> ELBO:
    """Score-function ELBO gradients with a learned baseline (TraceGraph_ELBO)."""
    return ScoreFunctionELBO(data_dim, num_particles=num_particles)


def _is_latent(site: dict) -> bool:
    return site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)


def subsample_scale(site: dict) -> float:
    """The factor a site's plates give it for subsampling: full size / batch size of each.

    A site's ``scale`` is this times whatever ``poutine.scale`` set (a KL weight, say).
    """
    scale = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.size > 0:
            scale *= frame.full_size / frame.size
    return scale


def data_scale(*traces: poutine.Trace) -> float:
    """The subsampling factor of the data plate, shared by every sample site of ``traces``.

    Importance weights are per datum, so a minibatch of B out of N images scales the
    whole per-datum bound by N / B, not each log-density inside it.
    """
    scales = {
        subsample_scale(site)
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample" and not site_is_subsample(site)
    }
    if len(scales) > 1:
        raise PyroVAEError(
            f"importance weights need every sample site in the same data plate; "
            f"these sites are subsampled by different factors {sorted(scales)}"
        )
    return scales.pop() if scales else 1.0


def kl_weight(guide: poutine.Trace) -> float | torch.Tensor:
    """The weight that ``poutine.scale`` gave the guide's latent sites (1 without one; the
    data plate's subsampling factor left out), the same for every site."""
    weights = [
        site["scale"] / subsample_scale(site) for site in guide.nodes.values() if _is_latent(site)
    ]
    if not weights:
        return 1.0
    first, *rest = weights
    if any(float(w) != float(first) for w in rest):
        raise PyroVAEError(
            f"dreg needs one weight on all latent sites; these have {sorted(map(float, weights))}"
        )
    return first


def log_density(trace: poutine.Trace, scaled: bool = True) -> torch.Tensor:
    """Sum of the log-densities of a trace's sample sites, broadcast over batch dims.

    Each site's ``mask`` applies, as in ``Trace_ELBO``; with ``scaled`` so does its
    ``poutine.scale`` factor, but never the data plate's subsampling factor (see
    :func:`data_scale`). ``scaled=False`` gives the model's own density, whatever
    scale training used.
    """
    total = torch.zeros(())
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            scale = site["scale"] / subsample_scale(site) if scaled else 1.0
            total = total + scale_and_mask(log_p, scale, site["mask"])
    return total


def vectorized_traces(
    model, guide, num_samples: int, plate_dim: int, *args, leaves=False, **kwargs
):
    """Guide and replayed model traces for ``num_samples`` draws per datum, vectorized.

    The draws sit in a plate at ``plate_dim`` left of the model's own plates. With
    ``leaves``, densities see detached leaf copies of the latents, and the
    attached samples are returned as well (name -> tensor).
    """
    attached = {}
    with pyro.plate("importance_samples", num_samples, dim=plate_dim):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if leaves:
            for name, site in guide_trace.nodes.items():
                if _is_latent(site):
                    attached[name] = site["value"]
                    site["value"] = site["value"].detach().requires_grad_()
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return model_trace, guide_trace, attached


class DReG_ELBO(ELBO):
    """The IWAE bound with doubly-reparameterized gradients (Tucker et al. 2019).

    Bound: log (1/K) sum_k w_k, w_k = p(x, z_k) / q(z_k|x), as ``iwae:K``. Gradients:
    model parameters get sum_k w~_k d log p(x, z_k) (z held fixed), and the guide's
    parameters only the path through the samples, sum_k w~_k^2 (d log w_k / d z_k)(d z_k/d phi),
    with w~ the normalized weights. Dropping the score term of log q keeps the guide's
    gradient signal-to-noise ratio from decaying as K grows, as it does for IWAE
    (Rainforth et al. 2018). With the latent sites scaled by a KL weight beta
    (``inference.kl``), the path weights are (1 - beta) w~ + beta w~^2.
    """

    def __init__(self, num_particles: int):
        super().__init__(num_particles=num_particles, max_plate_nesting=_PLATES)

    def _traces(self, model, guide, args, kwargs, leaves=False):
        plate_dim = -1 - self.max_plate_nesting
        return vectorized_traces(
            model, guide, self.num_particles, plate_dim, *args, leaves=leaves, **kwargs
        )

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace, _ = self._traces(model, guide, args, kwargs)
        return model_trace, guide_trace

    def path_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """The weights of the guide's path gradients at KL weight 1: w~^2, which makes them
        unbiased.

        (w~ alone gives the "sticking the landing" IWAE gradient, which is biased.)
        """
        return weights.square()

    def _bound(self, log_w: torch.Tensor) -> torch.Tensor:
        return (log_w.logsumexp(0) - math.log(self.num_particles)).sum()

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """-bound in value, with DReG gradients; scaled like the data plate (a minibatch of N)."""
        model_trace, guide_trace, attached = self._traces(model, guide, args, kwargs, True)
        log_p = log_density(model_trace)
        log_w = log_p - log_density(guide_trace)
        weights = torch.softmax(log_w.detach(), dim=0)
        # Model parameters: sum_k w~_k log p(x, z_k), the samples held fixed.
        surrogate = (weights * log_p).sum()
        # Guide parameters: only the path through the samples, reweighted by w~^2; with the
        # latent terms weighted by beta (inference.kl), the score term that the identity
        # replaces is beta times IWAE's, so the weights are (1 - beta) w~ + beta w~^2.
        beta = kl_weight(guide_trace)
        path = (1 - beta) * weights + beta * self.path_weights(weights)
        leaves = [guide_trace.nodes[name]["value"] for name in attached]
        grads = torch.autograd.grad(
            (path * log_w).sum(), leaves, retain_graph=True, allow_unused=True
        )
        for z, g in zip(attached.values(), grads, strict=True):
            if g is not None:
                surrogate = surrogate + (g.detach() * z).sum()
        scale = data_scale(model_trace, guide_trace)
        return -scale * (surrogate - surrogate.detach() + self._bound(log_w).detach())

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            model_trace, guide_trace, _ = self._traces(model, guide, args, kwargs)
            bound = self._bound(log_density(model_trace) - log_density(guide_trace))
            return -data_scale(model_trace, guide_trace) * bound.item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()


@estimators.register("dreg", Arg("K"), works_under_ddp=True, traceable=True, bound_as="iwae:{K}")
def dreg(K: int) -> ELBO:
    """IWAE bound with doubly-reparameterized gradients (Tucker et al. 2019)."""
    return DReG_ELBO(K)


def has_bound(spec: str) -> bool:
    """Whether the estimator's loss is a bound (``tail``'s is not: it reports inf)."""
    return estimators.parse(spec)[0].has_bound


def bound_estimator(spec: str, data_dim: int) -> ELBO | None:
    """The estimator whose loss is the bound ``spec`` optimizes, for held-out evaluation.

    JIT variants evaluate as their plain twins (no recompiling per test batch), DReG
    as IWAE, the score-function estimator as the ELBO; ``tail`` has no bound (None).
    """
    entry, values = estimators.parse(spec)
    if not entry.has_bound:
        return None
    return estimators.build(
        entry.bound_as.format(**values) if entry.bound_as else spec, data_dim=data_dim
    )
