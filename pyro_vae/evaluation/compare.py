"""Estimators side by side: the same model, data, seed and budget, one run per estimator.

For each estimator ``compare`` trains a run, then measures on the test set the
ELBO, the importance-sampled log p(x) (the same K for all) and the estimator's
own bound, and on a fixed training batch the gradient signal-to-noise ratio of
the encoder's and the decoder's parameters (Rainforth et al. 2018).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any

import pyro
import torch
from matplotlib.figure import Figure

from ..config import SNR_REPEATS, Config, validate
from ..data import ImageBatches, load_dataset
from ..errors import PyroVAEError
from ..inference.elbos import bound_estimator, estimators
from ..models import VAE
from ..training.runs import atomic_write, load_run, prepare_run_dir, read_metrics
from ..training.train import train
from .plots import save_figure

log = logging.getLogger(__name__)

SNR_SEED = 12345
"""Seed of the fixed batch and the repeated gradient draws, the same for every estimator."""

COLUMNS = [
    "estimator",
    "epochs",
    "train_seconds",
    "images_per_second",
    "test_elbo",
    "test_elbo_se",
    "log_px",
    "log_px_se",
    "iw_samples",
    "own_bound",
    "snr_encoder",
    "snr_decoder",
]


def parameter_groups(vae: VAE) -> dict[str, list[torch.nn.Parameter]]:
    """Inference-network (encoder + guide family) and generative (decoder + likelihood) params."""
    return {
        "encoder": [*vae.encoder.parameters(), *vae.posterior.parameters()],
        "decoder": [*vae.decoder.parameters(), *vae.likelihood.parameters()],
    }


def gradient_snr(vae: VAE, elbo, x: torch.Tensor, repeats: int = 100) -> dict[str, float]:
    """Mean over parameters of |E[g]| / std[g] across ``repeats`` gradient estimates on ``x``.

    Rainforth et al. 2018 ("Tighter variational bounds are not necessarily better")
    use this per-parameter SNR; parameters whose gradient is exactly constant
    (std 0) are left out of the mean.
    """
    groups = parameter_groups(vae)
    draws: dict[str, list[torch.Tensor]] = {name: [] for name in groups}
    for _ in range(repeats):
        for params in groups.values():
            for p in params:
                p.grad = None
        elbo.loss_and_grads(vae.model, vae.guide, x)
        for name, params in groups.items():
            draws[name].append(
                torch.cat(
                    [
                        (p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                        for p in params
                    ]
                )
            )
    for params in groups.values():
        for p in params:
            p.grad = None
    snr = {}
    for name, values in draws.items():
        g = torch.stack(values)
        mean, std = g.mean(0), g.std(0)
        varying = std > 0
        snr[name] = (
            (mean[varying].abs() / std[varying]).mean().item() if varying.any() else math.nan
        )
    return snr


@torch.no_grad()
def own_bound(spec: str, vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> float | None:
    """The bound that estimator ``spec`` optimizes, on images ``x`` (nats/image); None if none."""
    bound = bound_estimator(spec, vae.data_dim)
    if bound is None:
        return None
    total = sum(bound.loss(vae.model, vae.guide, xb) for xb in x.split(batch_size))
    return -total / len(x)


def run_name(spec: str) -> str:
    return spec.replace(":", "_")


def compare(
    config: Config,
    specs: list[str],
    out: str | Path,
    *,
    snr_repeats: int = SNR_REPEATS,
    overwrite: bool = False,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Train one run per estimator in ``specs`` under ``out`` and write compare.csv/.md/.png."""
    from ..models import model_kinds

    if model_kinds.parse(config.model.kind)[0].needs_enumeration:
        raise PyroVAEError(
            f"compare trains VAEs; --model {config.model.kind} trains with TraceEnum_ELBO alone"
        )
    if not specs:
        raise PyroVAEError("compare needs at least one --elbo")
    if len(set(specs)) != len(specs):
        raise PyroVAEError(f"each estimator once, please: got {', '.join(specs)}")
    if snr_repeats < 2:
        raise PyroVAEError(f"--snr-repeats must be >= 2, got {snr_repeats}")
    configs = []
    for spec in specs:
        c = copy.deepcopy(config)
        c.inference.elbo = spec
        configs.append(validate(c))
    dataset = load_dataset(config.data.dataset, config.data.data_dir)
    data = ImageBatches(dataset, config.data.binarize)
    out = prepare_run_dir(out, overwrite)

    generator = torch.Generator().manual_seed(SNR_SEED)
    fixed = data.train_images[torch.randperm(data.num_train, generator=generator)]
    fixed = fixed[: config.train.batch_size].float() * data.scale
    if config.data.binarize == "dynamic":
        fixed = torch.bernoulli(fixed, generator=generator)

    rows = []
    for spec, c in zip(specs, configs, strict=True):
        log.info("== %s", spec)
        run_dir = out / run_name(spec)
        if c.train.tensorboard:  # one folder per estimator, or their scalars would mix
            c.train.tensorboard = str(Path(config.train.tensorboard) / run_name(spec))
        summary = train(c, run_dir, overwrite=overwrite, progress=progress)
        vae = load_run(run_dir)
        pyro.set_rng_seed(SNR_SEED)
        start = time.perf_counter()
        elbo = estimators.build(
            spec, num_particles=c.inference.num_particles, data_dim=vae.data_dim
        )
        vae.train()
        snr = gradient_snr(vae, elbo, fixed.to(next(vae.parameters()).device), snr_repeats)
        vae.eval()
        pyro.set_rng_seed(SNR_SEED)
        bound = own_bound(spec, vae, data.test_images)
        metrics = read_metrics(run_dir)
        rows.append(
            {
                "estimator": spec,
                "epochs": summary["epochs"],
                "train_seconds": sum(m["seconds"] for m in metrics),
                "images_per_second": summary["train_images_per_second"],
                "test_elbo": summary["test_elbo"],
                "test_elbo_se": summary.get("test_elbo_se"),
                "log_px": summary["log_px"],
                "log_px_se": summary.get("log_px_se"),
                "iw_samples": summary["iw_samples"],
                "own_bound": bound,
                "snr_encoder": snr["encoder"],
                "snr_decoder": snr["decoder"],
            }
        )
        log.info(
            "   SNR encoder %.3f decoder %.3f (%.1fs)",
            snr["encoder"],
            snr["decoder"],
            time.perf_counter() - start,
        )
    write_tables(rows, out)
    plot_curves(specs, out, _budget(config))
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 10 else f"{value:.3f}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """compare.csv (every column, full precision) and compare.md (a readable table)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "compare.csv", buffer.getvalue().encode())

    k = rows[0]["iw_samples"]
    header = [
        "estimator", "epochs", "train s", "images/s", "test ELBO ± s.e.",
        f"log p(x), K={k}, ± s.e.", "own bound", "SNR encoder", "SNR decoder",
    ]  # fmt: skip
    shown = [c for c in COLUMNS[1:] if c not in ("iw_samples", "test_elbo_se", "log_px_se")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [f"`{r['estimator']}`"]
        for c in shown:
            se = r.get(f"{c}_se")
            cells.append(_cell(r[c]) + (f" ± {se:.2f}" if se is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write(out / "compare.md", ("\n".join(lines) + "\n").encode())


def _budget(config: Config) -> str:
    """What each run of the comparison had: the dataset and the epochs or seconds."""
    t = config.train
    budget = f"{t.seconds:g} s of training" if t.seconds else f"{t.epochs} epochs"
    return f"{config.data.dataset}, {budget} each, batch {t.batch_size}, seed {t.seed}"


def plot_curves(specs: list[str], out: Path, budget: str = "") -> None:
    """compare.png: test ELBO against cumulative training time, one line per estimator,
    titled with the dataset and the budget (``budget``)."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for spec in specs:
        metrics = read_metrics(out / run_name(spec))
        seconds = [sum(m["seconds"] for m in metrics[: i + 1]) for i in range(len(metrics))]
        ax.plot(seconds, [m["test_elbo"] for m in metrics], "o-", ms=3, label=spec)
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test ELBO (nats / image)")
    ax.set_title(f"Estimators compared: {budget}" if budget else "Estimators compared")
    ax.grid(alpha=0.3)
    ax.legend(title="--elbo")
    fig.set_layout_engine("tight")
    save_figure(fig, out / "compare.png")
