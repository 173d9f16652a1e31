"""Pictures a person looks at: image grids and the ELBO curve.

Figures are built as bare ``matplotlib.figure.Figure`` objects (no pyplot, no
display, no global backend) and written atomically like every run file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..training.runs import atomic_write

DPI = 100
TILE_PIXELS = 56
"""Each image is drawn about this many pixels wide, whatever its resolution."""


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` as a PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write(path, buffer.getvalue())


def image_grid(
    images: torch.Tensor, image_shape: Sequence[int], path: str | Path, ncols: int = 10
) -> None:
    """Save flattened [0, 1] images ``(N, D)`` as a grid PNG."""
    images = images.detach().float().cpu().clamp(0, 1).reshape(-1, *image_shape)
    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    h, w = image_shape[-2:]
    grid = torch.ones(nrows * (h + 1) + 1, ncols * (w + 1) + 1)
    for i, image in enumerate(images):
        r, c = divmod(i, ncols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = image
    inches_per_pixel = TILE_PIXELS / max(h, w) / DPI
    fig = Figure(figsize=(grid.shape[1] * inches_per_pixel, grid.shape[0] * inches_per_pixel))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    save_figure(fig, path)


def elbo_curve(metrics: list[dict], path: str | Path) -> None:
    """Save train and test ELBO (nats/image) against epoch."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    trained = [m for m in metrics if m["train_elbo"] is not None]
    if trained:  # an estimator without a bound (tail) records none
        ax.plot(
            [m["epoch"] for m in trained],
            [m["train_elbo"] for m in trained],
            "o-",
            label="train bound",
        )
    ax.plot(
        [m["epoch"] for m in metrics], [m["test_elbo"] for m in metrics], "s-", label="test ELBO"
    )
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats / image)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.set_layout_engine("tight")
    save_figure(fig, path)


def accuracy_curve(metrics: list[dict], path: str | Path) -> None:
    """Save validation and test accuracy against epoch."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [m["epoch"] for m in metrics]
    if metrics[0]["validation_accuracy"] is not None:
        ax.plot(epochs, [m["validation_accuracy"] for m in metrics], "o-", label="validation")
    ax.plot(epochs, [m["test_accuracy"] for m in metrics], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.set_layout_engine("tight")
    save_figure(fig, path)
