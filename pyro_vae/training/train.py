"""The SVI training loop: data in memory, one ``svi.step`` per batch, a checkpoint per epoch.

Everything that can be wrong with a config or the data is found before the run
folder is created; after that each epoch appends one metrics line and replaces
the checkpoint atomically, and the end of the run writes the summary and the
pictures.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, SVI

from .. import models
from ..config import Config, validate
from ..config import load as load_config
from ..data import ImageBatches, load_dataset
from ..errors import PyroVAEError
from ..inference.elbos import estimators
from ..inference.kl import KLTerm
from ..inference.optim import Adam
from ..models import VAE
from . import distributed, loop
from .devices import resolve_device
from .memory import check_model_fits, limited_to_free_memory, too_large
from .runs import (
    CONFIG_FILE,
)

log = logging.getLogger(__name__)


def default_run_dir(config: Config) -> Path:
    return Path("runs") / f"{config.data.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


@dataclass
class _Setup:
    """Everything a run needs before its first step: device, processes, data and the model."""

    device: torch.device
    world: distributed.World
    data: ImageBatches
    vae: Any  # the model config.model.kind builds: a VAE, M2, M1+M2


def _setup(config: Config) -> _Setup:
    d, t = config.data, config.train
    device = distributed.local_device(resolve_device(t.device))
    world = distributed.init(device)
    if world.distributed:
        distributed.check_supported(config.inference.elbo)
        if t.seconds:
            raise PyroVAEError("--seconds is not supported under torchrun (ranks must agree)")
        if not models.model_kinds[config.model.kind].distributed:
            raise PyroVAEError(f"--model {config.model.kind} runs in one process, not torchrun")
    dataset = load_dataset(d.dataset, d.data_dir)
    data = ImageBatches(
        dataset, d.binarize, device, seed=(t.seed + world.rank) % 2**32, holdout=d.holdout
    )
    pyro.set_rng_seed(t.seed)

    prepared = models.prepare(config, dataset.image_shape)  # M1+M2's M1, say

    def build():
        return models.build(config, dataset.image_shape, dataset.num_classes, prepared=prepared)

    what = f"the model (--latent-dim {config.model.latent_dim}, --hidden {config.model.hidden})"
    check_model_fits(build, device, what)
    with too_large(what):
        with limited_to_free_memory():
            model = build()
        model = model.to(device)
    if world.distributed:  # the same initial model everywhere, different noise per rank
        pyro.set_rng_seed((t.seed + world.rank) % 2**32)
    return _Setup(device, world, data, model)


def train(
    config: Config,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the model that ``config`` describes on its dataset, writing a run folder to
    ``out``: the CLI's ``pyro-vae train``, built on :func:`pyro_vae.fit`.

    Returns the summary (also written to ``summary.json``). A run that fails before its
    first checkpoint (a loss that is NaN at the first steps, Ctrl-C, memory) leaves no
    run folder behind. Progress is logged to the ``pyro_vae`` logger.
    """
    validate(config)
    setup = _setup(config)
    try:
        return loop.fit(
            setup.vae,
            setup.data,
            config=config,
            run_dir=out or default_run_dir(config),
            overwrite=overwrite,
            progress=progress,
            world=setup.world,
        ).summary
    finally:
        distributed.finish(setup.world)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Continue a run of ``train`` from its last checkpoint (from the start if it has none).

    Model, optimizer, estimator and RNG states come back as they were, so on CPU
    the run ends with the same parameters as one never interrupted. ``epochs``
    extends the run.
    """
    run_dir = Path(run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PyroVAEError("--resume under torchrun is not supported yet; resume in one process")
    if not (run_dir / CONFIG_FILE).is_file():
        raise PyroVAEError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    config = load_config(run_dir / CONFIG_FILE, saved_run=True)
    if epochs is not None:
        config.train.epochs = epochs
    validate(config)
    setup = _setup(config)
    return loop.fit(
        setup.vae, setup.data, config=config, run_dir=run_dir, resume=True, progress=progress
    ).summary


def make_svi(vae: VAE, config: Config) -> tuple[SVI, Adam, ELBO]:
    """The SVI object training uses, with its optimizer and estimator; a fresh param store.

    ``svi.step(x)`` is one training step; benchmarks time exactly this. The KL weight and
    free bits apply; a warm-up, which the loop advances step by step, is refused.
    """
    i = config.inference
    if i.kl_warmup:
        raise PyroVAEError("make_svi has no loop to advance --kl-warmup; use fit")
    pyro.clear_param_store()
    optimizer = loop.make_optimizer(config)
    elbo = estimators.build(i.elbo, num_particles=i.num_particles, data_dim=vae.data_dim)
    program = KLTerm(i.kl_weight, free_bits=i.free_bits).wrap(vae.model, vae.guide)
    return SVI(*program, optimizer, loss=elbo), optimizer, elbo


def summary_line(summary: dict[str, Any]) -> str:
    """The one line a finished run (or an evaluation) is reported by."""
    if "test_accuracy" in summary:
        line = f"test accuracy {summary['test_accuracy']:.4f}  test ELBO {summary['test_elbo']:.2f}"
        if summary.get("style_nats") is not None:
            line += f"  style in z {summary['style_nats']:.2f} nats"
        if summary.get("class_from_y") is not None:
            line += f"  class from y {summary['class_from_y']:.3f}"
        if "labeled" in summary:
            line += f" ({summary['labeled']} labels)"
    else:
        terms = ""
        if summary.get("test_kl") is not None:
            terms = f" (recon {summary['test_recon']:.2f}, KL {summary['test_kl']:.2f})"
        se = f" ± {summary['log_px_se']:.2f}" if summary.get("log_px_se") is not None else ""
        of = summary.get("log_px_of", "x")
        line = (
            f"test ELBO {summary['test_elbo']:.2f}{terms}  log p({of}) {summary['log_px']:.2f}"
            f"{se} (K={summary['iw_samples']}) nats/image"
        )
    if summary.get("continuous") or summary["test_elbo"] > 0:
        line += " (densities of continuous pixel values: above 0 is possible)"
    return line
