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

SETTINGS = {
    # name: (schedule, aux_scaling, aux_weight, lr)
    "every-step, alpha 50": ("every-step", "absolute", 50.0, 1e-3),
    "proportional, alpha 50": ("proportional", "absolute", 50.0, 1e-3),
    "interleave, alpha 50": ("interleave", "absolute", 50.0, 1e-3),
    "proportional, alpha 0.1 N": ("proportional", "data", 0.1, 1e-3),  # = alpha 50 at 100 labels
    "proportional, alpha 500": ("proportional", "absolute", 500.0, 1e-3),
    "interleave, alpha 500": ("interleave", "absolute", 500.0, 1e-3),
}


def config_for(args, schedule: str, scaling: str, aux: float, lr: float) -> Config:
    config = Config()
    config.data.dataset, config.data.data_dir = "mnist", args.data_dir
    config.model.kind, config.model.hidden, config.model.latent_dim = "m2", [500], 50
    config.semi.labeled, config.semi.schedule = args.labels, schedule
    config.semi.aux_scaling, config.semi.aux_weight = scaling, aux
    config.train.epochs, config.train.seed, config.train.lr = args.epochs, args.seed, lr
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
        run_dir = out / name.replace(", ", "-").replace(" ", "")
        train(config_for(args, *setting), run_dir, overwrite=True, progress=False)
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
