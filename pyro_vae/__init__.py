"""pyro-vae: variational autoencoders written as Pyro probabilistic programs.

The VAE is a Pyro ``model`` (prior p(z), likelihood p(x|z)) and ``guide``
(amortized q(z|x)), optimized by ``pyro.infer.SVI`` with Pyro's ELBOs. Priors,
likelihoods, guides, networks and estimators are chosen by spec strings.

The public names below are imported when first used, so that ``import pyro_vae``
(and ``pyro-vae --help``) does not load PyTorch and Pyro until something needs them.
Four of them share their name with the module that defines them (the ``priors``
registry lives in ``pyro_vae/priors.py``, ``train`` in ``pyro_vae/train.py``, ...);
the public object is what ``pyro_vae.<name>`` is, also after the module is imported.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "M1M2": "models",
    "SSVAE": "models",
    "VAE": "models",
    "Config": "config",
    "ImageBatches": "data",
    "PyroVAEError": "errors",
    "architectures": "nets",
    "elbo": "evaluate",
    "estimators": "elbos",
    "evaluate_run": "evaluate",
    "guides": "guides",
    "likelihoods": "likelihoods",
    "load_config": ("config", "load"),
    "load_dataset": "data",
    "load_run": "runs",
    "log_likelihood": "evaluate",
    "priors": "priors",
    "train": "train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name]
    module, attribute = where if isinstance(where, tuple) else (where, name)
    value = getattr(importlib.import_module(f".{module}", __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """Keeps a public name when Python's import system would bind the same-named module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType) and name in self.__dict__:
            return
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            value = __getattr__(name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
