"""Stopping a run whose loss or gradients became NaN or infinite, without an extra sync."""

from __future__ import annotations

import torch

from .errors import PyroVAEError


class TrainingDiverged(PyroVAEError):
    """A loss or gradient became NaN or infinite; the last good checkpoint is kept."""


class GradientWatch:
    """Flags a non-finite gradient of any watched parameter, read once per step.

    Backward hooks OR a device-side flag, so watching costs no synchronization
    beyond the one ``svi.step`` already makes for its loss.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.flag = torch.zeros((), dtype=torch.bool, device=params[0].device)
        self.handles = [p.register_hook(self._check) for p in params]

    def _check(self, grad: torch.Tensor) -> None:
        self.flag.logical_or_(~torch.isfinite(grad).all())

    def tripped(self) -> bool:
        return bool(self.flag.item())

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
