"""The benchmark scripts still run, at tiny settings (their figures live in docs/, untested)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import mnist_dir, needs_mnist

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from throughput import build_benchmark_vae, paired_ratio  # noqa: E402


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """``python benchmarks/SCRIPT ARGS``, which must succeed."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@needs_mnist
def test_throughput_benchmark_times_both_steps_and_writes_json(tmp_path):
    out = tmp_path / "throughput.json"
    args = ["--data-dir", str(mnist_dir()), "--batch-sizes", "32", "--rounds", "3"]
    args += ["--seconds", "0.05", "--out", str(out)]
    done = run_benchmark("throughput.py", *args)
    (row,) = json.loads(out.read_text())["results"]
    rates, rounds = row["images_per_second"], row["rounds"]
    assert set(rates) == {"pyro-vae", "hand-written PyTorch", "plain Pyro (its examples' style)"}
    # The table is the rounds' medians; a ratio is the median of each round's paired ratio.
    for name, rate in rates.items():
        assert rate == statistics.median(rounds[name])
    ratio = paired_ratio(rounds["pyro-vae"], rounds["hand-written PyTorch"])
    assert row["ratios"]["pyro-vae"] == ratio
    assert f"ratio pyro-vae / hand-written at batch 32: {ratio:.2f}" in done.stdout


@needs_mnist
def test_throughput_stock_rows_twin_each_pyro_vae_row(tmp_path):
    out = tmp_path / "throughput.json"
    args = ["--data-dir", str(mnist_dir()), "--batch-sizes", "16", "--rounds", "1"]
    run_benchmark("throughput.py", *args, "--seconds", "0.01", "--stock", "--out", str(out))
    (row,) = json.loads(out.read_text())["results"]
    assert "pyro-vae, Pyro's stock distributions" in row["images_per_second"]


def test_the_stock_twin_has_the_default_vaes_loss_and_gradients():
    """What --stock times is the same function: the same parameters, loss and gradients."""
    import pyro
    import torch
    from pyro.infer import Trace_ELBO

    from pyro_vae import Config, ImageBatches, load_dataset

    data = ImageBatches(load_dataset("digits", None), "dynamic", torch.device("cpu"))
    x = data.batch(torch.arange(32))
    results = []
    for stock in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        vae = build_benchmark_vae(Config(), data, torch.device("cpu"), stock)
        pyro.set_rng_seed(4)
        loss = Trace_ELBO().loss_and_grads(vae.model, vae.guide, x)
        results.append((loss, [p.grad for p in vae.parameters()]))
    (loss, grads), (stock_loss, stock_grads) = results
    assert stock_loss == pytest.approx(loss, rel=1e-6)
    for a, b in zip(grads, stock_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_the_ratio_is_the_median_of_each_rounds_paired_ratio():
    """Not the ratio of the medians: a round where the machine slowed both sides cancels."""
    assert paired_ratio([10.0, 4.0, 12.0], [10.0, 2.0, 6.0]) == 2.0  # medians: 10 / 6


@needs_mnist
def test_the_m2_compile_benchmark_times_eager_and_traced_steps(tmp_path):
    out = tmp_path / "m2.json"
    args = ["--data-dir", str(mnist_dir()), "--rounds", "1", "--steps", "2"]
    args += ["--variants", "eager,trace", "--out", str(out)]
    done = run_benchmark("m2_compile.py", *args)
    rows = {row["variant"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"eager", "trace"} and rows["eager"]["ratio_to_eager"] == 1.0
    assert rows["trace"]["compile_seconds"] > 0 and "| trace |" in done.stdout


def test_the_semi_supervised_benchmark_writes_its_table_with_every_row(tmp_path):
    args = ["--dataset", "digits", "--labels", "100", "--epochs", "1", "--m1-epochs", "1"]
    args += ["--hidden", "32", "--latent-dim", "4", "--m1-features", "mean"]
    run_benchmark("semi_supervised.py", *args, "--out", str(tmp_path))
    rows = json.loads((tmp_path / "semi_supervised.json").read_text())
    assert [(r["model"], r["labels"]) for r in rows] == [("M2", 100), ("M1+M2", 100), ("ADGM", 100)]
    config = (tmp_path / "m1m2-100" / "config.toml").read_text()
    assert 'm1_features = "mean"' in config, "not the default, sample"
    table = (tmp_path / "semi_supervised.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and "class from y" in table[0]


@needs_mnist
def test_the_classifier_alone_benchmark_writes_m2_and_each_rate_per_seed(tmp_path):
    args = ["--data-dir", str(mnist_dir()), "--train-images", "1200", "--validation", "200"]
    args += ["--test-images", "300", "--epochs", "1", "--hidden", "16", "--latent-dim", "4"]
    done = run_benchmark("semi_alone.py", *args, "--seeds", "0,1", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "semi_alone.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1] and all(len(r["alone"]) == 2 for r in rows)
    assert all(r["steps"] == 8 for r in rows), "1 epoch of 900 unlabelled images, batch 128"
    table = (tmp_path / "semi_alone.md").read_text().splitlines()
    assert len(table) == 2 + 2 + 1 and table[-1].startswith("| mean |")
    assert "labels alone, lr 0.001" in table[0] and table[0] in done.stdout
