"""ELBO estimators by name: spec strings -> ``pyro.infer`` ELBO objects.

Each estimator is Pyro's own; this module only maps names and arguments onto
them so that runs can be compared on equal footing. ``num_particles`` comes
from the config; estimators whose spec carries K use that instead.
"""

from __future__ import annotations

from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

from .registry import Arg, Registry, nonnegative_float

estimators = Registry("estimator")

# Our models and guides use exactly one plate (the batch); saying so spares
# Pyro a trial run of the model to discover it.
_PLATES = 1


def _particles(n: int) -> dict:
    return {"num_particles": n, "vectorize_particles": n > 1, "max_plate_nesting": _PLATES}


@estimators.register("trace")
def trace(num_particles: int = 1) -> ELBO:
    """Trace_ELBO: E_q[log p(x,z) - log q(z|x)] by reparameterized Monte Carlo."""
    return Trace_ELBO(**_particles(num_particles))


@estimators.register("meanfield")
def meanfield(num_particles: int = 1) -> ELBO:
    """TraceMeanField_ELBO: analytic KL(q || p) where registered, Monte Carlo otherwise."""
    return TraceMeanField_ELBO(**_particles(num_particles))


@estimators.register("iwae", Arg("K"))
def iwae(K: int, num_particles: int = 1) -> ELBO:
    """Importance-weighted bound with K samples (Burda et al. 2016): Renyi alpha = 0."""
    return RenyiELBO(alpha=0.0, **_particles(K))


def _renyi_alpha(text: str) -> float:
    alpha = nonnegative_float(text)
    if alpha == 1:
        raise ValueError("must not be 1 (alpha = 1 is the ELBO: use 'trace')")
    return alpha


@estimators.register("renyi", Arg("ALPHA", _renyi_alpha, example="0.5"), Arg("K"))
def renyi(ALPHA: float, K: int, num_particles: int = 1) -> ELBO:
    """Renyi alpha-divergence bound with K samples (Li & Turner 2016)."""
    return RenyiELBO(alpha=ALPHA, **_particles(K))
