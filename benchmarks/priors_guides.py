"""Priors x guides on dynamically binarized MNIST at an equal epoch budget.

For each row: train with the default 784-400-50 MLP, Bernoulli likelihood and
Trace_ELBO, then evaluate the test ELBO and importance-sampled log p(x).
Prints a Markdown table (for docs/RESULTS.md) and writes it with the raw JSON.

    python benchmarks/priors_guides.py --data-dir ../shared/data --epochs 10 --iw-samples 1000
"""

import argparse
import json
import time
from pathlib import Path

from _common import default_data_dir, run_main

from pyro_vae import Config, evaluate_run, train

ROWS = [
    ("normal", "normal"),
    ("mog:10", "normal"),
    ("vamp:500", "normal"),
    ("flow:2", "normal"),
    ("normal", "iaf:2"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iw-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/priors_guides")
    parser.add_argument("--rows", default=None, help="comma-separated row numbers to run")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [ROWS[int(i)] for i in args.rows.split(",")] if args.rows else ROWS
    results = []
    for prior, guide in chosen:
        config = Config()
        config.data.dataset = "mnist"
        config.data.data_dir = args.data_dir
        config.model.prior, config.model.guide = prior, guide
        config.train.epochs, config.train.seed = args.epochs, args.seed
        config.inference.iw_samples = 1  # the real evaluation follows
        run_dir = out / f"{prior}-{guide}".replace(":", "")
        start = time.perf_counter()
        summary = train(config, run_dir, overwrite=True, progress=False)
        train_seconds = time.perf_counter() - start
        evaluated = evaluate_run(run_dir, args.iw_samples, args.data_dir)
        row = {
            "prior": prior,
            "guide": guide,
            "test_elbo": evaluated["test_elbo"],
            "log_px": evaluated["log_px"],
            "iw_samples": args.iw_samples,
            "train_seconds": train_seconds,
            "eval_seconds": evaluated["eval_seconds"],
            "images_per_second": summary["train_images_per_second"],
            "command": (
                f"pyro-vae train --dataset mnist --epochs {args.epochs} --seed {args.seed} "
                f"--prior {prior} --guide {guide} --out R && "
                f"pyro-vae evaluate R --iw-samples {args.iw_samples}"
            ),
        }
        results.append(row)
        print(json.dumps(row), flush=True)

    lines = [
        f"| prior | guide | test ELBO | log p(x), K={args.iw_samples} | train s | eval s |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| `{r['prior']}` | `{r['guide']}` | {r['test_elbo']:.2f} | {r['log_px']:.2f} "
        f"| {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |"
        for r in results
    ]
    table = "\n".join(lines)
    print(table)
    (out / "priors_guides.md").write_text(table + "\n")
    (out / "priors_guides.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
