"""The optimizer SVI steps with: Adam as one fused kernel over every parameter.

``pyro.optim.Adam`` keeps a separate ``torch.optim.Adam`` per parameter, each
paying PyTorch's per-call optimizer machinery, runs the unfused update on the
CPU, and SVI then zeroes every gradient by allocating a fresh tensor of zeros.
This ``PyroOptim`` keeps Adam's moments itself and updates all parameters with
one call of PyTorch's functional fused Adam (``torch.optim.adam.adam``, the
computation ``torch.optim.Adam(fused=True).step`` runs, without its per-call
bookkeeping, which was 1.3 % of a training step at batch 128). It adds
parameters as SVI first hands them over and sets gradients to None once
applied, as ``Optimizer.zero_grad`` does, so SVI has nothing left to zero. The
update is Adam's, element by element the same. Its state is saved per parameter
name, like Pyro's, for checkpoints.

PyTorch has the fused kernel on CUDA, and on the CPU from release 2.4; elsewhere
the same function runs its multi-tensor (``foreach``) form. Two private names
are read: ``torch.optim.adam.adam`` and ``PyroOptim._state_waiting_to_be_consumed``
(how Pyro hands a checkpoint's state to parameters that appear later);
``tests/test_optim.py`` fails loudly if either changes.

Clipping: ``max_grad_norm`` clips the *global* norm of all gradients together
(``torch.nn.utils.clip_grad_norm_``), as ``--clip-grad`` does; ``max_grad_norm_per_param``
clips each parameter's gradient on its own, as Pyro's ``clip_args={"clip_norm": c}``
does (``--clip-grad-per-param``). Both may be given: per parameter first.

The learning rate and betas live in one parameter group of a ``torch.optim.Optimizer``
(``hyperparameters``) that updates nothing itself, so PyTorch's learning-rate
schedulers (``inference.schedules``) drive them, and every update reads them from
there.
"""

from __future__ import annotations

import torch
from pyro import get_param_store
from pyro.optim import PyroOptim
from torch.optim.adam import adam

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


def fused_adam_supported(device: torch.device) -> bool:
    """Whether this PyTorch has the fused Adam kernel for ``device`` (CPU: from 2.4)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and torch.__version__ >= (2, 4)


class Hyperparameters(torch.optim.Optimizer):
    """Adam's learning rate and betas as the one parameter group of an optimizer that updates
    nothing: what PyTorch's learning-rate schedulers adjust."""

    def __init__(self, lr: float, betas: tuple[float, float]):
        super().__init__([torch.zeros(0)], {"lr": lr, "betas": tuple(betas)})

    @property
    def group(self) -> dict:
        return self.param_groups[0]

    def step(self, closure=None) -> None:
        """Nothing to update: ``Adam`` calls it once per update, so that schedulers see an
        optimizer that has stepped."""


class Adam(PyroOptim):
    """Adam for SVI: one fused update, gradients released after each step.

    Args:
        lr: learning rate.
        max_grad_norm: if given, the gradients of each step are scaled down together so
            that their global norm (all parameters as one vector) is at most this.
        betas, eps: Adam's, as in ``torch.optim.Adam``.
        weight_decay: ``torch.optim.Adam``'s L2 penalty: ``weight_decay * p`` is added to
            each parameter's gradient before the update.
        max_grad_norm_per_param: if given, each parameter's gradient is scaled down on its
            own to a norm of at most this (Pyro's ``clip_args={"clip_norm": c}``).
    """

    def __init__(
        self,
        lr: float,
        max_grad_norm: float | None = None,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm_per_param: float | None = None,
    ):
        super().__init__(torch.optim.Adam, {"lr": lr})
        self.max_grad_norm, self.eps, self.weight_decay = max_grad_norm, eps, weight_decay
        self.max_grad_norm_per_param = max_grad_norm_per_param
        self.hyperparameters = Hyperparameters(lr, betas)
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    @property
    def lr(self) -> float:
        """The learning rate in force (a schedule moves it)."""
        return self.hyperparameters.group["lr"]

    @property
    def betas(self) -> tuple[float, float]:
        return self.hyperparameters.group["betas"]

    @torch.no_grad()
    def __call__(self, params, *args, **kwargs) -> None:
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        self.ready(params)
        self.hyperparameters.step()
        self._update(params, self.lr, self.betas)
        for p in params:
            p.grad = None

    def ready(self, params: list[torch.Tensor]) -> None:
        """Moments for each of ``params`` that has none yet (fresh, or a checkpoint's)."""
        for p in params:
            if p not in self.state:
                self._add(p)

    def _update(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float]) -> None:
        """Clip the gradients in ``p.grad`` and apply Adam's update to ``params``."""
        if self.max_grad_norm_per_param:
            for p in params:
                torch.nn.utils.clip_grad_norm_(p, self.max_grad_norm_per_param)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        beta1, beta2 = betas
        states = [self.state[p] for p in params]
        fused = fused_adam_supported(params[0].device)
        adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [],
            [s["step"] for s in states],
            fused=fused,
            foreach=not fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            maximize=False,
        )

    # In a CUDA graph: the update as kernels on tensors that stay in place.

    def graphable(self, device: torch.device) -> bool:
        """Whether :meth:`graph_update` can run inside a CUDA graph on ``device``: it needs
        the fused kernel, which keeps the step counts on the device."""
        return fused_adam_supported(device)

    def mutated(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """What an update writes in place: ``params``, their moments and step counts."""
        self.ready(params)
        return [*params, *(v for p in params for v in self.state[p].values())]

    @property
    def hyper(self) -> tuple:
        """The numbers an update takes as arguments: a graph of it holds for these only."""
        return (self.lr, self.betas)

    def graph_update(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], hyper: tuple
    ) -> None:
        """The update of :meth:`__call__` with gradients ``grads``, launching kernels only
        (no host reads). The learning rate and betas ``hyper`` (:attr:`hyper` when the
        graph is made) are the kernel's arguments: a graph of it must be made again when
        those in force change. (The fused kernel could read the learning rate from a
        tensor, but as a float32, where the eager update's argument is a double: another
        update in the last bits.) The caller calls :meth:`step_taken` before each replay."""
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self._update(params, *hyper)
        for p in params:
            p.grad = None

    def step_taken(self) -> None:
        """Count a step that a graph takes, for the schedulers (as :meth:`__call__` does)."""
        self.hyperparameters.step()

    def _add(self, p: torch.Tensor) -> None:
        """Fresh moments for ``p``, or those saved under its name by a checkpoint."""
        saved = self._state_waiting_to_be_consumed.pop(get_param_store().param_name(p), None)
        if saved is None:
            # torch.optim.Adam(fused=True)'s initial state: step 0 as a float on p's device.
            self.state[p] = {
                "step": torch.zeros((), dtype=torch.float32, device=p.device),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
        else:
            self.state[p] = {
                "step": saved["step"].to(p.device, torch.float32),
                "exp_avg": saved["exp_avg"].to(p.device),
                "exp_avg_sq": saved["exp_avg_sq"].to(p.device),
            }

    def get_state(self) -> dict:
        """Adam's moments and step count per parameter name (tensors only)."""
        store = get_param_store()
        state = dict(self._state_waiting_to_be_consumed)
        for p, values in self.state.items():
            state[store.param_name(p)] = {k: values[k] for k in _STATE_KEYS}
        return state

    def set_state(self, state_dict: dict) -> None:
        """Restore state saved by :meth:`get_state`; applied when each parameter first appears."""
        self._state_waiting_to_be_consumed.update(state_dict)
