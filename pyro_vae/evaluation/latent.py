"""Looking at the latent space of a trained VAE: posterior means, maps, lines, the manifold.

Everything here reads the guide q(z|x) and the decoder's p(x|z) of a model that has
them (``encode``, ``decoder``, ``likelihood``, ``prior``: the VAE and its subclasses).
``report`` writes what ``pyro-vae latent RUN`` writes; the functions it uses compute
the numbers on their own, from Python:

- the posterior means and scales of the test set (``latents.npz``);
- active units (Burda et al. 2016): a dimension u is active when
  Cov_x(E_q(u|x)[u]) > 0.01, the variance over images of its posterior mean;
- the KL of each dimension, E_x KL(q(z_j|x) || p(z_j)), in closed form, where q and
  p factorize over z's dimensions (a diagonal Normal guide and prior).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch.distributions import kl_divergence

from ..errors import PyroVAEError
from ..inference.kl import factorizes
from ..training.runs import SUMMARY_FILE, atomic_write, write_json
from .evaluate import EVAL_SEED, seeded
from .plots import image_grid, save_figure

ACTIVE = 0.01
"""Burda et al.'s threshold on Cov_x(E_q[u]) for an active unit."""

POSTERIOR_DRAWS = 64
"""Draws per image for q's mean and scale where it has no closed form (flows)."""


def _check(vae) -> None:
    needed = ("encode", "decoder", "likelihood", "prior", "latent_dim", "image_shape")
    if not all(hasattr(vae, name) for name in needed):
        raise PyroVAEError(
            f"the latent tools read a VAE's q(z|x), p(z) and p(x|z); a {type(vae).__name__} "
            f"has no single encoder to read"
        )


@torch.no_grad()
def posterior_moments(vae, x: torch.Tensor, batch_size: int = 1000):
    """Mean and standard deviation of q(z|x) per image, each (N, latent_dim): in closed form
    where the guide has one, else over ``POSTERIOR_DRAWS`` draws (seeded)."""
    means, scales = [], []
    for xb in x.split(batch_size):
        q = vae.encode(xb)
        try:
            mean, scale = q.mean, q.stddev
        except NotImplementedError:
            with seeded(EVAL_SEED, xb.device):
                z = q.sample((POSTERIOR_DRAWS,))
            mean, scale = z.mean(0), z.std(0)
        means.append(mean)
        scales.append(scale)
    return torch.cat(means), torch.cat(scales)


def activity(means: torch.Tensor) -> torch.Tensor:
    """Cov_x(E_q[u]) of each dimension u: the variance over images of its posterior mean."""
    return means.double().var(0)


def active_units(means: torch.Tensor, threshold: float = ACTIVE) -> int:
    """How many dimensions are active: Cov_x(E_q[u]) > ``threshold`` (Burda et al. 2016)."""
    return int((activity(means) > threshold).sum())


@torch.no_grad()
def kl_per_dimension(vae, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor | None:
    """E_x KL(q(z_j|x) || p(z_j)) of each dimension j, in closed form; None where q or p does
    not factorize over z's dimensions or PyTorch has no closed form for the pair."""
    total = None
    for xb in x.split(batch_size):
        q, p = vae.encode(xb), vae.prior()
        if not all(factorizes(d) for d in (q, p)):
            return None
        try:
            kl = kl_divergence(q.base_dist, p.base_dist).double().sum(0)
        except NotImplementedError:
            return None
        total = kl if total is None else total + kl
    return total / len(x)


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> torch.Tensor:
    """The mean of p(x|z) for each row of ``z``."""
    return vae.likelihood(vae.decoder(z)).mean


@torch.no_grad()
def interpolations(vae, a: torch.Tensor, b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decoded straight lines from q's mean of each image of ``a`` to that of the same row
    of ``b``: (pairs, steps, D)."""
    za, zb = posterior_moments(vae, a)[0], posterior_moments(vae, b)[0]
    t = torch.linspace(0, 1, steps, device=za.device).view(1, -1, 1)
    z = (1 - t) * za.unsqueeze(1) + t * zb.unsqueeze(1)
    return decode(vae, z.flatten(0, 1)).view(len(a), steps, -1)


@torch.no_grad()
def prior_quantiles(vae, quantiles: torch.Tensor) -> torch.Tensor:
    """z of each quantile in each dimension, (len(quantiles), latent_dim): the prior's own
    inverse CDF where it factorizes and has one (Kingma & Welling 2014, Fig. 4), else the
    empirical quantiles of 20,000 of its draws (seeded)."""
    p = vae.prior()
    if factorizes(p):
        try:
            return p.base_dist.icdf(quantiles.unsqueeze(-1).to(p.base_dist.mean))
        except NotImplementedError:
            pass
    with seeded(EVAL_SEED):
        draws = p.sample((20_000,))
    return torch.quantile(draws, quantiles.to(draws), dim=0)


@torch.no_grad()
def manifold(vae, size: int = 20) -> torch.Tensor:
    """For a 2-D latent space: the decoder's means on a size x size grid of the prior's
    quantiles 0.05..0.95, (size * size, D), row r = the r-th quantile of z_2 from the top,
    column c = the c-th of z_1."""
    if vae.latent_dim != 2:
        raise PyroVAEError(f"the manifold is drawn for a 2-D latent space, not {vae.latent_dim}")
    z = prior_quantiles(vae, torch.linspace(0.05, 0.95, size))
    z1 = z[:, 0].expand(size, size)  # along each row
    z2 = z[:, 1].flip(0).unsqueeze(1).expand(size, size)  # down the rows, growing upwards
    return decode(vae, torch.stack([z1, z2], -1).reshape(-1, 2))


def project(means: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, list]:
    """2-D coordinates of each mean and the axes' names: the means themselves in 2-D (a 1-D
    z against the image's index), else PCA, or t-SNE (``method="tsne"``), by scikit-learn."""
    if means.shape[1] == 1:
        return np.stack([means[:, 0], np.arange(len(means))], 1), ["z_1", "test image"]
    if means.shape[1] == 2:
        return means, ["z_1", "z_2"]
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, (len(means) - 1) / 3)  # below the number of points, as it must
        tsne = TSNE(2, perplexity=perplexity, random_state=seed, init="pca")
        return tsne.fit_transform(means), ["t-SNE 1", "t-SNE 2"]
    from sklearn.decomposition import PCA

    pca = PCA(2, random_state=seed).fit(means)
    shares = pca.explained_variance_ratio_
    names = [f"PC {i + 1} ({100 * s:.0f} % of the variance)" for i, s in enumerate(shares)]
    return pca.transform(means), names


def latent_map(points: np.ndarray, labels, axes: list, title: str, path: str | Path) -> None:
    """The test set's points, coloured by label with a legend."""
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.6)
    else:
        for c in np.unique(labels):
            ax.scatter(*points[labels == c].T, s=3, alpha=0.6, label=str(c))
        ax.legend(title="label", markerscale=4, fontsize=8, loc="best")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.set_layout_engine("tight")
    save_figure(fig, path)


def units_chart(act: np.ndarray, kl: np.ndarray | None, title: str, path: str | Path) -> None:
    """Bars of each dimension's activity (log scale, the 0.01 threshold drawn) and KL."""
    fig = Figure(figsize=(max(6.0, 0.16 * len(act) + 2), 5.5 if kl is not None else 3.2))
    axes = fig.subplots(2 if kl is not None else 1, 1, sharex=True, squeeze=False)[:, 0]
    dims = np.arange(1, len(act) + 1)
    axes[0].bar(dims, np.maximum(act, 1e-12), color=np.where(act > ACTIVE, "C0", "C7"))
    axes[0].set_yscale("log")
    axes[0].axhline(ACTIVE, color="C3", ls="--", lw=1, label=f"active: > {ACTIVE}")
    axes[0].set_ylabel("Cov_x(E_q[z_j])")
    axes[0].legend(fontsize=8)
    axes[0].set_title(title)
    if kl is not None:
        axes[1].bar(dims, kl, color="C1")
        axes[1].set_ylabel("KL(q(z_j|x) || p(z_j)) (nats)")
    axes[-1].set_xlabel("latent dimension j")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    fig.set_layout_engine("tight")
    save_figure(fig, path)


def report(
    vae,
    data,
    out: str | Path,
    *,
    labels: torch.Tensor | None = None,
    tsne: bool = False,
    name: str = "",
    pairs: int = 8,
) -> dict[str, Any]:
    """Write latents.npz, latent_map.png, interpolations.png, active_units.png (and
    manifold.png for a 2-D z) to the folder ``out`` for the test images of ``data`` (an
    ``ImageBatches``); return the numbers: active units, each dimension's activity and KL."""
    _check(vae)
    out = Path(out)
    if not out.is_dir():
        raise PyroVAEError(f"folder {out} does not exist")
    x = data.test_images
    if len(x) < 2:
        raise PyroVAEError("the latent tools need at least 2 test images")
    vae.eval()
    means, scales = posterior_moments(vae, x)
    act = activity(means)
    kl = kl_per_dimension(vae, x)
    label_array = None if labels is None else labels.cpu().numpy()
    arrays = {"means": means.double().cpu().numpy(), "scales": scales.double().cpu().numpy()}
    if label_array is not None:
        arrays["labels"] = label_array
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(out / "latents.npz", buffer.getvalue())

    title = f"{name}: " if name else ""
    points, axes = project(arrays["means"], "tsne" if tsne else "pca")
    map_title = f"{title}posterior means of the test set"
    latent_map(points, label_array, axes, map_title, out / "latent_map.png")

    n = min(pairs, len(x) // 2)
    lines = interpolations(vae, x[0 : 2 * n : 2], x[1 : 2 * n : 2])
    grid = torch.cat([x[0 : 2 * n : 2, None], lines, x[1 : 2 * n : 2, None]], 1)
    pair_labels = None
    if label_array is not None:
        starts, ends = label_array[0 : 2 * n : 2], label_array[1 : 2 * n : 2]
        pair_labels = [f"{a} -> {b}" for a, b in zip(starts, ends, strict=True)]
    image_grid(
        grid.flatten(0, 1),
        vae.image_shape,
        out / "interpolations.png",
        ncols=grid.shape[1],
        title=f"{title}decoded straight lines between two test images' posterior means",
        col_labels=["x_a", *(f"{t:.2g}" for t in np.linspace(0, 1, lines.shape[1])), "x_b"],
        row_labels=pair_labels,
        xlabel="t: z = (1 - t) E_q[z|x_a] + t E_q[z|x_b]",
    )
    if vae.latent_dim == 2:
        size = 20
        ticks = [f"{q:.2f}" for q in np.linspace(0.05, 0.95, size)]
        image_grid(
            manifold(vae, size),
            vae.image_shape,
            out / "manifold.png",
            ncols=size,
            title=f"{title}the mean of p(x|z) on the prior's quantiles",
            col_labels=[t if i % 3 == 0 else "" for i, t in enumerate(ticks)],
            row_labels=[t if i % 3 == 0 else "" for i, t in enumerate(reversed(ticks))],
            xlabel="quantile of z_1",
            ylabel="quantile of z_2",
        )
    kl_values = None if kl is None else kl.cpu().numpy()
    count = active_units(means)
    units_chart(
        act.cpu().numpy(),
        kl_values,
        f"{title}{count} of {vae.latent_dim} latent dimensions active",
        out / "active_units.png",
    )
    return {
        "active_units": count,
        "latent_dim": vae.latent_dim,
        "activity": act.tolist(),
        "kl_per_dimension": None if kl_values is None else kl_values.tolist(),
        "test_images": len(x),
    }


def report_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    tsne: bool = False,
    data_dir: str | None = None,
    device: str = "cpu",
    plugins: list[str] | None = None,
) -> dict[str, Any]:
    """:func:`report` for a trained run (``pyro-vae latent``), into ``out`` (default: the run
    folder); the numbers also go into the run's ``summary.json`` under ``latent``."""
    from ..data import ImageBatches, load_dataset
    from ..training.devices import resolve_device
    from ..training.runs import load_run

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir
    if not out.is_dir():
        raise PyroVAEError(f"folder {out} does not exist")
    device = resolve_device(device)
    vae = load_run(run_dir, device, plugins=plugins)
    _check(vae)
    config = vae.config
    dataset = load_dataset(config.data.dataset, data_dir or config.data.data_dir)
    data = ImageBatches(dataset, config.data.binarize, device)
    labels = dataset.test_labels
    numbers = report(vae, data, out, labels=labels, tsne=tsne, name=config.data.dataset)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    write_json(summary_path, {**summary, "latent": numbers})
    return numbers
