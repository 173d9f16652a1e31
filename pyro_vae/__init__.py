"""pyro-vae: variational autoencoders written as Pyro probabilistic programs.

The VAE is a Pyro ``model`` (prior p(z), likelihood p(x|z)) and ``guide``
(amortized q(z|x)), optimized by ``pyro.infer.SVI`` with Pyro's ELBOs. Priors,
likelihoods, guides, networks and estimators are chosen by spec strings.

The package is layered (docs/DESIGN.md): ``components`` (priors, likelihoods,
guides, nets, distributions), ``inference`` (estimators, optimizer, divergence
checks), ``models`` (the VAE, M2, M1+M2), ``training`` (the one loop, the run
folder, torchrun), ``evaluation`` (held-out numbers, comparison, pictures), with
``config``, ``registry``, ``data`` and ``cli`` at the top. The public names below
are imported when first used, so that ``import pyro_vae`` (and ``pyro-vae
--help``) does not load PyTorch and Pyro until something needs them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {  # name -> (module, attribute); attribute None: the module itself
    "Arg": ("registry", "Arg"),
    "CVAE": ("models", "CVAE"),
    "CVAEBaseline": ("models", "CVAEBaseline"),
    "Config": ("config", "Config"),
    "Dataset": ("data", "Dataset"),
    "FitResult": ("training.loop", "FitResult"),
    "ImageBatches": ("data", "ImageBatches"),
    "KLTerm": ("inference.kl", "KLTerm"),
    "ADGM": ("models", "ADGM"),
    "M1M2": ("models", "M1M2"),
    "PyroProgram": ("models", "PyroProgram"),
    "PyroVAEError": ("errors", "PyroVAEError"),
    "Registry": ("registry", "Registry"),
    "SSVAE": ("models", "SSVAE"),
    "Trainable": ("training.loop", "Trainable"),
    "VAE": ("models", "VAE"),
    "architectures": ("components.nets", "architectures"),
    "compare": ("evaluation.compare", "compare"),
    "datasets": ("data", "datasets"),
    "elbo": ("evaluation.evaluate", "elbo"),
    "estimators": ("inference.elbos", "estimators"),
    "evaluate_run": ("evaluation.evaluate", "evaluate_run"),
    "fit": ("training.loop", "fit"),
    "guides": ("components.guides", "guides"),
    "latent": ("evaluation.latent", None),
    "likelihoods": ("components.likelihoods", "likelihoods"),
    "load_config": ("config", "load"),
    "load_dataset": ("data", "load_dataset"),
    "load_run": ("training.runs", "load_run"),
    "log_likelihood": ("evaluation.evaluate", "log_likelihood"),
    "make_svi": ("training.train", "make_svi"),
    "models": ("models", None),
    "priors": ("components.priors", "priors"),
    "resume": ("training.train", "resume"),
    "semi": ("training.semi", None),
    "train": ("training.train", "train"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(f".{module}", __name__)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
