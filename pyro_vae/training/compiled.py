"""The SVI step traced once per batch shape and replayed as one graph (``--compile``).

Pyro still runs the model and the guide and computes every log-density, once, while
``torch.fx``'s ``make_fx`` records the operations of the ELBO's loss and of its
gradients with respect to every parameter: one graph of ATen operations per batch
shape, replayed on each step with the step's batch and the current parameters (as
inputs), then Adam. ``mode="trace"`` replays the graph as recorded (for checking it:
the same loss and gradients as Pyro's eager step, bit for bit, under the same seed);
``mode="inductor"`` compiles it with ``torch.compile``'s inductor, which fuses the
elementwise work (about 20 s per batch shape on 2 CPU cores).

Two of Pyro's helpers read numbers on the host, which a traced graph cannot: the
ELBOs turn log-densities into Python floats (``torch_item``) and check the loss for
NaN (``warn_if_nan``). :func:`tensors_not_floats` swaps both for identities while
tracing only; the replayed loss is checked by the loop's divergence guard instead.
Random draws are operations of the graph, drawn from torch's generator at each
replay as the eager step draws them (inductor keeps PyTorch's own random operations:
``fallback_random``), so a traced run follows the eager run's random stream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import pyro.infer.traceenum_elbo
import torch
from torch import nn

from ..errors import PyroVAEError
from ..inference.kl import KLTerm

log = logging.getLogger(__name__)

MODES = ("none", "trace", "inductor")

_PYRO_MODULES = (pyro.infer.trace_elbo, pyro.infer.trace_mean_field_elbo, pyro.infer.traceenum_elbo)


def _identity(value: Any, *args: Any, **kwargs: Any) -> Any:
    return value


@contextlib.contextmanager
def tensors_not_floats() -> Iterator[None]:
    """While tracing: Pyro's ``torch_item`` and ``warn_if_nan`` return their tensor as is."""
    saved = [
        (module, name, getattr(module, name))
        for module in _PYRO_MODULES
        for name in ("torch_item", "warn_if_nan")
        if hasattr(module, name)
    ]
    for module, name, _ in saved:
        setattr(module, name, _identity)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


class _Loss(nn.Module):
    """The ELBO's differentiable loss of a model's step program (its ``traceable_loss``
    where it has one), as a module over its parameters (so ``functional_call`` can put
    the traced inputs in their place)."""

    def __init__(self, model: nn.Module, program: tuple[Callable, Callable], elbo: Any):
        super().__init__()
        self.model, self.program, self.elbo = model, program, elbo

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        loss = getattr(self.elbo, "traceable_loss", self.elbo.differentiable_loss)
        return loss(*self.program, *args)


class TracedStep:
    """One SVI step, traced per batch shape (and device and dtype) and replayed.

    Args:
        model: a ``Trainable`` ``PyroProgram``.
        elbo: its estimator; it needs a ``differentiable_loss``.
        optimizer: the Adam that applies the gradients (``inference.optim.Adam``).
        mode: ``"trace"`` or ``"inductor"`` (see the module's docstring).
        program: the model and guide of its step (default: ``model.svi_program()``),
            under the KL term's handlers.
        kl: the KL term (default: none); its weight, which warm-up changes, is an input
            of the graph.
    """

    def __init__(
        self,
        model: nn.Module,
        elbo: Any,
        optimizer: Callable,
        mode: str,
        program: tuple[Callable, Callable] | None = None,
        kl: KLTerm | None = None,
    ):
        self.model, self.optimizer, self.mode = model, optimizer, mode
        self.kl = kl or KLTerm()
        self.loss = _Loss(model, program or model.svi_program(), elbo)
        named = [(n, p) for n, p in self.loss.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        model.register("model")  # names in Pyro's param store, for the optimizer's state
        model.register("guide")
        self.graphs: dict[tuple, Callable] = {}
        self.weights: dict[torch.device, torch.Tensor] = {}

    def _loss_and_grads(self, params: list[torch.Tensor], weight: torch.Tensor, *args):
        with self.kl.weighted(weight):
            loss = torch.func.functional_call(
                self.loss, dict(zip(self.names, params, strict=True)), args
            )
        return loss, torch.autograd.grad(loss, params)

    def _weight(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The KL weight in force, as the graph's input: one buffer per device, filled in
        place (a kernel with the value as its argument, no copy from the host to wait on)."""
        device = args[0].device
        if device not in self.weights:
            self.weights[device] = torch.zeros((), device=device)
        return self.weights[device].fill_(float(self.kl.weight))

    def graph(self, args: tuple[torch.Tensor, ...]) -> Callable:
        """The graph for batches shaped like ``args``: traced (and compiled) on first use."""
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        if key not in self.graphs:
            from torch.fx.experimental.proxy_tensor import make_fx

            devices = [a.device for a in args if a.device.type == "cuda"]
            # Tracing runs the step once: its random draws must not move the stream. The
            # graph holds no validation (its checks read values on the host).
            with (
                torch.random.fork_rng(devices=devices),
                tensors_not_floats(),
                _tracing(self),
                pyro.validation_enabled(False),
            ):
                graph = make_fx(self._loss_and_grads)(self.params, self._weight(args), *args)
            if self.mode == "inductor":
                import torch._inductor.config as inductor

                inductor.fallback_random = True  # PyTorch's own random draws: eager's stream
                graph = torch.compile(graph, dynamic=False)
            self.graphs[key] = graph
            log.info("traced the training step for batches of shape %s", [k[0] for k in key])
        return self.graphs[key]

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        """One step; its loss stays a tensor on the batch's device (the loop's guard reads
        the losses every ``divergence.CHECK_EVERY`` steps), so the host need not wait."""
        loss, grads = self.graph(args)(self.params, self._weight(args), *args)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.optimizer(self.params)
        return loss.detach()


@contextlib.contextmanager
def _tracing(step: TracedStep) -> Iterator[None]:
    """The model's parameters are the traced step's inputs: no registration with Pyro."""
    step.model.__dict__["_traced_step"] = True
    try:
        yield
    finally:
        step.model.__dict__["_traced_step"] = False


def traced_step(
    model: nn.Module,
    elbo: Any,
    optimizer: Callable,
    mode: str,
    args: tuple,
    spec: str,
    program: tuple[Callable, Callable] | None = None,
    kl: KLTerm | None = None,
) -> TracedStep | None:
    """A :class:`TracedStep`, or None (with a one-line notice) where the step cannot be
    traced: an estimator whose registry entry is not ``traceable`` (its gradients only
    come in place, or PyTorch's JIT compiles it already), or a component that reads
    values on the host (a plugin's, say), named in the notice."""
    from ..inference.elbos import estimators

    if not estimators.parse(spec)[0].traceable:
        log.warning("--compile: estimator %s cannot be traced; training eagerly", spec)
        return None
    if pyro.poutine.util.is_validation_enabled():
        log.warning("--compile: Pyro's validation (--validate) cannot be traced; training eagerly")
        return None
    step = TracedStep(model, elbo, optimizer, mode, program, kl)
    try:
        step.graph(args)
    except PyroVAEError:  # bad input, as the eager step would say it too
        model.__dict__["_traced_step"] = False
        raise
    except Exception as e:  # what Pyro, PyTorch or a component raises on a traced value
        log.warning(
            "--compile: could not trace %s's step: %s at %s reads a value on the host "
            "(%s); training eagerly",
            type(model).__name__,
            type(e).__name__,
            _culprit(e),
            (str(e).strip().splitlines() or [""])[0][:120],
        )
        model.__dict__["_traced_step"] = False
        return None
    return step


def _culprit(error: BaseException) -> str:
    """The innermost place outside PyTorch where ``error`` was raised: the component (or
    Pyro's code) that read a traced value, as ``file.py:line (function)``."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "an unknown place"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"
