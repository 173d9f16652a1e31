"""Which device a run uses: ``cpu``, ``cuda[:N]`` or ``auto``."""

from __future__ import annotations

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
