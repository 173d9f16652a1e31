"""Held-out numbers: the ELBO and the importance-sampled log-likelihood, in nats per image.

Both come from Pyro traces of the model and guide, so they hold for any
combination of components. log p(x) is estimated as
log (1/K) sum_k p(x, z_k) / q(z_k|x) with z_k ~ q(z|x) (Burda et al. 2016), whose
expectation rises towards log p(x) with K and is never below the ELBO.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import inspect
import io
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence
from tqdm.auto import tqdm

from ..errors import PyroVAEError
from ..inference.elbos import log_density, vectorized_traces
from ..models import VAE


@torch.no_grad()
def elbo_terms(vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> dict[str, float]:
    """The single-sample ELBO of ``vae`` on images ``x`` and its two terms, per image.

    ``elbo`` is :func:`elbo`'s number (the same draws give the same value):
    log p(x, z) - log q(z|x) at one z ~ q(z|x) per image. ``recon`` is E_q[log p(x|z)]
    at that z (the observed sites), ``kl`` is KL(q(z|x) || p(z)) of the latent sites, in
    closed form where PyTorch or Pyro has one for the pair (the default VAE's
    diagonal Normals), else log q(z|x) - log p(z) at the same z. So ``recon - kl``
    equals ``elbo`` within Monte Carlo error, exactly where no closed form exists.
    ``elbo_sq`` is the mean of the per-image ELBOs' squares, for their standard error
    (:func:`standard_error_of`), also when images are shared among processes (None for a
    program with sites outside the data plate).
    """
    totals = {"elbo": 0.0, "recon": 0.0, "kl": 0.0, "elbo_sq": 0.0}
    for xb in x.split(batch_size):
        guide = prune_subsample_sites(poutine.trace(vae.guide).get_trace(xb))
        model = prune_subsample_sites(
            poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(xb)
        )
        model.compute_log_prob()
        guide.compute_log_prob()
        totals["elbo"] += torch_item(model.log_prob_sum()) - torch_item(guide.log_prob_sum())
        per_image = _per_image(model, guide, len(xb))
        if per_image is None or totals["elbo_sq"] is None:
            totals["elbo_sq"] = None
        else:
            totals["elbo_sq"] += per_image.double().square().sum().item()
        for name, site in model.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                totals["recon"] += torch_item(site["log_prob_sum"])
                continue
            q = guide.nodes[name]
            try:
                totals["kl"] += torch_item(kl_divergence(q["fn"], site["fn"]).sum())
            except NotImplementedError:
                totals["kl"] += torch_item(q["log_prob_sum"] - site["log_prob_sum"])
    return {k: None if v is None else v / len(x) for k, v in totals.items()}


def _per_image(model: poutine.Trace, guide: poutine.Trace, size: int) -> torch.Tensor | None:
    """log p(x, z) - log q(z|x) of each image, from traces whose sites are all in the data
    plate (None where a site is not: a global latent has no per-image share)."""
    total = torch.zeros(size)
    for trace, sign in ((model, 1), (guide, -1)):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                if site["log_prob"].shape != (size,):
                    return None
                total = total + sign * site["log_prob"]
    return total


def standard_error_of(mean: float, mean_of_squares: float | None, n: int) -> float | None:
    """The standard error of a mean over ``n`` values, from their mean and the mean of their
    squares (the sample standard deviation over sqrt(n)); None where unknown."""
    if mean_of_squares is None or n < 2:
        return None
    variance = max(0.0, mean_of_squares - mean * mean) * n / (n - 1)
    return math.sqrt(variance / n)


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Give the C heap's free blocks back to the operating system.

    glibc serves allocations below its (adaptive) mmap threshold from the heap and
    keeps what is freed there; chunk after chunk of 17-34 MB tensors of varying
    shape then grew the resident set of a K=5000 evaluation past 2.5 GB on 1,000
    images. Trimming after each chunk keeps it near the live tensors' size.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


MAX_ELEMENTS = 1 << 23
"""Bound on particles x images x widest layer per forward pass (~32 MB of float32)."""


@torch.no_grad()
def elbo(vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> float:
    """Single-sample ``Trace_ELBO`` of ``vae`` on images ``x``, averaged per image."""
    loss = Trace_ELBO(max_plate_nesting=1)
    total = sum(loss.loss(vae.model, vae.guide, xb) for xb in x.split(batch_size))
    return -total / len(x)


@torch.no_grad()
def log_weights(vae: VAE, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) for ``num_samples`` draws per image, shape (K, B).

    The model's own densities: any ``poutine.scale`` used in training is ignored, masks
    hold.
    """
    model_trace, guide_trace, _ = vectorized_traces(vae.model, vae.guide, num_samples, -2, x)
    log_w = log_density(model_trace, scaled=False) - log_density(guide_trace, scaled=False)
    # Pyro's traces sit in reference cycles; emptying their sites frees this chunk's
    # large tensors now rather than at the next garbage collection.
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            site.clear()
    return log_w.expand(num_samples, len(x))


def _widest(vae: VAE) -> int:
    """Values per (sample, image) in the largest intermediate tensor, roughly (for any
    program: the components it may lack count as 0)."""
    parts = [getattr(vae, name, None) for name in ("posterior", "likelihood", "prior")]
    widths = [getattr(vae, "data_dim", 1), *(getattr(c, "param_dim", 0) for c in parts)]
    widths += [p.shape[0] for p in vae.parameters() if p.dim() == 2]
    widths += [getattr(c, "evaluation_width", 0) for c in parts]
    return max(widths)


ONE_DAY = 24 * 3600.0
"""Longest evaluation started: a K that would take longer is refused after its first chunk."""

EVAL_SEED = 0
"""Seed of the held-out numbers' Monte Carlo draws, unless one is given."""


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """Draw from torch's generators seeded with ``seed`` inside, and leave them as they were.

    Evaluation then gives the same number for the same model every time, and does not
    shift the training run's random stream.
    """
    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def test_elbo(vae: VAE, x: torch.Tensor, seed: int = EVAL_SEED) -> float:
    """:func:`elbo` with its draws seeded: the same model gives the same number."""
    with seeded(seed, x.device):
        return elbo(vae, x)


def test_elbo_terms(vae: VAE, x: torch.Tensor, seed: int = EVAL_SEED) -> dict[str, float]:
    """:func:`elbo_terms` with its draws seeded, as :func:`test_elbo`'s (so its ``elbo`` is
    that number)."""
    with seeded(seed, x.device):
        return elbo_terms(vae, x)


def test_log_likelihood(
    vae: VAE, x: torch.Tensor, num_samples: int, seed: int = EVAL_SEED, **options: Any
) -> float:
    """:func:`log_likelihood` with its draws seeded: the same model gives the same number."""
    with seeded(seed, x.device):
        return log_likelihood(vae, x, num_samples, **options)


def test_log_likelihood_per_image(
    vae: VAE, x: torch.Tensor, num_samples: int, seed: int = EVAL_SEED, **options: Any
) -> torch.Tensor:
    """:func:`log_likelihood_per_image` with its draws seeded, as :func:`test_log_likelihood`
    (whose number is this tensor's mean)."""
    with seeded(seed, x.device):
        return log_likelihood_per_image(vae, x, num_samples, **options)


def _chunks(vae: VAE, x: torch.Tensor, num_samples: int, max_elements: int) -> tuple[int, int, int]:
    """Images per batch, samples per chunk (at most ``max_elements`` values per layer), and
    the number of chunks."""
    width = _widest(vae)
    batch = max(1, min(len(x), max_elements // (width * min(num_samples, 100))))
    chunk = max(1, min(num_samples, max_elements // (width * batch)))
    return batch, chunk, math.ceil(len(x) / batch) * math.ceil(num_samples / chunk)


def _refuse_if_too_slow(seconds: float, chunks: int, num_samples: int, n: int, limit: float):
    projected = seconds * chunks
    if projected > limit:
        raise PyroVAEError(
            f"log p(x) with K={num_samples:,} samples on {n:,} images would take about "
            f"{projected / 3600:,.0f} hours at this speed ({seconds:.3g} s per chunk of "
            f"{chunks:,}); choose a smaller --iw-samples"
        )


@torch.no_grad()
def log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int,
    max_elements: int = MAX_ELEMENTS,
    *,
    max_seconds: float = ONE_DAY,
    progress: bool = False,
) -> float:
    """Importance-sampled log p(x) with ``num_samples`` guide draws per image, per image.

    Images and samples are processed in chunks of at most ``max_elements`` values
    per layer, so memory stays bounded for K = 5000 on all of MNIST; the chunks are
    combined with logsumexp, which leaves the estimate unchanged. The first chunk is
    timed, and a K that would take more than ``max_seconds`` is refused then.
    """
    per_image = log_likelihood_per_image(
        vae, x, num_samples, max_elements, max_seconds=max_seconds, progress=progress
    )
    return per_image.mean().item()


@torch.no_grad()
def log_likelihood_per_image(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int,
    max_elements: int = MAX_ELEMENTS,
    *,
    max_seconds: float = ONE_DAY,
    progress: bool = False,
) -> torch.Tensor:
    """:func:`log_likelihood` image by image: a float64 tensor of shape (N,) on the CPU, in
    the order of ``x`` (for paired comparisons of two models on the same images)."""
    batch, chunk, chunks = _chunks(vae, x, num_samples, max_elements)
    bar = tqdm(
        total=chunks,
        desc=f"log p(x), K={num_samples}",
        leave=False,
        disable=None if progress else True,
    )
    started, done, per_image = time.perf_counter(), 0, []
    for xb in x.split(batch):
        parts = []
        for start in range(0, num_samples, chunk):
            parts.append(
                torch.logsumexp(log_weights(vae, xb, min(chunk, num_samples - start)), dim=0)
            )
            release_freed_memory()
            done += 1
            bar.update()
            if done == 1:
                seconds = time.perf_counter() - started
                _refuse_if_too_slow(seconds, chunks, num_samples, len(x), max_seconds)
        log_px = torch.logsumexp(torch.stack(parts), dim=0) - math.log(num_samples)
        per_image.append(log_px.double().cpu())
    bar.close()
    return torch.cat(per_image)


def check_log_likelihood_time(
    vae: VAE, x: torch.Tensor, num_samples: int, max_seconds: float = ONE_DAY
) -> None:
    """Refuse, before training, a final log p(x) that would take more than ``max_seconds``.

    Times one chunk on the model as it is (with its own random draws, which leave the
    training's stream alone); only for K x images above 10^7, where it can matter.
    """
    if num_samples * len(x) <= 10**7:
        return
    batch, chunk, chunks = _chunks(vae, x, num_samples, MAX_ELEMENTS)
    with seeded(EVAL_SEED, x.device), torch.no_grad():
        started = time.perf_counter()
        log_weights(vae, x[:batch], min(chunk, num_samples))
        seconds = time.perf_counter() - started
    release_freed_memory()
    _refuse_if_too_slow(seconds, chunks, num_samples, len(x), max_seconds)


def evaluate_run(
    run_dir: str | Path,
    iw_samples: int | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    *,
    seed: int = EVAL_SEED,
    plugins: list[str] | None = None,
    progress: bool = False,
    per_image: str | Path | None = None,
) -> dict[str, Any]:
    """Test ELBO and log p(x) of a run on its test set, with draws seeded by ``seed``.

    ``per_image``: a ``.npy`` file to write each test image's log p(x) to (float64, in
    the test set's order), for paired comparisons of two runs on the same images.

    For a semi-supervised run (M2, M1+M2): test accuracy and the ELBO with y summed out.
    The result is added to the run's ``summary.json`` under ``evaluations`` (one entry
    per K and seed), beside the training run's own figures, which stay as they were.
    With the training's K, the default seed and the training's device, it repeats the
    final numbers of a run trained in one process (under torchrun each process drew
    its share of the test set with the same seed).
    ``plugins`` replaces the plugin files the run recorded (when they have moved).
    """
    from ..data import ImageBatches, load_dataset
    from ..training.devices import resolve_device
    from ..training.runs import SUMMARY_FILE, atomic_write, load_run, write_json

    if per_image is not None:
        per_image = Path(per_image)
        if per_image.suffix != ".npy":
            raise PyroVAEError(f"--per-image writes a NumPy .npy file; got {per_image}")
        if not per_image.parent.is_dir():
            raise PyroVAEError(f"folder {per_image.parent} does not exist")
    device = resolve_device(device)
    vae = load_run(run_dir, device, plugins=plugins)
    if per_image is not None and "per_image" not in inspect.signature(vae.evaluate).parameters:
        raise PyroVAEError(
            f"--per-image writes log p(x) per image, which a {type(vae).__name__} run does "
            f"not estimate"
        )
    config = vae.config
    k = config.inference.iw_samples if iw_samples is None else iw_samples
    if k < 1:
        raise PyroVAEError(f"--iw-samples must be >= 1, got {k}")
    dataset = load_dataset(config.data.dataset, data_dir or config.data.data_dir)
    data = ImageBatches(dataset, config.data.binarize, device)
    start = time.perf_counter()
    values: dict[str, torch.Tensor] = {}
    options = {} if per_image is None else {"per_image": values}
    result = vae.evaluate(data, k, seed, progress, **options)
    if per_image is not None:
        buffer = io.BytesIO()
        np.save(buffer, values["log_px"].numpy())
        atomic_write(per_image, buffer.getvalue())
        result["per_image"] = str(per_image)
    result["seed"] = seed
    result["eval_seconds"] = time.perf_counter() - start
    summary_path = Path(run_dir) / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    same = ("iw_samples", "seed")
    earlier = [
        e for e in summary.get("evaluations", []) if any(e.get(f) != result.get(f) for f in same)
    ]
    write_json(summary_path, {**summary, "evaluations": [*earlier, result]})
    return result
