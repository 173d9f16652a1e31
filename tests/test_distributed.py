"""Several processes with torch.distributed (gloo, CPU) under torchrun."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from pyro_vae import VAE, ImageBatches, PyroVAEError, estimators, load_dataset, train
from pyro_vae.training import distributed
from pyro_vae.training.runs import load_checkpoint, read_metrics

from .helpers import small_config

FLAGS = ["--hidden", "64", "--latent-dim", "8", "--quiet"]


def torchrun(nproc, *args, logs):
    """``python -m pyro_vae ARGS`` in ``nproc`` processes; each rank's stderr is kept in
    ``logs`` (faulthandler on), so a failure shows the rank's own message.

    A rank killed by a signal (gloo has aborted a CPU rank at teardown once in CI, with
    nothing printed) is run once more, and the first run's logs go into the message if
    the second fails too; a rank that exits with an error fails at once.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "-r", "2"]
    command += [f"--nproc_per_node={nproc}", "-m", "pyro_vae", *args]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    seen = []
    for attempt in range(2):
        log_dir = Path(logs) / f"attempt-{attempt}"
        result = subprocess.run(
            [*command[:3], "--log-dir", str(log_dir), *command[3:]],
            capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip
        if result.returncode == 0:
            return result
        ranks = "\n".join(
            f"--- {f.relative_to(log_dir)}:\n{f.read_text()[-3000:]}"
            for f in sorted(log_dir.rglob("stderr.log"))
        )
        seen.append(f"exit {result.returncode}\n{ranks}\n--- torchrun:\n{result.stderr[-1500:]}")
        if "Signal" not in result.stderr:
            break
        shutil.rmtree(args[args.index("--out") + 1], ignore_errors=True)
    raise AssertionError("\n\n".join(seen))


def test_two_gloo_processes_train_identical_parameters_and_rank_0_alone_writes(tmp_path):
    run = tmp_path / "run"
    torchrun(2, "train", "--epochs", "4", *FLAGS, "--out", str(run), logs=tmp_path / "logs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["parameters_identical_across_processes"] is True
    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4], "each epoch written once"
    elbos = [m["train_elbo"] for m in metrics]
    assert elbos[-1] > elbos[0] + 5, "the loss decreases"
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoint.pt", "config.toml", "elbo.png", "metrics.jsonl", "reconstructions.png",
         "samples.png", "summary.json"]
    )  # fmt: skip


def test_a_compiled_step_under_torchrun_takes_the_ddp_steps(tmp_path):
    """--compile under torchrun: each rank traces its step (the plate at the dataset's
    size) and the gradients are averaged outside the graph: the same parameters as DDP's
    eager steps, bit for bit, on every rank."""
    printed = {}
    for mode in ("none", "trace"):
        args = ["train", "--epochs", "2", *FLAGS[:-1], "--compile", mode]  # not --quiet
        result = torchrun(2, *args, "--out", str(tmp_path / mode), logs=tmp_path / "logs")
        printed[mode] = result.stdout
    assert "traced the training step" in printed["trace"] and "eagerly" not in printed["trace"]
    summary = json.loads((tmp_path / "trace" / "summary.json").read_text())
    assert summary["parameters_identical_across_processes"] is True
    eager = load_checkpoint(tmp_path / "none" / "checkpoint.pt")["model"]
    traced = load_checkpoint(tmp_path / "trace" / "checkpoint.pt")["model"]
    assert all(torch.equal(eager[k], traced[k]) for k in eager)


def test_two_processes_match_one_process_at_the_same_global_batch(tmp_path):
    """Tolerance 0.5 nats: five times the spread of 1-process runs over seeds 0-2 (0.09)."""
    torchrun(
        2, "train", "--epochs", "20", *FLAGS, "--out", str(tmp_path / "two"), logs=tmp_path / "logs"
    )
    two = json.loads((tmp_path / "two" / "summary.json").read_text())["test_elbo"]
    config = small_config(
        train={"epochs": 20, "batch_size": 128, "validate": False}, inference={"iw_samples": 100}
    )
    one = train(config, tmp_path / "one")["test_elbo"]
    assert abs(two - one) < 0.5, (one, two)


def test_estimators_without_a_differentiable_loss_are_refused_under_torchrun(monkeypatch):
    monkeypatch.setattr(distributed, "init", lambda device: distributed.World(0, 2))
    with pytest.raises(PyroVAEError, match="cannot run under torchrun"):
        train(small_config(inference={"elbo": "iwae:5"}), "unused")


@pytest.mark.parametrize("spec", ["trace", "meanfield", "jit-trace", "dreg:3"])
def test_a_minibatch_of_the_dataset_scales_the_loss_to_the_dataset(spec):
    """Under torchrun the plate has the dataset's size: loss(x, size=N) = N/B loss(x)."""
    data = ImageBatches(load_dataset("digits"), "static")
    x, size = data.test_images[:32], data.num_train
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    elbo = estimators.build(spec, num_particles=1, data_dim=64)
    losses = []
    for kwargs in ({}, {"size": size}):
        pyro.set_rng_seed(1)
        losses.append(elbo.differentiable_loss(vae.model, vae.guide, x, **kwargs).item())
    assert losses[1] == pytest.approx(losses[0] * size / len(x), rel=1e-5)


def test_a_rank_that_cannot_trace_makes_every_rank_train_eagerly(monkeypatch, caplog):
    """Each rank traces its own step; if one cannot (an out-of-memory error there, say),
    all must take the eager DDP step, or their all-reduces would not match."""
    import logging

    from pyro_vae.inference.kl import KLTerm
    from pyro_vae.training import loop

    world = distributed.World(0, 2)
    monkeypatch.setattr(distributed, "all_sum", lambda world, *values, device: [1.0])
    pyro.set_rng_seed(0)
    vae = VAE((8, 8), latent_dim=4, hidden=(16,))
    data = ImageBatches(load_dataset("digits"))
    config = small_config(train={"compile": "trace", "validate": False})
    elbo = estimators.build("trace", num_particles=1, data_dim=64)
    calls = []
    with pyro.validation_enabled(False), caplog.at_level(logging.WARNING, logger="pyro_vae"):
        step = loop._compiled(
            lambda *args: calls.append(args) or 0.0, vae, vae.svi_program(), KLTerm(), elbo,
            loop.make_optimizer(config), config, world, data,
        )  # fmt: skip
        step(data.batch(torch.arange(64)))
    assert len(calls) == 1, "this rank traced its step, and took the eager one all the same"
    assert "another process could not trace its step" in caplog.text
