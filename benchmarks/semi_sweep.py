"""M2 at 100 labels: the labelled schedule and the auxiliary weight, judged on validation.

Trains ``pyro-vae train --model m2 --dataset mnist --labeled 100 --hidden 500`` once
per setting (same seed, same epochs) and prints, per setting, the validation
accuracy at its best epoch and at the last, and the seconds per epoch. The test
set plays no part in the choice: this script never reads the test accuracy.

    python benchmarks/semi_sweep.py --data-dir ../shared/data --epochs 15 --out R
"""

import argparse
import json
from pathlib import Path

from _common import default_data_dir, run_main

from pyro_vae import Config, train
from pyro_vae.training.runs import read_metrics

PYRO_EXAMPLE = {"lr": 4.2e-4, "beta1": 0.95, "batch_size": 200, "aux_weight": 46.0}
"""Pyro's examples/vae/ss_vae_M2.py as documented: -lr 4.2e-4 -b1 0.95 -bs 200 -alm 46."""

BASE = {"schedule": "every-step", "aux_weight": 50.0, "lr": 1e-3}
"""What each setting departs from: M2's defaults when the sweep began (session 5). The
defaults are proportional, alpha 5000 since session 11, and lr 3e-3 since session 13,
which the sweep chose."""

SETTINGS = {
    # name: the config's fields that differ from BASE
    "every-step, alpha 50": {},
    "proportional, alpha 50": {"schedule": "proportional"},
    "interleave, alpha 50": {"schedule": "interleave"},
    # = alpha 50 at 100 labels (0.1 * 50,000 / 100)
    "proportional, alpha 0.1 N": {
        "schedule": "proportional",
        "aux_scaling": "data",
        "aux_weight": 0.1,
    },
    "proportional, alpha 500": {"schedule": "proportional", "aux_weight": 500.0},
    "interleave, alpha 500": {"schedule": "interleave", "aux_weight": 500.0},
    "proportional, alpha 5000": {"schedule": "proportional", "aux_weight": 5000.0},
    # alpha 51 per labelled image, as every-step's 50, with the labelled ELBO scaled down
    "proportional, alpha 20000": {"schedule": "proportional", "aux_weight": 20000.0},
    "proportional, alpha 5000, conv classifier": {
        "schedule": "proportional",
        "aux_weight": 5000.0,
        "classifier": "conv",
    },
    "proportional, alpha 5000, lr 3e-3": {
        "schedule": "proportional",
        "aux_weight": 5000.0,
        "lr": 3e-3,
    },
    "every-step, intensities": {"binarize": "none"},
    "Pyro's example": {"schedule": "interleave", "binarize": "none", **PYRO_EXAMPLE},
    "Pyro's example, binarized": {"schedule": "interleave", **PYRO_EXAMPLE},
}


def config_for(args, **fields) -> Config:
    config = Config()
    config.data.dataset, config.data.data_dir = "mnist", args.data_dir
    config.model.kind, config.model.hidden, config.model.latent_dim = "m2", [500], 50
    config.semi.labeled = args.labels
    config.train.epochs, config.train.seed = args.epochs, args.seed
    for name, value in {**BASE, **fields}.items():
        section = next(s for s in (config.semi, config.train, config.data) if hasattr(s, name))
        setattr(section, name, value)
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--labels", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", action="append", help="a setting's name (repeatable)")
    parser.add_argument("--out", default="runs/semi_sweep")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, setting in SETTINGS.items():
        if args.only and name not in args.only:
            continue
        run_dir = out / name.replace(", ", "-").replace(" ", "").replace("'", "")
        train(config_for(args, **setting), run_dir, overwrite=True, progress=False)
        metrics = read_metrics(run_dir)
        best = max(metrics, key=lambda m: m["validation_accuracy"])
        rows.append(
            {
                "setting": name,
                "validation_at_best": best["validation_accuracy"],
                "best_epoch": best["epoch"],
                "validation_last": metrics[-1]["validation_accuracy"],
                "curve": [round(m["validation_accuracy"], 4) for m in metrics],
                "seconds_per_epoch": sum(m["seconds"] for m in metrics) / len(metrics),
            }
        )
        (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n")

    lines = [
        f"| setting ({args.labels} labels, seed {args.seed}, {args.epochs} epochs) "
        "| best validation accuracy (epoch) | last | s/epoch |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['validation_at_best']:.4f} ({r['best_epoch']}) "
            f"| {r['validation_last']:.4f} | {r['seconds_per_epoch']:.1f} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "sweep.md").write_text(table + "\n")


if __name__ == "__main__":
    run_main(main)
