"""The SVI training loop: data in memory, one ``svi.step`` per batch, a checkpoint per epoch.

Everything that can be wrong with a config or the data is found before the run
folder is created; after that each epoch appends one metrics line and replaces
the checkpoint atomically, and the end of the run writes the summary and the
pictures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyro
import pyro.optim
import torch
from pyro.infer import SVI
from tqdm.auto import tqdm

from . import evaluate, plots
from .config import Config, dumps, to_dict, validate
from .data import ImageBatches, load_dataset
from .elbos import estimators, has_bound
from .errors import PyroVAEError
from .runs import (
    CONFIG_FILE,
    SUMMARY_FILE,
    append_metrics,
    atomic_write,
    build_vae,
    prepare_run_dir,
    rng_state,
    save_checkpoint,
    write_json,
)


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda[:N]``, or ``auto`` (a GPU when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PyroVAEError(f"--device {name} asked for, but no CUDA GPU is available; use cpu")
    return torch.device(name)


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(
    config: Config,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the VAE that ``config`` describes, writing a run directory to ``out``.

    Returns the summary (also written to ``summary.json``).
    """
    validate(config)
    d, t = config.data, config.train
    device = resolve_device(t.device)
    dataset = load_dataset(d.dataset, d.data_dir)
    data = ImageBatches(dataset, d.binarize, device)
    pyro.set_rng_seed(t.seed)
    vae = build_vae(config, dataset.image_shape).to(device)
    for images in data.all_images():
        vae.likelihood.check_support(images)

    run_dir = prepare_run_dir(out or default_run_dir(config), overwrite)
    atomic_write(run_dir / CONFIG_FILE, dumps(config).encode())
    log(f"training on {dataset.name} ({data.num_train} images, {device}) -> {run_dir}")

    pyro.clear_param_store()
    optimizer = pyro.optim.Adam({"lr": t.lr})
    elbo = estimators.build(
        config.inference.elbo,
        num_particles=config.inference.num_particles,
        data_dim=vae.data_dim,
    )
    svi = SVI(vae.model, vae.guide, optimizer, loss=elbo)
    reports_bound = has_bound(config.inference.elbo)

    metrics: list[dict[str, Any]] = []
    steps_per_epoch = math.ceil(data.num_train / t.batch_size)
    started = time.perf_counter()
    training_seconds = 0.0  # excludes evaluation, for --seconds budgets
    out_of_time = False
    for epoch in range(1, t.epochs + 1):
        vae.train()
        epoch_start = time.perf_counter()
        total_loss, images = 0.0, 0
        batches = tqdm(
            data.train_batches(t.batch_size),
            total=steps_per_epoch,
            desc=f"epoch {epoch}/{t.epochs}",
            leave=False,
            disable=None if progress else True,
        )
        for step, x in enumerate(batches, 1):
            loss = svi.step(x)
            if reports_bound and not math.isfinite(loss):
                raise PyroVAEError(
                    f"loss became {loss} at epoch {epoch} step {step}; the checkpoint of "
                    f"epoch {epoch - 1} in {run_dir} is kept"
                )
            total_loss += loss
            images += len(x)
            if t.seconds and training_seconds + time.perf_counter() - epoch_start >= t.seconds:
                out_of_time = True
                break
        seconds = time.perf_counter() - epoch_start
        training_seconds += seconds

        vae.eval()
        record = {
            "epoch": epoch,
            "train_elbo": -total_loss / images if reports_bound else None,
            "test_elbo": evaluate.elbo(vae, data.test_images),
            "seconds": seconds,
            "images_per_second": images / seconds,
        }
        metrics.append(record)
        append_metrics(run_dir, record)
        train_elbo = "n/a" if record["train_elbo"] is None else f"{record['train_elbo']:9.2f}"
        log(
            f"epoch {epoch:3d}  train ELBO {train_elbo:>9}  "
            f"test ELBO {record['test_elbo']:9.2f}  {seconds:6.1f}s"
        )
        save_checkpoint(
            run_dir,
            {
                "config": to_dict(config),
                "image_shape": list(dataset.image_shape),
                "epoch": epoch,
                "model": vae.state_dict(),
                "optimizer": optimizer.get_state(),
                "rng": rng_state(),
            },
        )
        if out_of_time:
            log(f"stopping: the {t.seconds:g} s training budget is spent")
            break

    k = config.inference.iw_samples
    eval_start = time.perf_counter()
    summary = {
        "dataset": dataset.name,
        "epochs": len(metrics),
        "test_elbo": metrics[-1]["test_elbo"],
        "log_px": evaluate.log_likelihood(vae, data.test_images, k),
        "iw_samples": k,
        "eval_seconds": time.perf_counter() - eval_start,
        "train_images_per_second": sum(m["images_per_second"] for m in metrics) / len(metrics),
        "wall_seconds": time.perf_counter() - started,
    }
    write_json(run_dir / SUMMARY_FILE, summary)
    log(
        f"test ELBO {summary['test_elbo']:.2f}  log p(x) {summary['log_px']:.2f} (K={k}) nats/image"
    )
    save_pictures(vae, data.test_images, run_dir, metrics)
    return summary


def save_pictures(vae, test_images: torch.Tensor, run_dir: Path, metrics: list[dict]) -> None:
    """reconstructions.png (originals above reconstructions), samples.png, elbo.png."""
    shown = test_images[:50]
    pairs = torch.stack([shown.reshape(5, 10, -1), vae.reconstruct(shown).reshape(5, 10, -1)], 1)
    plots.image_grid(pairs.reshape(100, -1), vae.image_shape, run_dir / "reconstructions.png")
    plots.image_grid(vae.generate(100), vae.image_shape, run_dir / "samples.png")
    plots.elbo_curve(metrics, run_dir / "elbo.png")
