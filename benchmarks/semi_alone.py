"""M2 at its defaults against its classifier trained on the labels alone, on an MNIST subset.

For each seed: M2 (the ``train`` API, as ``pyro-vae train --model m2``, at its defaults
but for ``--hidden``, ``--latent-dim`` and any ``--set section.key=value``) on MNIST's
first ``--train-images`` training images, ``--validation`` of them held out and
``--labeled`` of the rest labelled (or on the bundled digits with ``--dataset digits``,
which holds out its default fifth); then M2's classifier network trained on those
labelled images alone for as many steps (``pyro_vae.semi.labels_alone``), once per
``--alone-lr``. Test accuracy after the last epoch or step, on MNIST's first
``--test-images`` test images (all 297 of the digits'). Prints a Markdown table with
the means and the spreads (max - min over the seeds) and writes JSON.

    python benchmarks/semi_alone.py --data-dir ../shared/data --epochs 30
    python benchmarks/semi_alone.py --dataset digits --hidden 400 --latent-dim 8 \
        --epochs 120 --set semi.aux_scaling=data --set semi.aux_weight=1
"""

import argparse
import json
import math
import time
from pathlib import Path

from _common import default_data_dir, run_main

from pyro_vae import Config, ImageBatches, load_dataset, semi, train
from pyro_vae.config import apply_overrides
from pyro_vae.data import Dataset, datasets, mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--dataset", choices=("mnist-subset", "digits"), default="mnist-subset")
    parser.add_argument("--train-images", type=int, default=11_000)
    parser.add_argument("--test-images", type=int, default=2_000)
    parser.add_argument(
        "--validation", type=int, default=None, help="1000 on MNIST; the digits' default fifth"
    )
    parser.add_argument("--labeled", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--alone-lr", default="1e-3,3e-3", help="rates of the classifier alone")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="M2's settings"
    )
    parser.add_argument("--out", default="runs/semi_alone")
    args = parser.parse_args()
    if args.validation is None and args.dataset == "mnist-subset":
        args.validation = 1_000

    @datasets.register("mnist-subset")
    def mnist_subset(data_dir=None):
        """MNIST's first --train-images training and first --test-images test images."""
        d = mnist(data_dir)
        n, m = args.train_images, args.test_images
        return Dataset(
            "mnist-subset", d.image_shape, d.levels, d.train_images[:n], d.train_labels[:n],
            d.test_images[:m], d.test_labels[:m],
        )  # fmt: skip

    data = ImageBatches(load_dataset(args.dataset, args.data_dir), "dynamic")
    rates = [float(r) for r in args.alone_lr.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        config = apply_overrides(Config(), args.set)
        config.data.dataset, config.data.data_dir = args.dataset, args.data_dir
        config.model.kind, config.model.hidden = "m2", [args.hidden]
        config.model.latent_dim = args.latent_dim
        config.semi.labeled, config.semi.validation = args.labeled, args.validation
        config.train.epochs, config.train.seed = args.epochs, seed
        start = time.perf_counter()
        summary = train(config, out / f"m2-{seed}", overwrite=True, progress=False)
        m2_seconds = time.perf_counter() - start
        parts = semi.split_for(config, data.dataset)
        steps = args.epochs * math.ceil(len(parts.unlabelled) / config.train.batch_size)
        alone = [semi.labels_alone(data, parts, [args.hidden], steps, lr, seed) for lr in rates]
        rows.append(
            {"seed": seed, "m2": summary["test_accuracy"], "alone": alone, "steps": steps,
             "m2_seconds": m2_seconds}
        )  # fmt: skip
        print(f"seed {seed}: M2 {summary['test_accuracy']:.4f}, alone {alone}", flush=True)

    def stats(values):
        return f"{sum(values) / len(values):.4f} (spread {max(values) - min(values):.4f})"

    m2 = "M2 at its defaults" + (f" but {' '.join(args.set)}" if args.set else "")
    header = ["seed", m2, *(f"labels alone, lr {r:g}" for r in rates)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["seed"]), f"{r['m2']:.4f}", *(f"{a:.4f}" for a in r["alone"])]
        lines.append("| " + " | ".join(cells) + " |")
    means = [stats([r["m2"] for r in rows])]
    means += [stats([r["alone"][i] for r in rows]) for i in range(len(rates))]
    lines.append("| mean | " + " | ".join(means) + " |")
    table = "\n".join(lines)
    images = args.train_images if args.dataset == "mnist-subset" else "the digits'"
    print(f"{args.epochs} epochs ({rows[0]['steps']} steps), {images} training images")
    print(table)
    (out / "semi_alone.md").write_text(table + "\n")
    (out / "semi_alone.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
