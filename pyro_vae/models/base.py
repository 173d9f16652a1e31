"""What every Pyro program of ours shares: its parameters registered with Pyro, split by owner.

A model owns the generative networks (decoder, likelihood, prior) and a guide
owns the rest, so ``model`` and ``guide`` each register only their own
parameters, once per step and without rebuilding names.
"""

from __future__ import annotations

import weakref

import pyro
import torch
from torch import nn
from torch.nn.modules import module as _module

_structure_version = 0
_watched: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # every module of every cached program


def _module_structure_changed(parent: nn.Module, *_) -> None:
    """A watched module gained or replaced a submodule or parameter: the caches are stale.

    Modules nobody watches are ignored: Pyro's autoregressive networks slice their
    ``ModuleList`` on every forward pass, which builds (and registers into) a new one.
    """
    global _structure_version
    if parent in _watched:
        _structure_version += 1


_module.register_module_module_registration_hook(_module_structure_changed)
_module.register_module_parameter_registration_hook(_module_structure_changed)


class PyroProgram(nn.Module):
    """An ``nn.Module`` whose parameters enter Pyro's param store under ``pyro_name``.

    Subclasses set ``pyro_name`` and list the generative modules in
    ``model_modules``; every other parameter belongs to the guide.
    """

    pyro_name = "program"

    def model_modules(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def _pyro_params(self, part: str) -> list[tuple[str, torch.Tensor]]:
        """Param-store names and tensors of the model's or the guide's parameters, cached.

        ``.to()`` and ``load_state_dict`` keep these tensors, so the lists are built once,
        and again whenever one of its modules gains or replaces a submodule or parameter
        (``vae.prior = ...`` after training started), which PyTorch's global registration
        hooks tell.
        """
        lists = self.__dict__.get("_param_lists")
        if lists is None or lists["version"] != _structure_version:
            in_model = {id(p) for m in self.model_modules() for p in m.parameters()}
            named = [
                (f"{self.pyro_name}$$${n}", p)
                for n, p in self.named_parameters()
                if p.requires_grad
            ]
            _watched.update(self.modules())
            lists = self.__dict__["_param_lists"] = {
                "version": _structure_version,
                "model": [(n, p) for n, p in named if id(p) in in_model],
                "guide": [(n, p) for n, p in named if id(p) not in in_model],
            }
        return lists[part]

    def register(self, part: str) -> None:
        """Register the model's or the guide's parameters with Pyro, as ``pyro.module`` would.

        ``pyro.module`` keeps whatever tensors were first registered under a name, so
        a second program in the same process would silently have SVI step the first
        one's parameters. Entries that are not ours are evicted first.
        """
        params = self._pyro_params(part)
        store = pyro.get_param_store()
        if any(name not in store or store[name] is not p for name, p in params):
            for name, _ in params:
                if name in store:
                    del store[name]
        for name, p in params:
            pyro.param(name, p)
