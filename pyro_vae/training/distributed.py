"""Several processes, one run: torch.distributed under ``torchrun``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) each process trains on a disjoint shard of
every epoch, and PyTorch's DistributedDataParallel averages the gradients of the
ELBO that Pyro computes. Pyro's ``ELBOModule`` turns the ELBO of a model and guide
into an ``nn.Module`` for DDP to wrap; the model and guide are given to it as
modules here. gloo carries the traffic on CPU, nccl on CUDA; rank 0 alone writes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import PyroVAEError


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init(device: torch.device) -> World:
    """Join the process group that ``torchrun`` set up (a world of one without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """``cuda`` becomes this process's GPU (``LOCAL_RANK``) under torchrun, made the current
    device too (NCCL's collectives and CUDA-graph capture work on the current device)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def all_sum(world: World, *values: float, device: torch.device) -> list[float]:
    """Sums of ``values`` over all processes (the values themselves in a world of one)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def parameters_agree(world: World, module: nn.Module) -> bool:
    """Whether every process holds exactly the same parameters."""
    if not world.distributed:
        return True
    with torch.no_grad():
        flat = torch.cat([p.detach().flatten() for p in module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world.size)]
    dist.all_gather(gathered, flat)
    return all(torch.equal(g, gathered[0]) for g in gathered)


class Program(nn.Module):
    """A model's step program (its model or its guide) as a module, so ``ELBOModule`` and DDP
    see the model's parameters."""

    def __init__(self, vae: nn.Module, fn):
        super().__init__()
        self.vae, self.fn = vae, fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def check_supported(spec: str) -> None:
    """Refuse an estimator without a loss DDP can differentiate (its registry entry's
    ``works_under_ddp``: Pyro's RenyiELBO, TraceGraph_ELBO and TraceTailAdaptive_ELBO
    only produce gradients in place)."""
    from ..inference.elbos import estimators

    if not estimators.parse(spec)[0].works_under_ddp:
        usable = ", ".join(e.name for e in estimators.entries() if e.works_under_ddp)
        raise PyroVAEError(
            f"estimator {spec!r} cannot run under torchrun (it has no differentiable loss "
            f"for DistributedDataParallel); choose from: {usable}"
        )


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def finish(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def step(model, program, optimizer, elbo, size: int):
    """One training step under torchrun: Pyro's ELBO as a module, gradients averaged by DDP.

    The plate's size is the training set's, so each rank's loss estimates the ELBO of
    the whole dataset and DDP's average of the ranks' gradients is its gradient. The
    step returns the loss of this rank's batch alone, for the metrics.
    """
    from torch.nn.parallel import DistributedDataParallel

    model_fn, guide_fn = program
    loss_module = elbo(Program(model, model_fn), Program(model, guide_fn))
    ddp = DistributedDataParallel(loss_module)
    params = [p for p in model.parameters() if p.requires_grad]

    def run(x: torch.Tensor) -> float:
        loss = ddp(x, size=size)
        loss.backward()
        optimizer(params)
        return loss.item() * len(x) / size

    return run


def sized(program: tuple[Callable, Callable], size: int) -> tuple[Callable, Callable]:
    """The step's model and guide with the data plate at the training set's size, as
    :func:`step` calls them: each rank's loss estimates the whole dataset's ELBO."""
    return tuple(functools.partial(fn, size=size) for fn in program)


class GradientMean:
    """``optimizer`` applied to the mean of the ranks' gradients, what DDP would average,
    all-reduced in one flat buffer outside the traced step's graph (``--compile`` under
    torchrun)."""

    def __init__(self, optimizer: Callable, world: World):
        self.optimizer, self.world = optimizer, world

    def __call__(self, params: list[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world.size
        for p, mean in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = mean.view_as(p)
        self.optimizer(params)


def rank_share(step_fn: Callable, size: int) -> Callable:
    """A traced step under torchrun: its loss, which estimates the whole dataset's, scaled
    to this rank's batch for the metrics, as :func:`step` returns it (kept a tensor)."""

    def run(x: torch.Tensor, *args):
        return step_fn(x, *args) * (len(x) / size)

    return run
