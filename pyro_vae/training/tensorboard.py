"""TensorBoard logging of a run (``--tensorboard DIR``), through ``torch.utils.tensorboard``.

After each epoch the numbers of its metrics line go in as scalars (``train/elbo``,
``test/kl``, ``kl_weight``, ``lr``, ...; step = epoch) and the model's pictures of the
epoch as images; the final log p(x) goes in at the last epoch. TensorBoard is an
optional extra (``pip install "pyro-vae[tensorboard]"``); without it the run is
refused before its folder is made.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import PyroVAEError

GROUPS = ("train", "test", "validation")


def check_available() -> None:
    """Refuse ``--tensorboard`` where TensorBoard is not installed."""
    if importlib.util.find_spec("tensorboard") is None:
        raise PyroVAEError(
            "--tensorboard needs TensorBoard, which is not installed: "
            "pip install 'pyro-vae[tensorboard]'"
        )


def tag(key: str) -> str:
    """``train_elbo`` -> ``train/elbo``; other keys as they are."""
    group, _, name = key.partition("_")
    return f"{group}/{name}" if group in GROUPS and name else key


class Logger:
    """Scalars and pictures of each epoch into the TensorBoard folder ``folder``."""

    def __init__(self, folder: str | Path):
        check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def epoch(self, record: dict[str, Any], pictures: dict[str, Any]) -> None:
        step = record["epoch"]
        for key, value in record.items():
            if key != "epoch" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag(key), value, step)
        for name, grid in pictures.items():
            self.writer.add_image(name, grid, step)
        self.writer.flush()

    def final(self, summary: dict[str, Any], epoch: int) -> None:
        for key in ("log_px", "log_px_se", "test_accuracy"):
            if isinstance(summary.get(key), int | float):
                self.writer.add_scalar(f"final/{key}", summary[key], epoch)
        self.writer.close()
