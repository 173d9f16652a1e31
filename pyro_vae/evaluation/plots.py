"""Pictures a person looks at: image grids and the ELBO curve.

Grids are laid out by torchvision's ``make_grid`` and drawn, like the curves, on bare
``matplotlib.figure.Figure`` objects (no pyplot, no display, no global backend), each
with a title and labelled axes.
Every file is written atomically like every run file.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchvision.utils import make_grid

from ..training.runs import atomic_write

DPI = 100
TILE_PIXELS = 56
"""Each image is drawn about this many pixels wide, whatever its resolution."""


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write ``fig`` as a PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    atomic_write(path, buffer.getvalue())


def grid_tensor(images: torch.Tensor, image_shape: Sequence[int], ncols: int) -> torch.Tensor:
    """Flattened [0, 1] images ``(N, D)`` laid out ``ncols`` a row by torchvision's
    ``make_grid``: a (3, H, W) tensor on the CPU, one pixel of white between tiles."""
    h, w = image_shape[-2:]
    images = images.detach().float().cpu().clamp(0, 1).reshape(-1, 1, h, w)
    return make_grid(images, nrow=min(ncols, len(images)), padding=1, pad_value=1.0)


def image_grid(
    images: torch.Tensor,
    image_shape: Sequence[int],
    path: str | Path,
    ncols: int = 10,
    *,
    title: str = "",
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    xlabel: str = "",
    ylabel: str = "",
) -> None:
    """Save flattened [0, 1] images ``(N, D)`` as a labelled grid PNG: the tiles laid out by
    torchvision's ``make_grid``, drawn with matplotlib at about ``TILE_PIXELS`` per image,
    with a title, and labels for the rows, the columns and the axes where given."""
    h, w = image_shape[-2:]
    ncols = min(ncols, len(images))
    nrows = -(-len(images) // ncols)
    grid = grid_tensor(images, image_shape, ncols)[0].numpy()
    tile = TILE_PIXELS / DPI
    fig = Figure(figsize=(ncols * tile + 1.4, nrows * tile + 1.0))
    ax = fig.subplots()
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    centers = lambda n, size: [1 + i * (size + 1) + size / 2 for i in range(n)]  # noqa: E731
    ax.set_yticks(centers(nrows, h) if row_labels else [], list(row_labels or []))
    ax.set_xticks(centers(ncols, w) if col_labels else [], list(col_labels or []))
    ax.tick_params(length=0, labelsize=8)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.set_layout_engine("tight")
    save_figure(fig, path)


def elbo_curve(metrics: list[dict], path: str | Path, title: str = "ELBO per epoch") -> None:
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
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.set_layout_engine("tight")
    save_figure(fig, path)


def accuracy_curve(metrics: list[dict], path: str | Path, title: str = "accuracy") -> None:
    """Save validation and test accuracy against epoch."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    epochs = [m["epoch"] for m in metrics]
    if metrics[0]["validation_accuracy"] is not None:
        ax.plot(epochs, [m["validation_accuracy"] for m in metrics], "o-", label="validation")
    ax.plot(epochs, [m["test_accuracy"] for m in metrics], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.set_layout_engine("tight")
    save_figure(fig, path)
