"""Semi-supervised training of M2 and M1+M2: a few labels, many unlabelled images.

The training images are split once: a validation set held out of both, a
class-balanced labelled subset drawn with the seed, and the unlabelled rest.
Each step is one SVI step of ``semi_model`` under Pyro's ``TraceEnum_ELBO``: an
unlabelled batch (y summed out by enumeration) together with a labelled batch
and its auxiliary term, so an epoch passes over every unlabelled image once and
cycles through the labelled ones as often as it takes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer import SVI, JitTraceEnum_ELBO, TraceEnum_ELBO
from tqdm.auto import tqdm

from . import plots
from .config import Config
from .data import Dataset, ImageBatches, batch_size_used
from .divergence import Guard
from .errors import PyroVAEError
from .evaluate import EVAL_SEED, seeded
from .models import SSVAE
from .optim import Adam
from .runs import (
    SUMMARY_FILE,
    append_metrics,
    checkpoint_payload,
    save_checkpoint,
    set_rng_state,
    write_json,
)

log = logging.getLogger(__name__)

VALIDATION_SIZE = 10_000
"""Training images held out for validation (Kingma et al. keep MNIST's last 10,000)."""

EVAL_BATCH = 1000


@dataclass
class Split:
    """Indices into the training images: labelled, unlabelled and validation, disjoint."""

    labelled: torch.Tensor
    unlabelled: torch.Tensor
    validation: torch.Tensor


def validation_size(requested: int | None, num_train: int) -> int:
    """``requested``, or 10,000 (a fifth of the training images when that is fewer)."""
    return min(VALIDATION_SIZE, num_train // 5) if requested is None else requested


def split(
    labels: torch.Tensor, num_classes: int, labeled: int, validation: int, seed: int
) -> Split:
    """Hold out the last ``validation`` images; draw ``labeled`` of the rest, class-balanced.

    The labelled subset is a function of the seed: ``labeled / num_classes`` images
    of each class, drawn uniformly among the non-validation images of that class.
    """
    kept = len(labels) - validation
    if kept <= labeled:
        raise PyroVAEError(
            f"--labeled {labeled} leaves no unlabelled images: {len(labels)} training images, "
            f"{validation} of them held out for validation"
        )
    if labeled % num_classes:
        raise PyroVAEError(
            f"--labeled {labeled} cannot be split evenly over {num_classes} classes; "
            f"use a multiple of {num_classes}"
        )
    generator = torch.Generator().manual_seed(seed)
    per_class = labeled // num_classes
    chosen = []
    for c in range(num_classes):
        of_class = torch.nonzero(labels[:kept] == c).flatten()
        if len(of_class) < per_class:
            raise PyroVAEError(
                f"--labeled {labeled} needs {per_class} images of class {c}, "
                f"but only {len(of_class)} are outside the validation split"
            )
        chosen.append(of_class[torch.randperm(len(of_class), generator=generator)[:per_class]])
    labelled = torch.cat(chosen).sort().values
    is_unlabelled = torch.ones(kept, dtype=torch.bool)
    is_unlabelled[labelled] = False
    return Split(labelled, torch.nonzero(is_unlabelled).flatten(), torch.arange(kept, len(labels)))


def split_for(config: Config, dataset: Dataset) -> Split:
    """The split a config asks for on ``dataset``."""
    s = config.semi
    validation = validation_size(s.validation, len(dataset.train_labels))
    return split(
        dataset.train_labels, dataset.num_classes, s.labeled, validation, config.train.seed
    )


def estimator(name: str, num_particles: int):
    """Pyro's enumerating ELBO for ``--elbo trace`` (or its jitted form for ``jit-trace``)."""
    options = {"max_plate_nesting": 1, "num_particles": num_particles, "vectorize_particles": True}
    if name == "jit-trace":
        # As the VAE's JIT estimators: shape tests inside densities hold for any batch size.
        return JitTraceEnum_ELBO(**options, ignore_jit_warnings=True)
    return TraceEnum_ELBO(**options)


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 4 + stream)


def labelled_batches(
    num_labelled: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Positions into the labelled set, ``batch_size`` at a time, reshuffled at each pass.

    Every step takes one: with few labels the classifier q(y|x) sees them all
    often, which on MNIST gave higher accuracy early on than sampling labelled
    images in proportion to their count (see docs/RESULTS.md).
    """
    size = min(batch_size, num_labelled)
    while True:
        order = torch.randperm(num_labelled, generator=generator)
        for start in range(0, num_labelled - size + 1, size):
            yield order[start : start + size]


@torch.no_grad()
def accuracy(model: SSVAE, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` whose most probable class under q(y|x) is the label."""
    correct = sum(
        (model.predict(xb) == yb).sum().item()
        for xb, yb in zip(images.split(EVAL_BATCH), labels.split(EVAL_BATCH), strict=True)
    )
    return correct / len(images)


@torch.no_grad()
def elbo(model: SSVAE, images: torch.Tensor) -> float:
    """The unlabelled ELBO of M2's data, y summed out, in nats per image."""
    loss = TraceEnum_ELBO(max_plate_nesting=1)
    total = sum(
        loss.loss(model.model, model.guide, model.features(xb)) for xb in images.split(EVAL_BATCH)
    )
    return -total / len(images)


def fit(
    config: Config,
    run_dir: Path,
    data: ImageBatches,
    model: SSVAE,
    *,
    checkpoint: dict | None,
    metrics: list[dict[str, Any]],
    progress: bool,
) -> dict[str, Any]:
    """The semi-supervised loop: SVI steps by epoch, accuracy and a checkpoint per epoch."""
    t, dataset = config.train, data.dataset
    parts = split_for(config, dataset)
    device = data.train_images.device
    y_labelled = torch.nn.functional.one_hot(
        dataset.train_labels[parts.labelled], dataset.num_classes
    ).to(device, torch.float)
    labelled_index = parts.labelled.to(device)
    validation = (data.fixed(parts.validation), dataset.train_labels[parts.validation].to(device))
    test = (data.test_images, dataset.test_labels.to(device))
    log.info(
        "training %s on %s: %d labelled, %d unlabelled, %d validation images -> %s",
        config.model.kind,
        config.data.dataset,
        len(parts.labelled),
        len(parts.unlabelled),
        len(parts.validation),
        run_dir,
    )
    batch_size = batch_size_used(t.batch_size, len(parts.unlabelled))

    pyro.clear_param_store()
    optimizer = Adam(t.lr, max_grad_norm=t.clip_grad or None)
    svi = SVI(
        model.semi_model,
        model.semi_guide,
        optimizer,
        estimator(config.inference.elbo, config.inference.num_particles),
    )
    if checkpoint:
        optimizer.set_state(checkpoint["optimizer"])
        set_rng_state(checkpoint["rng"], data)
    guard = Guard(
        [p for p in model.parameters() if p.requires_grad],
        run_dir,
        checkpoint["epoch"] if checkpoint else 0,
    )
    steps_per_epoch = math.ceil(len(parts.unlabelled) / t.batch_size)
    started = time.perf_counter()
    with pyro.validation_enabled(t.validate):
        for epoch in range(guard.last_saved + 1, t.epochs + 1):
            model.train()
            epoch_start = time.perf_counter()
            total_loss, images = 0.0, 0
            unlabelled = parts.unlabelled[
                torch.randperm(len(parts.unlabelled), generator=_generator(t.seed, epoch, 1))
            ].to(device)
            labelled = labelled_batches(
                len(labelled_index), t.batch_size, _generator(t.seed, epoch, 2)
            )
            batches = tqdm(
                data.train_batches(t.batch_size, unlabelled),
                total=steps_per_epoch,
                desc=f"epoch {epoch}/{t.epochs}",
                leave=False,
                disable=None if progress else True,
            )
            for step, x in enumerate(batches, 1):
                at = next(labelled)
                x_labelled = model.features(data.batch(labelled_index[at]))
                x_unlabelled = model.features(x)
                loss = guard.step(
                    svi.step, x_unlabelled, x_labelled, y_labelled[at], epoch=epoch, step=step
                )
                total_loss += loss
                images += len(x)
            seconds = time.perf_counter() - epoch_start
            guard.end_of_epoch(epoch)

            model.eval()
            record = {
                "epoch": epoch,
                "train_loss": total_loss / images,
                "test_elbo": test_elbo(model, test[0]),
                "validation_accuracy": accuracy(model, *validation)
                if len(parts.validation)
                else None,
                "test_accuracy": accuracy(model, *test),
                "seconds": seconds,
                "images_per_second": images / seconds,
            }
            metrics.append(record)
            append_metrics(run_dir, record)
            val = record["validation_accuracy"]
            log.info(
                "epoch %3d  test ELBO %9.2f  accuracy: validation %s  test %.4f  %6.1fs",
                epoch,
                record["test_elbo"],
                "n/a" if val is None else f"{val:.4f}",
                record["test_accuracy"],
                seconds,
            )
            if epoch % t.checkpoint_every == 0 or epoch == t.epochs:
                payload = checkpoint_payload(config, model, epoch, optimizer, data=data)
                save_checkpoint(run_dir, payload)
                guard.last_saved = epoch

    summary = summarize(config, metrics, parts)
    summary["batch_size"] = batch_size
    summary["wall_seconds"] = time.perf_counter() - started
    write_json(run_dir / SUMMARY_FILE, summary)
    save_pictures(model, test[0], run_dir, metrics)
    return summary


def summarize(config: Config, metrics: list[dict[str, Any]], parts: Split) -> dict[str, Any]:
    """The last epoch's numbers, and the test accuracy at the best validation epoch."""
    last = metrics[-1]
    summary = {
        "dataset": config.data.dataset,
        "model": config.model.kind,
        "labeled": len(parts.labelled),
        "unlabelled": len(parts.unlabelled),
        "validation": len(parts.validation),
        "epochs": len(metrics),
        "test_elbo": last["test_elbo"],
        "test_accuracy": last["test_accuracy"],
        "validation_accuracy": last["validation_accuracy"],
        "train_images_per_second": sum(m["images_per_second"] for m in metrics) / len(metrics),
    }
    if last["validation_accuracy"] is not None:
        best = max(metrics, key=lambda m: m["validation_accuracy"])
        summary["best_validation_epoch"] = best["epoch"]
        summary["test_accuracy_at_best_validation"] = best["test_accuracy"]
    return summary


def save_pictures(model: SSVAE, test_images: torch.Tensor, run_dir: Path, metrics: list) -> None:
    """conditional_samples.png, analogies.png and accuracy.png."""
    n = model.num_classes
    rows = model.generate(n * n)  # a row per class, one style z per column
    plots.image_grid(rows, model.image_shape, run_dir / "conditional_samples.png", ncols=n)

    classes = torch.arange(n, device=test_images.device)
    shown = test_images[:n]
    styles = model.style(shown)  # each test image's z, decoded with every class
    decoded = model.image(model.decode(styles.repeat_interleave(n, 0), classes.repeat(n)))
    grid = torch.cat([shown.unsqueeze(1), decoded.reshape(n, n, -1)], 1).reshape(n * (n + 1), -1)
    plots.image_grid(grid, model.image_shape, run_dir / "analogies.png", ncols=n + 1)
    plots.accuracy_curve(metrics, run_dir / "accuracy.png")


def test_elbo(model: SSVAE, images: torch.Tensor, seed: int = EVAL_SEED) -> float:
    """:func:`elbo` with its draws seeded: the same model gives the same number."""
    with seeded(seed, images.device):
        return elbo(model, images)


def evaluate(model: SSVAE, data: ImageBatches, seed: int = EVAL_SEED) -> dict[str, float]:
    """Test accuracy and test ELBO of a trained semi-supervised model."""
    labels = data.dataset.test_labels.to(data.test_images.device)
    return {
        "test_accuracy": accuracy(model, data.test_images, labels),
        "test_elbo": test_elbo(model, data.test_images, seed),
    }
