"""Stopping a run whose loss or parameters became NaN or infinite, for free per step.

Each step the loop reads the loss SVI already returned (a traced step's loss stays a
tensor on its device, and is read every ``CHECK_EVERY`` steps and at the epoch's end,
so a GPU need not wait for the host at each step). A NaN or infinite
gradient with a finite loss turns Adam's update, and so the parameters, into
NaN, which the next step's loss shows. The parameters themselves are checked
once per epoch, before anything is evaluated or saved, so no checkpoint is ever
written from a poisoned model, also where the estimator's loss is no bound
(``tail``). Checking every gradient on every step instead cost 1.3 ms at batch
128 (``torch.isfinite``), a quarter of the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import TrainingDiverged

__all__ = ["Guard", "TrainingDiverged", "finite"]


def finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite.

    A sum is NaN or infinite when any term is; it reads each tensor once, where
    ``torch.isfinite`` builds a mask first (118 against 1,297 us for the 670k
    parameters of the default VAE). Only finite values so large that their sum
    overflows float32 (about 3e38) would be taken for a divergence.
    """
    with torch.no_grad():
        return bool(torch.stack([t.sum() for t in tensors]).sum().isfinite())


CHECK_EVERY = 50
"""Steps between the host's reads of losses that a step leaves on its device."""


class Guard:
    """Runs training steps, raising ``TrainingDiverged`` that names the step when one goes bad,
    and sums the epoch's losses.

    A step's loss that is a float is checked at once; one that is a tensor (the traced
    step's, on its device) waits with the others until ``every`` of them are read together,
    or the epoch ends, and the error names the first bad step all the same.

    Args:
        params: the parameters being trained.
        run_dir: the run folder, for the message.
        last_saved: the epoch of the checkpoint on disk (0: none); update it on each save.
        check_loss: whether the loss is a bound whose NaN or infinity means divergence.
        every: how many tensor losses wait before the host reads them.
    """

    def __init__(
        self,
        params,
        run_dir: Path,
        last_saved: int,
        check_loss: bool = True,
        every: int = CHECK_EVERY,
    ):
        self.params, self.run_dir = list(params), run_dir
        self.last_saved, self.check_loss, self.every = last_saved, check_loss, every
        self._pending: list[tuple[int, int, torch.Tensor]] = []
        self._sum = 0.0

    def step(self, fn: Callable[..., float], *args, epoch: int, step: int) -> float | torch.Tensor:
        """``fn(*args)``, the loss it returns checked (now, or with the next read)."""
        try:
            loss = fn(*args)
        except ValueError:
            # With Pyro's validation on, NaN parameters are refused as distribution arguments.
            self._read()  # a bad loss still waiting names the step that went bad first
            if finite(self.params):
                raise
            raise self.error("the parameters", f"before epoch {epoch} step {step}") from None
        if isinstance(loss, torch.Tensor):
            self._pending.append((epoch, step, loss))
            if len(self._pending) >= self.every:
                self._read()
        else:
            self._add(loss, epoch, step)
        return loss

    def _add(self, loss: float, epoch: int, step: int) -> None:
        if self.check_loss and not math.isfinite(loss):
            raise self.error("the loss", f"at epoch {epoch} step {step}")
        self._sum += loss

    def _read(self) -> None:
        """The waiting losses, read in one transfer and added in order."""
        if self._pending:
            values = torch.stack([loss for *_, loss in self._pending]).tolist()
            pending, self._pending = self._pending, []
            for (epoch, step, _), value in zip(pending, values, strict=True):
                self._add(value, epoch, step)

    def epoch_loss(self) -> float:
        """The sum of the losses since the last call (all of them read and checked)."""
        self._read()
        total, self._sum = self._sum, 0.0
        return total

    def end_of_epoch(self, epoch: int) -> None:
        """Refuses to let a poisoned epoch be evaluated or saved."""
        self._read()
        if not finite(self.params):
            raise self.error("the parameters", f"in epoch {epoch}")

    def error(self, what: str, when: str) -> TrainingDiverged:
        if self.last_saved:
            kept = f"the checkpoint of epoch {self.last_saved} in {self.run_dir} is kept"
        else:
            kept = "before any checkpoint was written"
        return TrainingDiverged(
            f"{what} became NaN or infinite {when}; {kept} (try a lower --lr or --clip-grad)"
        )
