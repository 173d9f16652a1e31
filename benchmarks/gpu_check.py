"""GPU check: every component and estimator trains on CUDA; the traced step (``--compile
trace``) and the step captured in a CUDA graph (``--compile cudagraph``) take the eager
steps there; MNIST training and evaluation speed.

    python benchmarks/gpu_check.py --data-dir DIR --out DIR
    python benchmarks/gpu_check.py --data-dir DIR --out DIR --device cpu --no-mnist  # a dry run

Prints one line per check and a JSON summary (also written to OUT/gpu_check.json).
"""

import argparse
import dataclasses
import functools
import itertools
import json
import math
import time
import traceback
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam

from pyro_vae import (
    VAE,
    Config,
    ImageBatches,
    architectures,
    estimators,
    evaluate_run,
    guides,
    likelihoods,
    load_dataset,
    load_run,
    priors,
    train,
)
from pyro_vae.evaluation.evaluate import log_likelihood
from pyro_vae.training.train import resume


def check(name, fn, results):
    start = time.perf_counter()
    try:
        value = fn()
        results[name] = {"ok": True, "value": value, "seconds": time.perf_counter() - start}
        print(f"ok    {name}  {value}  ({time.perf_counter() - start:.1f}s)", flush=True)
    except Exception as e:
        results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(f"FAIL  {name}  {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()


def few_steps(data, device, elbo="trace", **components):
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(32,), **components).to(device)
    loss = estimators.build(elbo, num_particles=1, data_dim=64)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), loss=loss)
    for i in range(5):
        svi.step(data.batch(torch.arange(i * 50, i * 50 + 50, device=device)))
    value = log_likelihood(vae, data.test_images[:50], 10)
    assert math.isfinite(value), value
    assert next(vae.parameters()).device.type == device.type
    return round(value, 2)


def gaps(eager, other):
    """The largest differences of two runs' (losses, parameters): losses relative; both
    must be under 1e-5."""
    (a, pa), (b, pb) = eager, other
    loss_gap = max(abs(u - v) / abs(u) for u, v in zip(a, b, strict=True))
    param_gap = max((u - v).abs().max().item() for u, v in zip(pa, pb, strict=True))
    assert loss_gap < 1e-5 and param_gap < 1e-5, (loss_gap, param_gap)
    return {"loss_gap": loss_gap, "param_gap": param_gap}


def traced_against_eager(
    data, device, elbo="trace", kind="vae", mode="trace", adam_inside=True, **components
):
    """Three steps eager and three traced (``mode``: ``trace``, ``cudagraph`` for the
    traced step captured in a CUDA graph, ``inductor-cudagraph`` for inductor's compiled
    graph captured; ``adam_inside``: Adam's update in the graph) from the same weights
    and seed: the largest difference of their losses (relative) and of their parameters."""
    from pyro_vae.inference.optim import Adam as FusedAdam
    from pyro_vae.models.ssvae import SSVAE
    from pyro_vae.training.compiled import CAPTURED, CapturedStep, TracedStep

    x = data.batch(torch.arange(64, device=device))
    args = (
        (x,)
        if kind == "vae"
        else (x[:48], x[48:], torch.eye(10, device=device)[torch.arange(16) % 10])
    )
    runs = []
    for traced in (False, True):
        pyro.set_rng_seed(0)
        if kind == "vae":
            model = VAE((8, 8), latent_dim=4, hidden=(32,), **components).to(device)
            loss = estimators.build(elbo, num_particles=1, data_dim=64)
        else:
            model = SSVAE((8, 8), latent_dim=4, hidden=(32,)).to(device)
            loss = model.build_estimator("trace", 1)
        pyro.clear_param_store()
        optimizer = FusedAdam(1e-2)
        if traced and mode in CAPTURED:
            step = CapturedStep(model, loss, optimizer, mode, adam_inside=adam_inside)
        elif traced:
            step = TracedStep(model, loss, optimizer, mode)
        else:
            step = SVI(*model.svi_program(), optimizer, loss=loss).step
        pyro.set_rng_seed(1)
        with pyro.validation_enabled(False):
            losses = [step(*args) for _ in range(3)]
            losses = [float(v) for v in losses]  # read after all three: replays overwrite
        if traced and mode in CAPTURED:
            assert all(step.captures.values()), "the step was not captured"
            inside = [c.update is not None for c in step.captures.values()]
            assert all(inside) == adam_inside, "Adam's update in the graph or not, as asked"
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    return gaps(*runs)


def batches_in_graph_against_eager(data, device):
    """Four eager steps, each on a batch binarized afresh (``data`` dynamic, on the
    device), and four captured steps that make their batch in the graph from the same
    indices, Adam in the graph and the learning rate halved after each step (so each
    step captures anew): the largest difference of their losses (relative) and of their
    parameters. The binarization's draws and the model's must come in eager's order."""
    from pyro_vae.inference.optim import Adam as FusedAdam
    from pyro_vae.training.compiled import CapturedStep, InGraphBatches

    index = torch.arange(64, device=device)
    runs = []
    for captured in (False, True):
        pyro.set_rng_seed(0)
        model = VAE((8, 8), latent_dim=4, hidden=(32,)).to(device)
        loss = estimators.build("trace", num_particles=1, data_dim=64)
        pyro.clear_param_store()
        optimizer = FusedAdam(1e-2)
        make = functools.partial(model.step_args, data)
        if captured:
            batches = InGraphBatches(make, data.generator_kept)
            step = CapturedStep(model, loss, optimizer, "cudagraph", batches=batches)
        else:
            svi = SVI(*model.svi_program(), optimizer, loss=loss)

            def step(i, svi=svi, make=make):
                return svi.step(*make(i))

        pyro.set_rng_seed(1)
        data.rng.seed(1)  # the CPU's binarization (on CUDA the device's generator draws)
        losses = []
        with pyro.validation_enabled(False):
            for _ in range(4):
                losses.append(step(index))
                optimizer.hyperparameters.group["lr"] *= 0.5
            losses = [float(v) for v in losses]
        if captured:
            assert all(step.captures.values()) and step.recaptured, "captured, and again"
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    return gaps(*runs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-mnist", action="store_true", help="skip the MNIST checks")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(name, torch.__version__, pyro.__version__, flush=True)
    results = {}

    digits = load_dataset("digits")
    eight_bit = dataclasses.replace(
        digits,
        levels=255,
        train_images=digits.train_images * 15,
        test_images=digits.test_images * 15,
    )
    data = ImageBatches(eight_bit, "none", device)
    for p, lik, g in itertools.product(priors.entries(), likelihoods.entries(), guides.entries()):
        spec = dict(prior=p.example, likelihood=lik.example, guide=g.example)
        check(
            f"components {p.example} {lik.example} {g.example}",
            lambda s=spec: few_steps(data, device, **s),
            results,
        )
    for arch in architectures.names():
        check(f"arch {arch}", lambda a=arch: few_steps(data, device, arch=a), results)
    for entry in estimators.entries():
        check(
            f"estimator {entry.example}",
            lambda e=entry.example: few_steps(data, device, elbo=e),
            results,
        )

    for entry in estimators.entries():
        if entry.traceable:
            check(
                f"traced step {entry.example}",
                lambda e=entry.example: traced_against_eager(data, device, elbo=e),
                results,
            )
    check("traced step m2", lambda: traced_against_eager(data, device, kind="m2"), results)
    if device.type == "cuda":
        for entry in estimators.entries():
            if entry.traceable:
                check(
                    f"captured step {entry.example}",
                    lambda e=entry.example: traced_against_eager(
                        data, device, elbo=e, mode="cudagraph"
                    ),
                    results,
                )
        for p, lik, g in itertools.product(
            priors.entries(), likelihoods.entries(), guides.entries()
        ):
            spec = dict(prior=p.example, likelihood=lik.example, guide=g.example)
            check(
                f"captured step {p.example} {lik.example} {g.example}",
                lambda s=spec: traced_against_eager(data, device, mode="cudagraph", **s),
                results,
            )
        check(
            "captured step m2",
            lambda: traced_against_eager(data, device, kind="m2", mode="cudagraph"),
            results,
        )
        dynamic = ImageBatches(eight_bit, "dynamic", device)
        check(
            "captured step, batch in the graph, learning rate moved",
            lambda: batches_in_graph_against_eager(dynamic, device),
            results,
        )
        check(
            "captured step, Adam outside the graph",
            lambda: traced_against_eager(data, device, mode="cudagraph", adam_inside=False),
            results,
        )
        for kind in ("vae", "m2"):  # inductor's kernels captured (a compile each)
            check(
                f"captured inductor step {kind}",
                lambda k=kind: traced_against_eager(
                    data, device, kind=k, mode="inductor-cudagraph"
                ),
                results,
            )
    if args.no_mnist:
        return finish(out, results)

    def mnist_run():
        config = Config()
        config.data.dataset, config.data.data_dir = "mnist", args.data_dir
        config.train.device, config.train.epochs = args.device, args.epochs
        summary = train(config, out / "mnist", overwrite=True, progress=False)
        return {k: summary[k] for k in ("test_elbo", "log_px", "train_images_per_second")}

    check("mnist train on cuda", mnist_run, results)

    def captured_mnist_run():
        """The same run captured, each batch gathered and binarized in the graph (and with
        a schedule that moves the learning rate each epoch, so each epoch captures anew):
        its test ELBO beside the eager run's."""
        config = Config()
        config.data.dataset, config.data.data_dir = "mnist", args.data_dir
        config.train.device, config.train.epochs = args.device, args.epochs
        config.train.compile = "cudagraph"
        summary = train(config, out / "mnist-captured", overwrite=True, progress=False)
        config.train.lr_schedule = "exponential:0.9"
        scheduled = train(config, out / "mnist-captured-lr", overwrite=True, progress=False)
        eager = results["mnist train on cuda"].get("value") or {}
        if eager:  # the batches drawn in the graph, as the eager run drew them
            gap = abs(summary["test_elbo"] - eager["test_elbo"]) / abs(eager["test_elbo"])
            assert gap < 1e-4, (summary["test_elbo"], eager["test_elbo"])
        return {
            "test_elbo": summary["test_elbo"],
            "eager_test_elbo": eager.get("test_elbo"),
            "train_images_per_second": summary["train_images_per_second"],
            "scheduled_test_elbo": scheduled["test_elbo"],
        }

    check("mnist train --compile cudagraph on cuda", captured_mnist_run, results)
    check(
        "mnist resume on cuda",
        lambda: resume(out / "mnist", epochs=args.epochs + 1, progress=False)["test_elbo"],
        results,
    )
    check(
        "mnist evaluate K=5000 on cuda",
        lambda: evaluate_run(out / "mnist", 5000, args.data_dir, args.device),
        results,
    )
    check(
        "load a GPU run on the CPU",
        lambda: str(next(load_run(out / "mnist").parameters()).device),
        results,
    )
    finish(out, results)


def finish(out, results):
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    failed = [k for k, v in results.items() if not v["ok"]]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")


if __name__ == "__main__":
    main()
