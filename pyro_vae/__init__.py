"""pyro-vae: variational autoencoders written as Pyro probabilistic programs.

The VAE is a Pyro ``model`` (prior p(z), likelihood p(x|z)) and ``guide``
(amortized q(z|x)), optimized by ``pyro.infer.SVI`` with Pyro's ELBOs. Priors,
likelihoods, guides, networks and estimators are chosen by spec strings.
"""

from .config import Config
from .config import load as load_config
from .data import ImageBatches, load_dataset
from .elbos import estimators
from .errors import PyroVAEError
from .evaluate import elbo, evaluate_run, log_likelihood
from .guides import guides
from .likelihoods import likelihoods
from .models import M1M2, SSVAE, VAE
from .nets import architectures
from .priors import priors
from .runs import load_run
from .train import train

__version__ = "0.1.0"

__all__ = [
    "M1M2",
    "SSVAE",
    "VAE",
    "Config",
    "ImageBatches",
    "PyroVAEError",
    "architectures",
    "elbo",
    "estimators",
    "evaluate_run",
    "guides",
    "likelihoods",
    "load_config",
    "load_dataset",
    "load_run",
    "log_likelihood",
    "priors",
    "train",
]
