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

``mode="cudagraph"`` (:class:`CapturedStep`) captures the traced graph in a CUDA graph
per batch shape, with static buffers for the batch and the KL weight, and replays it:
one launch for the ELBO, all its gradients and Adam's fused update, where the eager
step launches hundreds of kernels from Python. Replays draw from the device's
generator as the eager kernels would (PyTorch's graph-safe Philox offsets), so the
numbers are the traced step's; on a CPU, or where a capture fails, it says so once and
replays the traced graph uncaptured. ``mode="inductor-cudagraph"`` captures the graph as
inductor compiled it: its fused kernels, fewer and larger than the traced graph's ATen
operations, in one CUDA graph (and on a CPU, the compiled graph uncaptured).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyro
import pyro.infer.trace_elbo
import pyro.infer.trace_mean_field_elbo
import pyro.infer.traceenum_elbo
import torch
from torch import nn

from ..errors import PyroVAEError
from ..inference.kl import KLTerm
from ..inference.optim import Adam

log = logging.getLogger(__name__)

CAPTURED = ("cudagraph", "inductor-cudagraph")
"""The modes whose step is a :class:`CapturedStep`."""

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
        mode: ``"trace"``, ``"inductor"``, ``"cudagraph"`` or ``"inductor-cudagraph"`` (see
            the module's docstring).
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
            if self.mode in ("inductor", "inductor-cudagraph"):
                import torch._inductor.config as inductor

                inductor.fallback_random = True  # PyTorch's own random draws: eager's stream
                # On a CPU its C++ wrapper calls the kernels, not Python: 3 % a step
                # (docs/PERFORMANCE.md, session 11)
                cpu = all(a.device.type == "cpu" for a in args)
                options = {"cpp_wrapper": True} if cpu else {}
                graph = torch.compile(graph, dynamic=False, options=options)
            self.graphs[key] = graph
            log.info("traced the training step for batches of shape %s", [k[0] for k in key])
        return self.graphs[key]

    def prepare(self, args: tuple[torch.Tensor, ...]) -> None:
        """Trace (and compile) for batches shaped like ``args`` before the first step."""
        self.graph(args)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        """One step; its loss stays a tensor on the batch's device (the loop's guard reads
        the losses every ``divergence.CHECK_EVERY`` steps), so the host need not wait."""
        graph = self.graph(args)
        with torch.no_grad():  # the graph computes the gradients itself: no autograd to record
            loss, grads = graph(self.params, self._weight(args), *args)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.optimizer(self.params)
        return loss.detach()


def cuda_graph(
    fn: Callable[[], Any], device: torch.device, kept: Callable = contextlib.nullcontext
) -> tuple[Callable[[], None], Any]:
    """``fn`` captured in a CUDA graph: (replay, the outputs that each replay overwrites).

    ``fn`` must be a function of tensors that stay in place (the graph reads them at
    their addresses). ``kept()`` is a context that puts back what ``fn`` changes besides
    the device's random stream (an optimizer's parameters and moments, copied). ``fn``
    is first run twice on a side stream, as capture needs (lazy cuBLAS and allocator
    set-up); those runs change nothing that lasts: the random stream is put back by
    ``fork_rng``, the rest by ``kept``. Capture records and runs nothing: the device
    generator's offset moves at each replay, by what the eager kernels would have drawn.
    """
    # On ``device`` whatever the current device is (cuda:0 under torchrun, --device
    # cuda:1): a capture records only its stream's device, and torch.cuda.graph's own
    # stream would be made on the current one, another device's kernels running eagerly.
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        with torch.random.fork_rng(devices=[device]), kept():
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # The outer context puts the caller's stream back even when capture_end raises
        # (torch.cuda.graph's exit then skips its own restore).
        with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
            outputs = fn()
    return graph.replay, outputs


@contextlib.contextmanager
def _restored(tensors: Sequence[torch.Tensor]) -> Iterator[None]:
    """``tensors`` hold on leaving what they held on entering (copied back in place)."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, value in zip(tensors, saved, strict=True):
                t.copy_(value)


class InGraphBatches:
    """How a captured step makes its own batch from the step's argument, the indices of
    its images, so that gathering and binarizing the batch join the CUDA graph.

    Args:
        make: ``make(index)``, the step arguments of the batch at ``index`` (a model's
            ``step_args`` bound to its data).
        kept: a context under which batches drawn leave the data's generators as they
            were (``ImageBatches.generator_kept``).
    """

    def __init__(self, make: Callable[[torch.Tensor], tuple], kept: Callable):
        self.make, self.kept = make, kept

    def __call__(self, index: torch.Tensor) -> tuple:
        return self.make(index)

    def example(self, index: torch.Tensor) -> tuple:
        """Step arguments shaped as ``index``'s, drawn without moving any generator."""
        with self.kept():
            return self.make(index)


class _Capture:
    """One batch shape's traced graph, captured: static buffers for the batch (the
    parameters and the KL weight's buffer are read in place) and the graph's outputs;
    with ``update`` (Adam's :meth:`~pyro_vae.inference.optim.Adam.graph_update` bound to
    the parameters and the learning rate and betas in force), the update too, in the same
    graph; ``mutated``: what the update writes."""

    def __init__(
        self,
        graph: Callable,
        params,
        weight: torch.Tensor,
        args,
        capture: Callable,
        update: Callable | None = None,
        mutated: Sequence[torch.Tensor] = (),
        batches: InGraphBatches | None = None,
    ):
        self.inputs = [a.clone() for a in args]
        self.update = update

        def run():
            with torch.no_grad():  # the graph computes the gradients itself
                step_args = self.inputs if batches is None else batches(*self.inputs)
                loss, grads = graph(params, weight, *step_args)
                if update is not None:
                    update(grads)
            return loss, grads

        def kept():
            stack = contextlib.ExitStack()
            stack.enter_context(_restored(mutated))
            if batches is not None:
                stack.enter_context(batches.kept())
            return stack

        self._replay, (self.loss, self.grads) = capture(run, args[0].device, kept)

    def replay(self, args: tuple[torch.Tensor, ...]) -> None:
        for buffer, a in zip(self.inputs, args, strict=True):
            buffer.copy_(a)
        self._replay()


class CapturedStep(TracedStep):
    """The traced step captured in one CUDA graph per batch shape (``--compile cudagraph``;
    ``inductor-cudagraph`` captures inductor's compiled graph instead).

    The first step of each batch shape traces and captures (the last, smaller batch of
    an epoch gets its own graph); every step then copies its batch into the graph's
    buffer, fills the KL weight's buffer and replays. Adam's fused update is in the same
    graph, applied to the gradients there (``adam_inside``; otherwise, as under torchrun,
    it runs after the replay on the gradients the graph left in its outputs). Its loss
    is copied out of the graph's output, so the divergence guard can read many steps'
    losses at once. Batches on a CPU, or a shape whose capture fails, replay the traced
    graph uncaptured, said once.
    """

    def __init__(
        self,
        *args: Any,
        adam_inside: bool = True,
        batches: InGraphBatches | None = None,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.batches = batches
        """With it the step takes the indices of its images and makes the batch in the
        graph; without, the step takes the batch."""
        self.captures: dict[tuple, _Capture | None] = {}
        self.recaptured: dict[tuple, int] = {}
        """How often each batch shape was captured again, for a new learning rate."""
        self.adam_inside = adam_inside and isinstance(self.optimizer, Adam)
        """Whether Adam's update joins the graph: not under torchrun, whose gradients are
        averaged across processes before it, nor where a schedule moves the learning rate
        every step (a graph holds one learning rate; it is captured again when the rate
        changes, which an epoch's schedule does once an epoch)."""

    capture_with = staticmethod(cuda_graph)
    """How a graph is captured (``cuda_graph``); a test puts a CPU stand-in here."""

    def capturable(self, device: torch.device) -> bool:
        return device.type == "cuda"

    @staticmethod
    def batches_capturable(data) -> bool:
        """Whether ``data``'s batches can be made inside the graph (drawn on the device)."""
        return data.draws_on_device

    def capture(self, args: tuple[torch.Tensor, ...]) -> _Capture | None:
        """The capture for batches shaped like ``args`` (None: replayed uncaptured)."""
        key = tuple((tuple(a.shape), a.dtype, a.device) for a in args)
        if key not in self.captures:
            graph = self.graph(args if self.batches is None else self.batches.example(*args))
            if not self.capturable(args[0].device):
                log.warning(
                    "--compile %s: CUDA graphs need a CUDA device, and the batch is on "
                    "%s; replaying the traced step uncaptured",
                    self.mode,
                    args[0].device,
                )
                self.captures[key] = None
            else:
                try:
                    weight = self._weight(args)
                    update, mutated = self._update(args[0].device)
                    self.captures[key] = _Capture(
                        graph,
                        self.params,
                        weight,
                        args,
                        self.capture_with,
                        update,
                        mutated,
                        self.batches,
                    )
                except Exception as raised:  # a component whose kernels cannot be captured
                    e = _first_error(raised)  # not capture_end's "previous error during capture"
                    log.warning(
                        "--compile %s: could not capture %s's step for batches of "
                        "shape %s (%s at %s: %s); replaying it uncaptured",
                        self.mode,
                        type(self.model).__name__,
                        [k[0] for k in key],
                        type(e).__name__,
                        _culprit(e),
                        (str(e).strip().splitlines() or [""])[0][:120],
                    )
                    self.captures[key] = None
                else:
                    log.log(
                        logging.DEBUG if key in self.recaptured else logging.INFO,
                        "captured the training step%s%s for batches of shape %s",
                        " with its batch" if self.batches else "",
                        " with Adam's update" if update else "",
                        [k[0] for k in key],
                    )
        return self.captures[key]

    def _update(self, device: torch.device) -> tuple[Callable | None, list[torch.Tensor]]:
        """Adam's update for the graph, as a function of the gradients, and what it writes;
        (None, []) where it stays outside."""
        if not (self.adam_inside and self.optimizer.graphable(device)):
            return None, []
        hyper = self.optimizer.hyper  # the learning rate and betas the graph holds
        update = functools.partial(self.optimizer.graph_update, self.params, hyper=hyper)
        return update, self.optimizer.mutated(self.params)

    def prepare(self, args: tuple[torch.Tensor, ...]) -> None:
        self.capture(args)

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        captured = self.capture(args)
        if captured is None:
            return super().__call__(*(args if self.batches is None else self.batches(*args)))
        self._weight(args)  # the captured weight buffer, filled in place
        if captured.update is not None:
            if captured.update.keywords["hyper"] != self.optimizer.hyper:  # a schedule's move
                key = next(k for k, c in self.captures.items() if c is captured)
                del self.captures[key]
                self.recaptured[key] = self.recaptured.get(key, 0) + 1
                del captured  # the old graph's memory goes before the new one is captured
                return self(*args)
            self.optimizer.step_taken()
            captured.replay(args)
            return captured.loss.clone()
        captured.replay(args)
        for p, g in zip(self.params, captured.grads, strict=True):
            p.grad = g
        self.optimizer(self.params)
        return captured.loss.clone()


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
    adam_inside: bool = True,
    batches: InGraphBatches | None = None,
) -> TracedStep | None:
    """A :class:`TracedStep`, or None (with a one-line notice) where the step cannot be
    traced: an estimator whose registry entry is not ``traceable`` (its gradients only
    come in place, or PyTorch's JIT compiles it already), or a component that reads
    values on the host (a plugin's, say), named in the notice. ``adam_inside``: whether
    a captured step may hold Adam's update (False where the learning rate moves every
    step). ``batches``: a captured step's batches made in its graph; ``args`` are then
    the first step's indices."""
    from ..inference.elbos import estimators

    if not estimators.parse(spec)[0].traceable:
        log.warning("--compile: estimator %s cannot be traced; training eagerly", spec)
        return None
    if pyro.poutine.util.is_validation_enabled():
        log.warning("--compile: Pyro's validation (--validate) cannot be traced; training eagerly")
        return None
    if mode in CAPTURED:
        step = CapturedStep(
            model, elbo, optimizer, mode, program, kl, adam_inside=adam_inside, batches=batches
        )
    else:
        if batches is not None:
            raise ValueError(f"--compile {mode}: only a captured step makes its own batches")
        step = TracedStep(model, elbo, optimizer, mode, program, kl)
    try:
        step.prepare(args)
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


def _first_error(error: BaseException) -> BaseException:
    """The first exception of ``error``'s chain: what went wrong, under what it caused."""
    while error.__context__ is not None:
        error = error.__context__
    return error


def _culprit(error: BaseException) -> str:
    """The innermost place outside PyTorch where ``error`` was raised: the component (or
    Pyro's code) that read a traced value, as ``file.py:line (function)``."""
    import traceback

    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return "an unknown place"
    f = frames[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"
