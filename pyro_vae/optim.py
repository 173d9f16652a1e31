"""The optimizer SVI steps with: one fused Adam over every parameter.

``pyro.optim.Adam`` keeps a separate ``torch.optim.Adam`` per parameter, each
paying PyTorch's per-call optimizer machinery, runs the unfused update on the
CPU, and SVI then zeroes every gradient by allocating a fresh tensor of zeros.
This ``PyroOptim`` holds one fused ``torch.optim.Adam`` (a single multi-tensor
kernel for all parameters), adds parameters as SVI first hands them over, and
sets gradients to None once applied, as ``Optimizer.zero_grad`` does, so SVI
has nothing left to zero. The update is Adam's, element by element the same.
Its state is saved per parameter name, like Pyro's, for checkpoints.
"""

from __future__ import annotations

import torch
from pyro import get_param_store
from pyro.optim import PyroOptim

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


class Adam(PyroOptim):
    """Adam for SVI: one fused optimizer, gradients released after each step.

    Args:
        lr: learning rate.
        clip_norm: if given, the total gradient norm of each step is clipped to it.
    """

    def __init__(self, lr: float, clip_norm: float | None = None):
        super().__init__(torch.optim.Adam, {"lr": lr})
        self.lr, self.clip_norm = lr, clip_norm
        self.optimizer: torch.optim.Adam | None = None
        self._known: set[torch.Tensor] = set()

    def __call__(self, params, *args, **kwargs) -> None:
        params = list(params)
        new = [p for p in params if p not in self._known]
        if new:
            self._add(new)
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_(params, self.clip_norm)
        self.optimizer.step()
        for p in params:
            p.grad = None

    def _add(self, params: list[torch.Tensor]) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(params, lr=self.lr, fused=True)
        else:
            self.optimizer.add_param_group({"params": params})
        self._known.update(params)
        store = get_param_store()
        for p in params:
            saved = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
            if saved is not None:
                self.optimizer.state[p] = {k: saved[k].to(p.device) for k in _STATE_KEYS}

    def get_state(self) -> dict:
        """Adam's moments and step count per parameter name (tensors only)."""
        if self.optimizer is None:
            return dict(self._state_waiting_to_be_consumed)
        store = get_param_store()
        state = dict(self._state_waiting_to_be_consumed)
        for p, values in self.optimizer.state.items():
            state[store.param_name(p)] = {k: values[k] for k in _STATE_KEYS}
        return state

    def set_state(self, state_dict: dict) -> None:
        """Restore state saved by :meth:`get_state`; applied when each parameter first appears."""
        self._state_waiting_to_be_consumed.update(state_dict)
