"""Importance-sampled log p(x) with K=5000 on the 10,000 MNIST test images: time and memory.

    python benchmarks/evaluate_speed.py --data-dir ../shared/data [--run R] [--iw-samples 5000]
        [--images 10000]

Trains a 1-epoch default model first unless --run names a trained run directory.
Peak memory is the process's maximum resident set size (ru_maxrss) after the
evaluation, and the growth over what training had already used.
"""

import argparse
import resource
import tempfile
import time

import pyro
from _common import default_data_dir, run_main

from pyro_vae import Config, ImageBatches, load_dataset, load_run, train
from pyro_vae.evaluation.evaluate import log_likelihood


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--run", default=None)
    parser.add_argument("--iw-samples", type=int, default=5000)
    parser.add_argument("--images", type=int, default=10_000, help="the first N test images")
    args = parser.parse_args()

    run = args.run
    if run is None:
        run = tempfile.mkdtemp() + "/run"
        config = Config()
        config.data.dataset, config.data.data_dir = "mnist", args.data_dir
        config.train.epochs, config.inference.iw_samples = 1, 1
        train(config, run, progress=False)
    vae = load_run(run)
    test = ImageBatches(load_dataset("mnist", args.data_dir), "dynamic").test_images[: args.images]
    before = peak_mb()
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    value = log_likelihood(vae, test, args.iw_samples)
    seconds = time.perf_counter() - start
    print(
        f"log p(x) = {value:.2f} nats/image with K={args.iw_samples} on {len(test)} images: "
        f"{seconds:.0f} s, peak RSS {peak_mb():.0f} MB ({peak_mb() - before:.0f} MB above "
        f"the {before:.0f} MB before the evaluation)"
    )


if __name__ == "__main__":
    run_main(main)
