"""Which device a run uses: ``cpu``, ``cuda[:N]`` or ``auto``; how its CPU treats denormals."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import PyroVAEError


def resolve_device(name: str | torch.device) -> torch.device:
    """``cpu``, ``cuda[:N]``, or ``auto`` (a GPU when there is one)."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PyroVAEError(f"--device {name} asked for, but no CUDA GPU is available; use cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PyroVAEError(
            f"unknown device {name!r}; choose from: cpu, cuda, cuda:N, auto"
        ) from None


def flushing_denormals() -> bool:
    """Whether this thread's CPU now flushes subnormal floats to zero."""
    return (torch.tensor([1e-38]) / 10).item() == 0.0


@contextlib.contextmanager
def denormals(mode: str, device: torch.device) -> Iterator[None]:
    """Within: on the CPU, ``"flush"`` sets flush-to-zero and denormals-are-zero
    (``torch.set_flush_denormal``); ``"keep"``, or another device, changes nothing.
    The mode before is restored after.

    IEEE subnormals (magnitudes below 1.2e-38 in float32) take a slow path through x86
    CPUs. Training makes them: Adam's running moments of a weight whose gradient is
    mostly zero (from a pixel that is nearly always off) decay through them, and so do
    densities far out in a tail. An M2 epoch on MNIST at lr 1e-2 slowed from 18 s to
    141 s by its tenth; with them flushed it took 17 s, with the same validation and
    test accuracy and a train loss equal to 9 digits (docs/PERFORMANCE.md).
    """
    if mode != "flush" or device.type != "cpu":
        yield
        return
    before = flushing_denormals()
    if not torch.set_flush_denormal(True):  # a CPU without the FTZ/DAZ modes
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
