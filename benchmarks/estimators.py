"""ELBO estimators on dynamically binarized MNIST at an equal epoch budget.

One `pyro-vae compare` over the estimators of the issue, with the default
784-400-50 MLP, log p(x) with K=1000 for every run, and gradient SNR on a fixed
batch at the end of training. Prints the Markdown table for docs/RESULTS.md.

    python benchmarks/estimators.py --data-dir ../shared/data --epochs 10
"""

import argparse
import time

from _common import default_data_dir, run_main

from pyro_vae import Config
from pyro_vae.evaluation.compare import compare

ESTIMATORS = ["trace", "meanfield", "iwae:5", "dreg:5", "scorefn"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--snr-repeats", type=int, default=100)
    parser.add_argument("--estimators", default=",".join(ESTIMATORS))
    parser.add_argument("--out", default="runs/estimators")
    args = parser.parse_args()

    config = Config()
    config.data.dataset, config.data.data_dir = "mnist", args.data_dir
    config.train.epochs = args.epochs
    config.inference.iw_samples = args.iw_samples
    specs = args.estimators.split(",")
    start = time.perf_counter()
    compare(config, specs, args.out, snr_repeats=args.snr_repeats, overwrite=True)
    print(
        f"command: pyro-vae compare --dataset mnist --epochs {args.epochs} "
        f"--iw-samples {args.iw_samples} --snr-repeats {args.snr_repeats} "
        + " ".join(f"--elbo {s}" for s in specs)
        + f" --out {args.out}   ({time.perf_counter() - start:.0f} s in all)"
    )
    print(open(f"{args.out}/compare.md").read())


if __name__ == "__main__":
    run_main(main)
