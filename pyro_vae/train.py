"""The SVI training loop: data in memory, one ``svi.step`` per batch, a checkpoint per epoch.

Everything that can be wrong with a config or the data is found before the run
folder is created; after that each epoch appends one metrics line and replaces
the checkpoint atomically, and the end of the run writes the summary and the
pictures.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, SVI
from tqdm.auto import tqdm

from . import distributed, evaluate, plots
from .config import Config, dumps, to_dict, validate
from .config import load as load_config
from .data import ImageBatches, batch_size_used, load_dataset
from .devices import resolve_device
from .divergence import Guard
from .elbos import estimators, has_bound
from .errors import PyroVAEError
from .memory import check_model_fits, limited_to_free_memory, too_large
from .models import VAE
from .optim import Adam
from .runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    SUMMARY_FILE,
    append_metrics,
    atomic_write,
    build_model,
    check_run_dir,
    checkpoint_payload,
    discard_run_dir,
    load_checkpoint,
    prepare_run_dir,
    read_metrics,
    save_checkpoint,
    set_rng_state,
    write_json,
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
    vae: VAE  # or, for --model m2 / m1m2, the semi-supervised model


def _setup(config: Config) -> _Setup:
    d, t = config.data, config.train
    device = distributed.local_device(resolve_device(t.device))
    world = distributed.init(device)
    if world.distributed:
        distributed.check_supported(config.inference.elbo)
        if t.seconds:
            raise PyroVAEError("--seconds is not supported under torchrun (ranks must agree)")
        if config.model.kind != "vae":
            raise PyroVAEError(f"--model {config.model.kind} runs in one process, not torchrun")
    dataset = load_dataset(d.dataset, d.data_dir)
    if config.model.kind != "vae":
        from . import semi

        semi.split_for(config, dataset)  # refuse an impossible split before the run folder
    data = ImageBatches(dataset, d.binarize, device, seed=t.seed + world.rank)
    pyro.set_rng_seed(t.seed)
    m1 = _load_m1(config, dataset.image_shape) if config.model.kind == "m1m2" else None

    def build():
        return build_model(config, dataset.image_shape, dataset.num_classes, m1)

    what = f"the model (--latent-dim {config.model.latent_dim}, --hidden {config.model.hidden})"
    check_model_fits(build, device, what)
    with too_large(what):
        with limited_to_free_memory():
            model = build()
        model = model.to(device)
    for images in data.all_images():
        try:
            model.likelihood.check_support(model.features(images) if m1 else images)
        except PyroVAEError as e:
            if not m1:
                raise
            raise PyroVAEError(
                f"M1+M2 models the M1 run's latent means, which are real numbers: {e}; "
                f"use --likelihood gaussian"
            ) from None
    if config.model.kind == "vae":
        evaluate.check_log_likelihood_time(model, data.test_images, config.inference.iw_samples)
    if world.distributed:  # the same initial model everywhere, different noise per rank
        pyro.set_rng_seed(t.seed + world.rank)
    return _Setup(device, world, data, model)


def _load_m1(config: Config, image_shape: tuple[int, ...]) -> VAE:
    """The trained VAE an M1+M2 run stacks M2 on, checked against the run's data."""
    from .runs import load_run

    m1 = load_run(config.semi.m1_run)
    if m1.config.model.kind != "vae":
        raise PyroVAEError(f"--m1-run {config.semi.m1_run} is not a VAE run")
    if m1.config.data.dataset != config.data.dataset or m1.image_shape != image_shape:
        raise PyroVAEError(
            f"--m1-run {config.semi.m1_run} was trained on {m1.config.data.dataset}, "
            f"not on {config.data.dataset}"
        )
    return m1


def train(
    config: Config,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the model that ``config`` describes, writing a run directory to ``out``.

    Returns the summary (also written to ``summary.json``). A run that fails before its
    first checkpoint (a loss that is NaN at the first steps, Ctrl-C, memory) leaves no
    run folder behind. Progress is logged to the ``pyro_vae`` logger.
    """
    validate(config)
    setup = _setup(config)
    world = setup.world
    run_dir = Path(out or default_run_dir(config))
    check_run_dir(run_dir, overwrite)  # every rank, so that a refusal stops them all
    distributed.barrier(world)
    created = not run_dir.exists()
    if world.is_main:
        prepare_run_dir(run_dir, overwrite)
        atomic_write(run_dir / CONFIG_FILE, dumps(config).encode())
    distributed.barrier(world)
    try:
        return _fit(config, run_dir, setup, progress=progress)
    except BaseException:
        if world.is_main and not (run_dir / CHECKPOINT_FILE).exists():
            discard_run_dir(run_dir, remove_folder=created)
        raise
    finally:
        distributed.finish(world)


def resume(
    run_dir: str | Path,
    *,
    epochs: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Continue a run from its last checkpoint (from the start if it has none yet).

    Model, optimizer, estimator and RNG states come back as they were, so on CPU
    the run ends with the same parameters as one never interrupted. ``epochs``
    extends the run.
    """
    run_dir = Path(run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PyroVAEError("--resume under torchrun is not supported yet; resume in one process")
    if not (run_dir / CONFIG_FILE).is_file():
        raise PyroVAEError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    config = load_config(run_dir / CONFIG_FILE)
    checkpoint = None
    if (run_dir / CHECKPOINT_FILE).exists():
        checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
        if _without_epochs(checkpoint["config"]) != _without_epochs(to_dict(config)):
            raise PyroVAEError(
                f"the checkpoint in {run_dir} is from another config than its {CONFIG_FILE}"
            )
    if epochs is not None:
        done = checkpoint["epoch"] if checkpoint else 0
        if epochs < done:
            raise PyroVAEError(f"--epochs {epochs} is fewer than the {done} already trained")
        config.train.epochs = epochs
    validate(config)
    setup = _setup(config)
    for torn in run_dir.glob(".*.tmp"):  # an atomic write a crash interrupted
        torn.unlink()
    atomic_write(run_dir / CONFIG_FILE, dumps(config).encode())
    done = checkpoint["epoch"] if checkpoint else 0
    metrics = [m for m in read_metrics(run_dir) if m["epoch"] <= done]
    atomic_write(run_dir / METRICS_FILE, "".join(json.dumps(m) + "\n" for m in metrics).encode())
    if checkpoint:
        setup.vae.load_state_dict(checkpoint["model"])
        log.info("resuming %s after epoch %d", run_dir, done)
    return _fit(config, run_dir, setup, checkpoint=checkpoint, metrics=metrics, progress=progress)


def _without_epochs(tree: dict) -> dict:
    return {**tree, "train": {k: v for k, v in tree["train"].items() if k != "epochs"}}


def make_svi(vae: VAE, config: Config) -> tuple[SVI, Adam, ELBO]:
    """The SVI object training uses, with its optimizer and estimator; a fresh param store.

    ``svi.step(x)`` is one training step; benchmarks time exactly this.
    """
    pyro.clear_param_store()
    t = config.train
    optimizer = Adam(t.lr, max_grad_norm=t.clip_grad or None)
    elbo = estimators.build(
        config.inference.elbo, num_particles=config.inference.num_particles, data_dim=vae.data_dim
    )
    return SVI(vae.model, vae.guide, optimizer, loss=elbo), optimizer, elbo


def _fit(
    config: Config,
    run_dir: Path,
    setup: _Setup,
    *,
    checkpoint: dict | None = None,
    metrics: list[dict[str, Any]] | None = None,
    progress: bool,
) -> dict[str, Any]:
    """The loop: SVI steps by epoch, a metrics line and a checkpoint per epoch, then the summary."""
    if config.model.kind != "vae":
        from . import semi

        return semi.fit(
            config,
            run_dir,
            setup.data,
            setup.vae,
            checkpoint=checkpoint,
            metrics=list(metrics or []),
            progress=progress,
        )
    t, data, vae, world = config.train, setup.data, setup.vae, setup.world
    info = log.info if world.is_main else _silent
    where = f"{setup.device}, {world.size} processes" if world.distributed else f"{setup.device}"
    info(
        "training on %s (%d images, %s) -> %s", config.data.dataset, data.num_train, where, run_dir
    )
    batch_size = batch_size_used(t.batch_size, data.num_train)
    svi, optimizer, elbo = make_svi(vae, config)
    step_fn = _ddp_step(vae, optimizer, elbo, data.num_train) if world.distributed else svi.step
    if checkpoint:
        optimizer.set_state(checkpoint["optimizer"])
        if hasattr(elbo, "load_state_dict"):
            elbo.load_state_dict(checkpoint["estimator"])
        set_rng_state(checkpoint["rng"], data)
    reports_bound = has_bound(config.inference.elbo)
    metrics = list(metrics or [])
    last_saved = checkpoint["epoch"] if checkpoint else 0
    guard = Guard(vae.parameters(), run_dir, last_saved, check_loss=reports_bound)
    steps_per_epoch = math.ceil(data.num_train / t.batch_size)
    started = time.perf_counter()
    training_seconds = 0.0  # excludes evaluation, for --seconds budgets
    out_of_time = False
    with pyro.validation_enabled(t.validate):
        for epoch in range(last_saved + 1, t.epochs + 1):
            vae.train()
            epoch_start = time.perf_counter()
            total_loss, images = 0.0, 0
            order = data.epoch_order(t.seed, epoch)
            batches = tqdm(
                data.train_batches(t.batch_size, order, world.rank, world.size),
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{t.epochs}",
                leave=False,
                disable=None if progress and world.is_main else True,
            )
            for step, x in enumerate(batches, 1):
                loss = guard.step(step_fn, x, epoch=epoch, step=step)
                total_loss += loss
                images += len(x)
                if t.seconds and training_seconds + time.perf_counter() - epoch_start >= t.seconds:
                    out_of_time = True
                    break
            seconds = time.perf_counter() - epoch_start
            training_seconds += seconds
            guard.end_of_epoch(epoch)

            vae.eval()
            total_loss, images = distributed.all_sum(world, total_loss, images, device=setup.device)
            record = {
                "epoch": epoch,
                "train_elbo": -total_loss / images if reports_bound else None,
                "test_elbo": _sharded(world, evaluate.test_elbo, vae, data.test_images),
                "seconds": seconds,
                "images_per_second": images / seconds,
            }
            metrics.append(record)
            if world.is_main:
                append_metrics(run_dir, record)
            train_elbo = "n/a" if record["train_elbo"] is None else f"{record['train_elbo']:9.2f}"
            info(
                "epoch %3d  train ELBO %9s  test ELBO %9.2f  %6.1fs",
                epoch,
                train_elbo,
                record["test_elbo"],
                seconds,
            )
            saving = epoch % t.checkpoint_every == 0 or epoch == t.epochs or out_of_time
            if saving and world.is_main:
                payload = checkpoint_payload(config, vae, epoch, optimizer, elbo, data)
                save_checkpoint(run_dir, payload)
                guard.last_saved = epoch
            if out_of_time:
                info("stopping: the %g s training budget is spent", t.seconds)
                break

    k = config.inference.iw_samples
    eval_start = time.perf_counter()
    log_px = _sharded(world, evaluate.test_log_likelihood, vae, data.test_images, k)
    summary = {
        "dataset": config.data.dataset,
        "likelihood": config.model.likelihood,
        "continuous": getattr(vae.likelihood, "continuous", False),
        "batch_size": batch_size,
        "epochs": len(metrics),
        "test_elbo": metrics[-1]["test_elbo"],
        "log_px": log_px,
        "iw_samples": k,
        "eval_seconds": time.perf_counter() - eval_start,
        "train_images_per_second": sum(m["images_per_second"] for m in metrics) / len(metrics),
        "wall_seconds": time.perf_counter() - started,
    }
    if world.distributed:
        summary["processes"] = world.size
        summary["parameters_identical_across_processes"] = distributed.parameters_agree(world, vae)
    if world.is_main:
        write_json(run_dir / SUMMARY_FILE, summary)
        save_pictures(vae, data.test_images, run_dir, metrics)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """The one line a finished run (or an evaluation) is reported by."""
    if "test_accuracy" in summary:
        line = f"test accuracy {summary['test_accuracy']:.4f}  test ELBO {summary['test_elbo']:.2f}"
        if "labeled" in summary:
            line += f" ({summary['labeled']} labels)"
        return line
    line = (
        f"test ELBO {summary['test_elbo']:.2f}  log p(x) {summary['log_px']:.2f} "
        f"(K={summary['iw_samples']}) nats/image"
    )
    if summary.get("continuous") or summary["test_elbo"] > 0:
        line += " (densities of continuous pixel values: above 0 is possible)"
    return line


def _silent(*_: Any) -> None:
    pass


def _sharded(world, measure, vae, images, *args) -> float:
    """A per-image average over ``images``, each process measuring its share."""
    mine = images[world.rank :: world.size]
    total, count = distributed.all_sum(
        world, measure(vae, mine, *args) * len(mine), len(mine), device=images.device
    )
    return total / count


def _ddp_step(vae: VAE, optimizer: Adam, elbo: ELBO, size: int) -> Callable[[torch.Tensor], float]:
    """One step under torchrun: Pyro's ELBO as a module, gradients averaged by DDP.

    The plate's size is the training set's, so each rank's loss estimates the
    ELBO of the whole dataset and DDP's average of the ranks' gradients is its
    gradient. The step returns the loss of this rank's batch alone, for the metrics.
    """
    from torch.nn.parallel import DistributedDataParallel

    loss_module = elbo(distributed.Program(vae, "model"), distributed.Program(vae, "guide"))
    ddp = DistributedDataParallel(loss_module)
    params = [p for p in vae.parameters() if p.requires_grad]

    def step(x: torch.Tensor) -> float:
        loss = ddp(x, size=size)
        loss.backward()
        optimizer(params)
        return loss.item() * len(x) / size

    return step


def save_pictures(vae, test_images: torch.Tensor, run_dir: Path, metrics: list[dict]) -> None:
    """reconstructions.png (originals above reconstructions), samples.png, elbo.png."""
    shown = test_images[:50]
    pairs = torch.stack([shown.reshape(5, 10, -1), vae.reconstruct(shown).reshape(5, 10, -1)], 1)
    plots.image_grid(pairs.reshape(100, -1), vae.image_shape, run_dir / "reconstructions.png")
    plots.image_grid(vae.generate(100), vae.image_shape, run_dir / "samples.png")
    plots.elbo_curve(metrics, run_dir / "elbo.png")
