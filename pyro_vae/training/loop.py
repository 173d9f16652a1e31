"""One training loop for every model: SVI steps by epoch, held-out numbers, checkpoints.

The loop knows nothing of VAEs or labels. A model object tells it what it needs
through a small protocol (:class:`Trainable`); ``VAE``, ``SSVAE`` (M2) and
``M1M2`` are three implementations, and a user's own ``PyroProgram`` subclass is
a fourth. What lives here once: the optimizer and estimator set up (and restored
from a checkpoint), the epoch loop with its progress bar, the divergence guard
and ``--seconds`` budget, one metrics line and a checkpoint per epoch, the
summary, the pictures, and DDP under torchrun.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pyro
import torch
from pyro.infer import ELBO, SVI
from tqdm.auto import tqdm

from ..config import Config
from ..data import ImageBatches
from ..inference.divergence import Guard
from ..inference.elbos import has_bound
from ..inference.kl import KLTerm
from ..inference.optim import Adam
from ..inference.schedules import Schedule, schedules
from ..models.base import PyroProgram
from . import distributed, tensorboard
from .runs import (
    SUMMARY_FILE,
    append_metrics,
    checkpoint_payload,
    save_checkpoint,
    set_rng_state,
    write_json,
)

log = logging.getLogger(__name__)

DEFAULT_LR = PyroProgram.default_lr
"""Adam's learning rate for a model without a ``default_lr`` of its own (a user's
``Trainable``), where the config leaves ``train.lr`` unset."""


@runtime_checkable
class Trainable(Protocol):
    """What the loop asks of a model. ``PyroProgram`` has every method, for a model
    whose ``model(x)`` and ``guide(x)`` score a batch of images as the VAE's do.

    - ``svi_program()``: the Pyro model and guide one SVI step runs.
    - ``build_estimator(spec, num_particles)``: the ``pyro.infer`` ELBO for an
      estimator spec (M2 sums over y by enumeration, so builds ``TraceEnum_ELBO``).
    - ``train_batches(data, batch_size, epoch, seed, rank, world_size)``: one epoch
      of step arguments, as tuples (the VAE: ``(x,)``; M2: an unlabelled batch, a
      labelled one and its labels). Its ``len`` is the number of steps.
    - ``train_record(mean_loss)``: the training loss as it goes into the metrics.
    - ``held_out(data, config, world)``: the numbers recorded after each epoch.
    - ``summary(data, metrics, config, world)``: what the run adds to the summary.
    - ``save_pictures(data, run_dir, metrics)``: the run's pictures.

    Four more are optional: ``watched(data)``, the record's key of the held-out number
    that ``--lr-schedule plateau`` watches (None: none), ``epoch_pictures(data)``,
    image grids for ``--tensorboard``, and ``index_batches`` with ``step_args(data,
    index)``: ``train_batches`` as the indices of each batch's images, and the step's
    arguments made from them, so that a captured step makes its batch in its CUDA graph.
    """

    def svi_program(self) -> tuple[Callable, Callable]: ...

    def build_estimator(self, spec: str, num_particles: int) -> ELBO: ...

    def train_batches(
        self, data: ImageBatches, batch_size: int, epoch: int, seed: int, rank: int, world: int
    ) -> Batches: ...

    def train_record(self, mean_loss: float | None) -> dict[str, float | None]: ...

    def held_out(
        self, data: ImageBatches, config: Config, world: distributed.World
    ) -> dict[str, Any]: ...

    def summary(
        self, data: ImageBatches, metrics: list[dict], config: Config, world: distributed.World
    ) -> dict[str, Any]: ...

    def save_pictures(self, data: ImageBatches, run_dir: Path, metrics: list[dict]) -> None: ...


class Batches:
    """An epoch's step arguments, with the number of steps (for the progress bar) and the
    images per step (``batch_size``, or fewer when the data has fewer)."""

    def __init__(self, steps: Iterator[tuple], count: int, batch_size: int):
        self.steps, self.count, self.batch_size = steps, count, batch_size

    def __iter__(self) -> Iterator[tuple]:
        return self.steps

    def __len__(self) -> int:
        return self.count


LABELS = {
    "train_elbo": ("train ELBO", "9.2f"),
    "train_objective": ("train objective", "9.2f"),
    "train_loss": ("train loss", "9.2f"),
    "train_recon": ("train recon", "9.2f"),
    "train_kl": ("train KL", "7.2f"),
    "test_elbo": ("test ELBO", "9.2f"),
    "test_recon": ("test recon", "9.2f"),
    "test_kl": ("test KL", "7.2f"),
    "validation_elbo": ("validation ELBO", "9.2f"),
    "validation_accuracy": ("validation accuracy", ".4f"),
    "test_accuracy": ("test accuracy", ".4f"),
    "style_nats": ("style in z", ".2f"),
    "class_from_y": ("class from y", ".3f"),
    "kl_weight": ("KL weight", ".3g"),
    "lr": ("lr", ".3g"),
}


def epoch_line(record: dict[str, Any]) -> str:
    """``epoch  3  train ELBO  -120.93  test ELBO  -115.93    3.1s``: what each epoch logs."""
    parts = [f"epoch {record['epoch']:3d}"]
    for key, value in record.items():
        if key in LABELS:
            label, spec = LABELS[key]
            parts.append(f"{label} {'n/a' if value is None else format(value, spec):>9}")
    parts.append(f"{record['seconds']:6.1f}s")
    return "  ".join(parts)


def run(
    model: Trainable,
    data: ImageBatches,
    config: Config,
    run_dir: Path | None,
    *,
    checkpoint: dict | None = None,
    metrics: list[dict[str, Any]] | None = None,
    world: distributed.World | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train ``model`` on ``data`` as ``config`` says; returns (summary, metrics).

    With a ``run_dir``, each epoch appends its metrics line and (every
    ``checkpoint_every`` epochs) replaces the checkpoint, and the end writes the
    summary and the pictures; without one, nothing is written. ``checkpoint``
    continues a run: model weights are the caller's to load, the optimizer,
    estimator and random states are restored here.
    """
    t = config.train
    world = world or distributed.World()
    writes = run_dir is not None and world.is_main
    info = log.info if world.is_main else _silent
    pyro.clear_param_store()
    optimizer = make_optimizer(config)
    elbo = model.build_estimator(config.inference.elbo, config.inference.num_particles)
    i = config.inference
    kl = KLTerm(i.kl_weight, i.kl_warmup, i.free_bits)
    program = kl.wrap(*model.svi_program())
    if world.distributed:
        step_fn = distributed.step(model, program, optimizer, elbo, data.num_train)
    else:
        step_fn = SVI(*program, optimizer, loss=elbo).step
    in_graph = _batches_in_graph(model, data, config, world)
    if t.compile != "none":
        step_fn = _compiled(
            step_fn, model, program, kl, elbo, optimizer, config, world, data, in_graph
        )
    if checkpoint:
        optimizer.set_state(checkpoint["optimizer"])
        if hasattr(elbo, "load_state_dict"):
            elbo.load_state_dict(checkpoint["estimator"])
        set_rng_state(checkpoint["rng"], data)
    schedule = Schedule(config, model.watched(data) if hasattr(model, "watched") else None)
    schedule.restore(optimizer, checkpoint)
    board = tensorboard.Logger(t.tensorboard) if t.tensorboard and world.is_main else None
    reports_bound = has_bound(config.inference.elbo)
    metrics = list(metrics or [])
    last_saved = checkpoint["epoch"] if checkpoint else 0
    params = [p for p in model.parameters() if p.requires_grad]
    guard = Guard(params, run_dir, last_saved, check_loss=reports_bound)
    started = time.perf_counter()
    batch_size = t.batch_size
    training_seconds = 0.0  # excludes evaluation, for --seconds budgets
    out_of_time = False
    with pyro.validation_enabled(t.validate):
        for epoch in range(last_saved + 1, t.epochs + 1):
            model.train()
            epoch_start = time.perf_counter()
            images = 0
            make = model.index_batches if in_graph else model.train_batches
            batches = make(data, t.batch_size, epoch, t.seed, world.rank, world.size)
            batch_size = batches.batch_size
            if batch_size < t.batch_size and epoch == last_saved + 1 and world.is_main:
                log.warning(
                    "--batch-size %d is more than the %d training images: each step takes all %d",
                    t.batch_size,
                    batch_size,
                    batch_size,
                )
            bar = tqdm(
                batches,
                total=len(batches),
                desc=f"epoch {epoch}/{t.epochs}",
                leave=False,
                disable=None if progress and world.is_main else True,
            )
            schedule.start(len(batches))
            for step, args in enumerate(bar, 1):
                kl.weight = kl.at(epoch - 1 + step / len(batches))
                guard.step(step_fn, *args, epoch=epoch, step=step)
                schedule.after_step()
                images += len(args[0])
                if t.seconds and training_seconds + time.perf_counter() - epoch_start >= t.seconds:
                    out_of_time = True
                    break
            guard.end_of_epoch(epoch)  # reads the last losses: the device's work is done
            seconds = time.perf_counter() - epoch_start
            training_seconds += seconds
            total_loss = guard.epoch_loss()

            model.eval()
            total_loss, images = distributed.all_sum(world, total_loss, images, device=data.device)
            record = {
                "epoch": epoch,
                **_train_record(model, kl, epoch, total_loss / images if reports_bound else None),
                **model.held_out(data, config, world),
                **schedule.record(),
                "seconds": seconds,
                "images_per_second": images / seconds,
            }
            schedule.after_epoch(record)
            if board is not None:
                board.epoch(record, getattr(model, "epoch_pictures", lambda _: {})(data))
            metrics.append(record)
            if writes:
                append_metrics(run_dir, record)
            info("%s", epoch_line(record))
            saving = epoch % t.checkpoint_every == 0 or epoch == t.epochs or out_of_time
            if saving and writes:
                payload = checkpoint_payload(config, model, epoch, optimizer, elbo, data)
                save_checkpoint(run_dir, {**payload, "schedule": schedule.state()})
                guard.last_saved = epoch
            if out_of_time:
                info("stopping: the %g s training budget is spent", t.seconds)
                break

    summary = {
        "dataset": config.data.dataset,
        "model": config.model.kind,
        "batch_size": batch_size,
        "epochs": len(metrics),
        **{k: v for k, v in metrics[-1].items() if k not in ("epoch", "seconds")},
        **model.summary(data, metrics, config, world),
        "train_images_per_second": sum(m["images_per_second"] for m in metrics) / len(metrics),
    }
    summary.pop("images_per_second", None)
    summary["wall_seconds"] = time.perf_counter() - started
    if world.distributed:
        summary["processes"] = world.size
        summary["parameters_identical_across_processes"] = distributed.parameters_agree(
            world, model
        )
    if board is not None:
        board.final(summary, metrics[-1]["epoch"])
    if writes:
        write_json(run_dir / SUMMARY_FILE, summary)
        model.save_pictures(data, run_dir, metrics)
    return summary, metrics


def _silent(*_: Any) -> None:
    pass


def make_optimizer(config: Config) -> Adam:
    """The Adam that SVI steps with, as the config's ``train`` section sets it."""
    t = config.train
    return Adam(
        DEFAULT_LR if t.lr is None else t.lr,
        max_grad_norm=t.clip_grad or None,
        betas=(t.beta1, t.beta2),
        weight_decay=t.weight_decay,
        max_grad_norm_per_param=t.clip_grad_per_param or None,
    )


def _train_record(model: Trainable, kl: KLTerm, epoch: int, mean_loss: float | None) -> dict:
    """The model's training numbers; when the KL term is reweighted, the bound trained is
    no ELBO (``train_objective``) and the weight at the epoch's end is recorded."""
    record = model.train_record(mean_loss)
    if not kl.modified:
        return record
    renamed = {("train_objective" if k == "train_elbo" else k): v for k, v in record.items()}
    return {**renamed, "kl_weight": kl.at(epoch)}


def _compiled(
    eager: Callable,
    model,
    program,
    kl: KLTerm,
    elbo,
    optimizer,
    config: Config,
    world: distributed.World,
    data: ImageBatches,
    in_graph: bool = False,
) -> Callable:
    """The traced step (``--compile``), made at the first batch; the eager one where the
    step cannot be traced (said once). Under torchrun each rank traces its own step,
    with the data plate at the training set's size, and the ranks' gradients are averaged
    outside the graph before Adam, as DDP averages them. ``in_graph``: the steps take
    their images' indices, and a captured step makes its batch in its graph."""
    from .compiled import InGraphBatches, traced_step

    batches = None
    if in_graph:
        batches = InGraphBatches(functools.partial(model.step_args, data), data.generator_kept)
        eager = _with_batches(eager, batches)

    chosen: list[Callable] = []
    if world.distributed:
        program = distributed.sized(program, data.num_train)
        optimizer = distributed.GradientMean(optimizer, world)

    def step(*args):
        if not chosen:
            mode, spec = config.train.compile, config.inference.elbo
            per_step = schedules.parse(config.train.lr_schedule)[0].per_step
            traced = traced_step(
                model,
                elbo,
                optimizer,
                mode,
                args,
                spec,
                program,
                kl,
                adam_inside=not per_step,
                batches=batches,
            )
            if world.distributed:  # every rank takes the same step, or their collectives differ
                (ok,) = distributed.all_sum(world, float(traced is not None), device=data.device)
                if traced is not None and ok < world.size:
                    log.warning("--compile: another process could not trace its step; "
                                "training eagerly")  # fmt: skip
                    traced = None
                if traced is not None:
                    traced = distributed.rank_share(traced, data.num_train)
            chosen.append(traced or eager)
        return chosen[0](*args)

    return step


def _with_batches(step: Callable, batches) -> Callable:
    """``step`` taking its images' indices: it makes its batch first."""

    def on_indices(index: torch.Tensor):
        return step(*batches(index))

    return on_indices


def _batches_in_graph(model, data: ImageBatches, config: Config, world) -> bool:
    """Whether the steps take their images' indices so that a captured step makes its
    batch in its graph: ``--compile cudagraph`` (or ``inductor-cudagraph``), one process,
    data whose batches are drawn on the device (``CapturedStep.batches_capturable``), and
    a model whose ``index_batches`` and ``step_args`` belong with its ``train_batches``
    (defined by the class that defines it, or below): M2's batches do not, and are made
    before each step as in eager training. (``train_batches`` of the base class is built
    from the other two, so checking ``index_batches`` checks the pair.)"""
    from .compiled import CAPTURED, CapturedStep

    if config.train.compile not in CAPTURED or world.distributed:
        return False
    if not hasattr(model, "index_batches") or not CapturedStep.batches_capturable(data):
        return False

    def defined_by(name: str) -> type:
        return next(k for k in type(model).__mro__ if name in vars(k))

    return issubclass(defined_by("index_batches"), defined_by("train_batches"))


def sharded(world: distributed.World, measure: Callable, images: torch.Tensor, *args) -> Any:
    """A per-image average over ``images``, each process measuring its share: a number, or
    a dict of numbers when ``measure`` returns one."""
    mine = images[world.rank :: world.size]
    measured = measure(mine, *args)
    values = measured if isinstance(measured, dict) else {"": measured}
    *totals, count = distributed.all_sum(
        world,
        *(math.nan if v is None else v * len(mine) for v in values.values()),
        len(mine),
        device=images.device,
    )
    averages = {  # None (unknown) stays None
        k: None if math.isnan(total) else total / count
        for k, total in zip(values, totals, strict=True)
    }
    return averages if isinstance(measured, dict) else averages[""]


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (in eval mode), one record per epoch, and
    the summary (also in ``run_dir/summary.json`` when there is a run folder)."""

    model: Any
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


def fit(
    model: Trainable,
    data: Any,
    *,
    test: Any = None,
    config: Config | None = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    world: distributed.World | None = None,
    **settings: Any,
) -> FitResult:
    """Train ``model`` on ``data`` with SVI: the loop every model and the CLI run.

    Args:
        model: a :class:`Trainable`: a ``VAE``, an ``SSVAE``, a user's subclass or own
            ``PyroProgram``.
        data: the training images: a tensor (N, *image_shape) or (N, D), of uint8
            levels 0..255 or of floats; an (images, labels) pair; a ``torch`` Dataset
            of images or (image, label) items; a registered dataset's name
            (``"digits"``, ``"mnist"``); or an ``ImageBatches``.
        test: held-out images, in any of the forms of ``data`` but a name (a named
            dataset has its own test set); without any, no held-out numbers.
        config: the settings (default: ``Config()``); ``settings`` override its
            ``train``, ``inference`` and ``data`` fields by name, e.g. ``epochs=5``,
            ``elbo="iwae:5"``, ``lr=3e-4``, ``binarize="none"``.
        run_dir: a run folder to write (config, metrics, checkpoints, summary,
            pictures), as ``pyro-vae train`` does; None trains in memory.
        resume: continue the run in ``run_dir`` from its checkpoint, with the same
            model and data as before (``epochs`` may grow).

    A run that fails before its first checkpoint leaves no run folder.
    """
    from ..config import Config as ConfigClass
    from ..config import dumps, validate_training
    from ..data import ImageBatches as Batches_
    from ..data import as_dataset, load_dataset
    from ..errors import PyroVAEError
    from .devices import denormals, resolve_device
    from .runs import (
        CHECKPOINT_FILE,
        CONFIG_FILE,
        atomic_write,
        check_run_dir,
        discard_run_dir,
        prepare_run_dir,
        read_metrics,
    )

    config = copy.deepcopy(config) if config is not None else ConfigClass()
    _apply_settings(config, settings)
    validate_training(config)
    if config.train.lr is None:  # the model's own, written into the run's config
        config.train.lr = getattr(model, "default_lr", DEFAULT_LR)
    if config.train.tensorboard:
        tensorboard.check_available()
    world = world or distributed.World()
    device = _device_of(model) if "device" not in settings else resolve_device(config.train.device)
    if isinstance(data, str):
        if test is not None:
            raise PyroVAEError(f"dataset {data!r} has its own test set; drop test=")
        config.data.dataset = data
        data = load_dataset(data, config.data.data_dir)
    if not isinstance(data, Batches_):
        if not hasattr(data, "train_images"):
            data = as_dataset(data, test, getattr(model, "image_shape", None))
            config.data.dataset = data.name
        seed = (config.train.seed + world.rank) % 2**32
        data = Batches_(data, config.data.binarize, device, seed=seed, holdout=config.data.holdout)
    elif len(data.validation_images) != config.data.holdout:
        raise PyroVAEError(
            f"the ImageBatches given holds out {len(data.validation_images)} training images, "
            f"and the settings say holdout={config.data.holdout}: make them agree (or pass "
            f"the dataset, and holdout=)"
        )
    model = model.to(data.device)
    model.check_data(data, config)

    checkpoint, metrics = None, []
    if run_dir is not None:
        run_dir = Path(run_dir)
        if resume:
            checkpoint = _resumed(run_dir, config, data.device)
            if checkpoint:
                model.load_state_dict(checkpoint["model"])
                metrics = [m for m in read_metrics(run_dir) if m["epoch"] <= checkpoint["epoch"]]
                info = log.info if world.is_main else _silent
                info("resuming %s after epoch %d", run_dir, checkpoint["epoch"])
        else:
            check_run_dir(run_dir, overwrite)
    elif resume:
        raise PyroVAEError("resume=True continues a run folder: give its run_dir")
    distributed.barrier(world)  # every rank has checked before the folder is made
    created = run_dir is not None and not run_dir.exists()
    if run_dir is not None and world.is_main:
        if resume:
            for torn in run_dir.glob(".*.tmp"):  # an atomic write a crash interrupted
                torn.unlink()
            atomic_write(run_dir / "metrics.jsonl", "".join(_lines(metrics)).encode())
        else:
            prepare_run_dir(run_dir, overwrite)
        atomic_write(run_dir / CONFIG_FILE, dumps(config).encode())
    distributed.barrier(world)
    if world.is_main:
        where = f"{data.device}, {world.size} processes" if world.distributed else data.device
        log.info(
            "training %s on %s (%d images, %s) -> %s",
            config.model.kind,
            config.data.dataset,
            data.num_train,
            where,
            run_dir or "memory",
        )
    try:
        with denormals(config.train.denormals, data.device):
            summary, metrics = run(
                model,
                data,
                config,
                run_dir,
                checkpoint=checkpoint,
                metrics=metrics,
                world=world,
                progress=progress,
            )
    except BaseException:
        if run_dir is not None and not resume and world.is_main:
            if not (run_dir / CHECKPOINT_FILE).exists():
                discard_run_dir(run_dir, remove_folder=created)
        raise
    return FitResult(model.eval(), metrics, summary)


def _resumed(run_dir: Path, config: Config, device: torch.device) -> dict | None:
    """The checkpoint a resumed run continues from (None: it had none yet), checked to be
    of the same settings, but for ``epochs``."""
    from ..config import saved_run_config, to_dict
    from ..errors import PyroVAEError
    from .runs import CHECKPOINT_FILE, CONFIG_FILE, load_checkpoint

    if not (run_dir / CONFIG_FILE).is_file():
        raise PyroVAEError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    if not (run_dir / CHECKPOINT_FILE).exists():
        return None
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE, map_location=device)
    # fields added since the checkpoint was written come with their defaults (or the
    # behaviour the run had, where the default changed: saved_run_config)
    saved = to_dict(saved_run_config(checkpoint["config"]))
    if _without_epochs(saved) != _without_epochs(to_dict(config)):
        raise PyroVAEError(
            f"the checkpoint in {run_dir} is from another config than its {CONFIG_FILE}"
        )
    from ..inference.schedules import schedules

    if config.train.epochs != saved["train"]["epochs"]:
        entry = schedules.parse(config.train.lr_schedule)[0]
        if entry.spans_run:
            raise PyroVAEError(
                f"--lr-schedule {config.train.lr_schedule} spans the run's "
                f"{saved['train']['epochs']} epochs; a resumed run cannot change them"
            )
    if config.train.epochs < checkpoint["epoch"]:
        raise PyroVAEError(
            f"--epochs {config.train.epochs} is fewer than the {checkpoint['epoch']} "
            f"already trained"
        )
    return checkpoint


def _without_epochs(tree: dict) -> dict:
    return {**tree, "train": {k: v for k, v in tree["train"].items() if k != "epochs"}}


def _apply_settings(config: Config, settings: dict[str, Any]) -> None:
    """``epochs=5`` and friends onto the config's ``train``, ``inference`` and ``data``."""
    from ..config import from_dict
    from ..errors import PyroVAEError

    sections = {"train": config.train, "inference": config.inference, "data": config.data}
    tree: dict[str, dict[str, Any]] = {}
    for key, value in settings.items():
        owners = [name for name, section in sections.items() if hasattr(section, key)]
        if not owners:
            valid = sorted(f.name for s in sections.values() for f in dataclasses.fields(s))
            raise PyroVAEError(f"fit() has no setting {key!r}; valid: {', '.join(valid)}")
        tree.setdefault(owners[0], {})[key] = value
    updated = from_dict(tree, config)
    config.train, config.inference, config.data = updated.train, updated.inference, updated.data


def _device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def _lines(metrics: list[dict[str, Any]]) -> Iterator[str]:
    return (json.dumps(m) + "\n" for m in metrics)
