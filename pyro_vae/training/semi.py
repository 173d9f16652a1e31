"""Semi-supervised training of M2, M1+M2 and the ADGM: a few labels, many unlabelled images.

The training images are split once: a validation set held out of both, a
class-balanced labelled subset drawn with the seed, and the unlabelled rest.
Each step is one SVI step of ``semi_model`` under Pyro's ``TraceEnum_ELBO``: an
unlabelled batch (y summed out by enumeration), a labelled batch with its
auxiliary term, or both, as the model's labelled schedule says
(:func:`train_batches`); an epoch passes over every unlabelled image once.
``SSVAE`` hands these to the one training loop (``pyro_vae.fit``) through its
``fit.Trainable`` methods.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pyro.infer import TraceEnum_ELBO

from ..components.nets import mlp
from ..config import Config
from ..data import Dataset, ImageBatches
from ..errors import PyroVAEError
from ..evaluation import plots
from ..evaluation.evaluate import EVAL_SEED, seeded
from ..models import SSVAE

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
    """The split a config asks for on ``dataset`` (to refuse an impossible one early)."""
    s = config.semi
    validation = validation_size(s.validation, len(dataset.train_labels))
    return split(
        dataset.train_labels, dataset.num_classes, s.labeled, validation, config.train.seed
    )


NOTHING_TO_ENUMERATE = "TraceEnum_ELBO found no sample sites configured for enumeration"


def estimator(spec: str, num_particles: int, schedule: str = "every-step"):
    """The enumerating form of estimator ``spec`` (``trace``: TraceEnum_ELBO, ``jit-trace``:
    its jitted twin), which sums y out for unlabelled images.

    Under the ``interleave`` schedule a labelled step has no y to sum out, which Pyro
    warns of at every such step; that warning is silenced there, and only there.
    """
    from ..inference.elbos import estimators

    elbo = estimators.parse(spec)[0].enumerated(num_particles)
    if schedule == "interleave":
        for name in ("loss", "loss_and_grads", "differentiable_loss", "traceable_loss"):
            if hasattr(elbo, name):
                setattr(elbo, name, _quiet(getattr(elbo, name)))
    return elbo


def _quiet(method):
    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=NOTHING_TO_ENUMERATE)
            return method(*args, **kwargs)

    return quiet


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 4 + stream)


def labelled_batches(
    num_labelled: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Positions into the labelled set, ``batch_size`` at a time, reshuffled at each pass.

    The ``every-step`` and ``proportional`` schedules take one at every step.
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


def same_class_partners(labels: torch.Tensor) -> torch.Tensor:
    """For each image, another image of its class: the next one of that class, cyclically
    (itself only when it is its class's only image)."""
    partner = torch.empty_like(labels)
    for c in labels.unique():
        of_class = torch.nonzero(labels == c).flatten()
        partner[of_class] = of_class.roll(-1)
    return partner


@torch.no_grad()
def style_nats(model: SSVAE, images: torch.Tensor, labels: torch.Tensor) -> float:
    """How much of an image's style z carries, in nats per image: the mean over ``images``
    of log p(x_i | z_i, y_i) - log p(x_i | z_j, y_i), z_i the mean of q(z|x_i, y_i) at the
    true class y_i and j another image of the same class. 0 when the decoder ignores z (or
    the encoder gives every image of a class the same z): the class alone explains x."""
    x = model.features(images)
    y = torch.nn.functional.one_hot(labels, model.num_classes).to(x)
    q = model.z_posterior(x, y)
    try:
        z = q.mean
    except NotImplementedError:  # flows: a draw
        z = q.sample()
    z_other = z[same_class_partners(labels.cpu()).to(z.device)]
    total = 0.0
    for xb, yb, zb, ob in zip(*(t.split(EVAL_BATCH) for t in (x, y, z, z_other)), strict=True):
        own = model.likelihood(model.decoder(torch.cat([zb, yb], -1))).log_prob(xb)
        other = model.likelihood(model.decoder(torch.cat([ob, yb], -1))).log_prob(xb)
        total += (own - other).sum().item()
    return total / len(images)


@torch.no_grad()
def class_from_y(model: SSVAE, images: torch.Tensor) -> float:
    """How far y sets the class of what the decoder draws: over ``images`` and every class
    c, the fraction of decodings of (the image's z, c) (``model.style`` and the means of
    p(x|y=c,z)) that the model's own q(y|x) assigns to c. 1 when y alone sets the class;
    exactly 1/classes when the decoder ignores y (each image decodes alike for every c)."""
    k = model.num_classes
    classes = torch.arange(k, device=images.device)
    hits = 0
    for xb in images.split(EVAL_BATCH // k):
        z = model.style(xb).repeat_interleave(k, 0)
        c = classes.repeat(len(xb))
        hits += (model.class_logits_of(model.decode(z, c)).argmax(-1) == c).sum().item()
    return hits / (len(images) * k)


def labels_alone(
    data: ImageBatches,
    parts: Split,
    hidden: Sequence[int],
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
) -> float:
    """The baseline M2 has to beat: test accuracy of M2's classifier network (an MLP with
    ``hidden`` sizes, from images to class logits) trained on the labelled images alone.
    Each of ``steps`` steps takes the whole labelled set, binarized afresh as M2's batches
    are, and one Adam step at ``lr`` on its cross-entropy. The initialization and the
    binarization's noise are drawn from generators seeded with ``seed``, and torch's and
    the data's generators are left as they were: the figure is a function of its arguments."""
    with data.generator_kept():
        torch.manual_seed(seed)
        data.rng.seed(seed)
        classes = data.dataset.num_classes
        net = mlp([data.train_images.shape[1], *hidden, classes]).to(data.device)
        optimizer = torch.optim.Adam(net.parameters(), lr)
        labels = data.dataset.train_labels[parts.labelled].to(data.device)
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(net(data.batch(parts.labelled)), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            logits = [net(xb) for xb in data.test_images.split(EVAL_BATCH)]
    predicted = torch.cat(logits).argmax(-1).cpu()
    return (predicted == data.dataset.test_labels).float().mean().item()


def split_for_model(model: SSVAE, data: ImageBatches, seed: int) -> Split:
    """The split ``model`` trains on (its ``labeled`` and ``validation``), computed once
    per data and seed."""
    key = (id(data), seed)
    cached = model.__dict__.get("_split")
    if cached is None or cached[0] != key:
        labels = data.dataset.train_labels
        validation = validation_size(model.validation, len(labels))
        parts = split(labels, model.num_classes, model.labeled, validation, seed)
        log.info(
            "%d labelled, %d unlabelled, %d validation images",
            len(parts.labelled),
            len(parts.unlabelled),
            len(parts.validation),
        )
        cached = model.__dict__["_split"] = (key, parts)
    return cached[1]


def interleaved(unlabelled: int, labelled: int) -> list[bool]:
    """Where the ``labelled`` steps go among ``unlabelled + labelled``: spread evenly, the
    first half an interval in (True marks a labelled step)."""
    total = unlabelled + labelled
    at = {k * total // labelled + total // (2 * labelled) for k in range(labelled)}
    return [i in at for i in range(total)]


def train_batches(model: SSVAE, data: ImageBatches, batch_size: int, epoch: int, seed: int):
    """One epoch of steps ``(unlabelled, [labelled, labels, [labelled_scale]])``:
    every unlabelled image once, in an order set by (seed, epoch), and the labelled images
    as ``model.schedule`` says (and alpha per labelled image as ``model.aux_scaling`` does):

    - ``every-step``: the next labelled batch joins each step, unscaled;
    - ``proportional``: the same, its terms scaled by (N_l / B_l) / (N_u / B_u), so that
      each step estimates the objective as written, in which the labelled and unlabelled
      terms weigh in proportion to their counts N_l and N_u;
    - ``interleave``: one pass over the labelled images an epoch, in steps of their own
      (an empty unlabelled batch) spread evenly among the unlabelled steps, as Pyro's
      ``examples/vae/ss_vae_M2.py`` does.
    """
    from .loop import Batches

    parts = split_for_model(model, data, seed)
    device = data.train_images.device
    labels = data.dataset.train_labels[parts.labelled]
    y_labelled = torch.nn.functional.one_hot(labels, model.num_classes).to(device, torch.float)
    labelled_index = parts.labelled.to(device)
    n_u, n_l = len(parts.unlabelled), len(parts.labelled)
    model.aux_per_image = model.aux_weight_per_image(n_l, n_l + n_u)
    order = torch.randperm(n_u, generator=_generator(seed, epoch, 1))
    unlabelled = parts.unlabelled[order].to(device)
    size = min(batch_size, n_l)
    if model.schedule == "interleave":
        labelled = iter(torch.randperm(n_l, generator=_generator(seed, epoch, 2)).split(size))
        plan = interleaved(math.ceil(n_u / batch_size), math.ceil(n_l / size))
    else:
        labelled = labelled_batches(n_l, batch_size, _generator(seed, epoch, 2))
        plan = [False] * math.ceil(n_u / batch_size)

    def labelled_batch():
        at = next(labelled)
        return model.train_features(data.batch(labelled_index[at])), y_labelled[at]

    def step(x, labelled=None, scale=1.0):
        # Only what differs from semi_model's defaults is passed, the scale as a tensor: the
        # jitted estimator traces tensors only and keys its programs by their number.
        if labelled is None:
            return (x,)
        if scale == 1.0:
            return (x, *labelled)
        return (x, *labelled, torch.tensor(scale, device=device))

    def steps():
        unlabelled_batches = data.train_batches(batch_size, unlabelled)
        for labelled_only in plan:
            if labelled_only:
                x_l, y = labelled_batch()
                yield step(x_l[:0], (x_l, y))
                continue
            x = model.train_features(next(unlabelled_batches))
            if model.schedule == "interleave":
                yield step(x)
                continue
            x_l, y = labelled_batch()
            proportional = model.schedule == "proportional"
            yield step(x, (x_l, y), (n_l / len(x_l)) / (n_u / len(x)) if proportional else 1.0)

    return Batches(steps(), len(plan), min(batch_size, n_u))


def held_out(model: SSVAE, data: ImageBatches, seed: int) -> dict[str, float | None]:
    """Test ELBO (y summed out), validation and test accuracy of q(y|x), the style that
    z carries (``style_nats``) and how far y sets the class (``class_from_y``) on the test
    images."""
    parts = split_for_model(model, data, seed)
    device = data.test_images.device
    validation = None
    if len(parts.validation):
        labels = data.dataset.train_labels[parts.validation].to(device)
        validation = accuracy(model, data.fixed(parts.validation), labels)
    test = evaluate(model, data, EVAL_SEED)
    return {
        "test_elbo": test["test_elbo"],
        "validation_accuracy": validation,
        "test_accuracy": test["test_accuracy"],
        "style_nats": test["style_nats"],
        "class_from_y": test["class_from_y"],
    }


def summarize(parts: Split, metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """The split's sizes, and the test accuracy at the best validation epoch."""
    summary = {
        "labeled": len(parts.labelled),
        "unlabelled": len(parts.unlabelled),
        "validation": len(parts.validation),
    }
    if metrics[-1]["validation_accuracy"] is not None:
        best = max(metrics, key=lambda m: m["validation_accuracy"])
        summary["best_validation_epoch"] = best["epoch"]
        summary["test_accuracy_at_best_validation"] = best["test_accuracy"]
    return summary


def _true_labels(data: ImageBatches, n: int) -> list[str] | None:
    """The classes of the first ``n`` test images, as the analogies' row labels."""
    labels = data.dataset.test_labels
    return None if labels is None else [str(int(c)) for c in labels[:n]]


def save_pictures(model: SSVAE, data: ImageBatches, run_dir: Path, metrics: list) -> None:
    """conditional_samples.png, analogies.png and accuracy.png."""
    test_images = data.test_images
    n = model.num_classes
    rows = model.generate(n * n)  # a row per class, one style z per column
    labels = [str(c) for c in range(n)]
    plots.image_grid(
        rows,
        model.image_shape,
        run_dir / "conditional_samples.png",
        ncols=n,
        title="Conditional samples p(x|y,z): one style z ~ p(z) per column",
        row_labels=labels,
        ylabel="class y",
        xlabel="style z",
    )

    classes = torch.arange(n, device=test_images.device)
    shown = test_images[:n]
    styles = model.style(shown)  # each test image's z, decoded with every class
    decoded = model.image(model.decode(styles.repeat_interleave(n, 0), classes.repeat(n)))
    grid = torch.cat([shown.unsqueeze(1), decoded.reshape(n, n, -1)], 1).reshape(n * (n + 1), -1)
    plots.image_grid(
        grid,
        model.image_shape,
        run_dir / "analogies.png",
        ncols=n + 1,
        title="Analogies: each test image's style z decoded with every class y",
        col_labels=["input", *labels],
        row_labels=_true_labels(data, n),
        xlabel="class y",
        ylabel="test image (its true class)",
    )
    plots.accuracy_curve(metrics, run_dir / "accuracy.png", title=f"{data.dataset.name}: accuracy")


def evaluate(model: SSVAE, data: ImageBatches, seed: int = EVAL_SEED) -> dict[str, float]:
    """Test accuracy and test ELBO of a trained semi-supervised model."""
    labels = data.dataset.test_labels.to(data.test_images.device)
    with seeded(seed, data.test_images.device):
        test_elbo = elbo(model, data.test_images)
        style = style_nats(model, data.test_images, labels)
        from_y = class_from_y(model, data.test_images)
    return {
        "test_accuracy": accuracy(model, data.test_images, labels),
        "test_elbo": test_elbo,
        "style_nats": style,
        "class_from_y": from_y,
        "continuous": getattr(model.likelihood, "continuous", False),
    }
