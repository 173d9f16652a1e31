"""Pictures a person looks at: image grids and the ELBO curve.

Grids are torchvision's (``make_grid``, ``save_image``); curves are bare
``matplotlib.figure.Figure`` objects (no pyplot, no display, no global backend).
Every file is written atomically like every run file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid, save_image

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
    """Save flattened [0, 1] images ``(N, D)`` as a grid PNG (``torchvision.utils``), each
    image enlarged by whole pixels to about ``TILE_PIXELS`` wide."""
    h, w = image_shape[-2:]
    images = images.detach().float().cpu().clamp(0, 1).reshape(-1, 1, h, w)
    grid = make_grid(images, nrow=min(ncols, len(images)), padding=1, pad_value=1.0)
    scale = max(1, TILE_PIXELS // max(h, w))
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    buffer = io.BytesIO()
    save_image(grid, buffer, format="png")
    atomic_write(path, buffer.getvalue())


def elbo_curve(metrics: list[dict], path: str | Path) -> None:
    """Save train and test ELBO (nats/image) against epoch."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    # a reweighted KL term trains an objective that is no ELBO (see inference.kl)
    key, label = ("train_elbo", "train bound")
    if "train_objective" in metrics[0]:
        key, label = ("train_objective", "train objective (KL reweighted)")
    trained = [m for m in metrics if m.get(key) is not None]
    if trained:  # an estimator without a bound (tail) records none
        ax.plot([m["epoch"] for m in trained], [m[key] for m in trained], "o-", label=label)
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
