"""Semi-supervised MNIST: M2 with 100, 600, 1000 and 3000 labels; M1+M2 and ADGM with 100.

Each row trains through the public ``train`` API (the same code as ``pyro-vae
train --model m2``): 784-500-50 MLPs, Bernoulli likelihood, Trace_ELBO with y
enumerated, 10,000 training images held out for validation. M1 is the default
VAE (784-400-50, a VampPrior with 500 pseudo-inputs unless --m1-prior says otherwise)
trained on the 60,000 training images without labels, with the row's seed; M1+M2
models draws of its posterior (or its means) with a Gaussian likelihood. ADGM
(``--model adgm``) is M2 with Maaløe et al.'s auxiliary variable, same sizes.
Prints a Markdown table (for docs/RESULTS.md) with seed, epochs and wall time per
row, and writes JSON.

    python benchmarks/semi_supervised.py --data-dir ../shared/data --seed S

The defaults are the settings of docs/RESULTS.md's rows: 50 epochs, M1 trained 30.

Every row takes the same ``--labelled-schedule`` and ``--aux-weight``, and its model's own
learning rate (M2's 3e-3; M1+M2's and the ADGM's 1e-3); M1+M2 trains on draws of M1's
posterior (``--m1-features mean``: on its means).
"""

import argparse
import json
import time
from pathlib import Path

from _common import default_data_dir, run_main

from pyro_vae import Config, train
from pyro_vae.training.runs import read_metrics

LABELS = (100, 600, 1000, 3000)
PYRO_TUTORIAL = {100: 0.9319, 600: 0.9437, 1000: 0.9487, 3000: 0.9582}
"""Pyro's SS-VAE tutorial, enumeration + auxiliary loss (test accuracy)."""
KINGMA_ERROR = {  # Kingma et al. 2014, Table 1: test error (%) of M2 and of M1+M2
    100: (11.97, 3.33),
    600: (4.94, 2.59),
    1000: (3.60, 2.40),
    3000: (3.92, 2.18),
}


def m2_config(args, labels: int, kind: str = "m2") -> Config:
    config = Config()
    config.data.dataset, config.data.data_dir = args.dataset, args.data_dir
    config.model.kind, config.model.hidden = kind, [args.hidden]
    config.model.latent_dim = args.latent_dim
    config.semi.labeled = labels
    config.semi.schedule, config.semi.aux_weight = args.labelled_schedule, args.aux_weight
    config.train.epochs, config.train.seed = args.epochs, args.seed
    config.train.batch_size = args.batch_size
    return config


def run(config: Config, run_dir: Path) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = train(config, run_dir, overwrite=True, progress=False)
    seconds = [m["seconds"] for m in read_metrics(run_dir)]
    summary["seconds_per_epoch"] = sum(seconds) / len(seconds)
    return summary, time.perf_counter() - start


def row(name: str, labels: int, summary: dict, seconds: float, args) -> dict:
    return {
        "model": name,
        "labels": labels,
        "seed": args.seed,
        "epochs": summary["epochs"],
        "test_accuracy": summary["test_accuracy"],
        "test_accuracy_at_best_validation": summary.get("test_accuracy_at_best_validation"),
        "best_validation_epoch": summary.get("best_validation_epoch"),
        "pyro_tutorial": PYRO_TUTORIAL[labels] if name == "M2" else None,
        "kingma_2014": 1 - KINGMA_ERROR[labels][name == "M1+M2"] / 100 if name != "ADGM" else None,
        "wall_seconds": seconds,
        "seconds_per_epoch": summary["seconds_per_epoch"],
        "style_nats": summary.get("style_nats"),
        "class_from_y": summary.get("class_from_y"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--m1-epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", default=",".join(map(str, LABELS)))
    parser.add_argument("--no-m1m2", action="store_true", help="no M1+M2 row")
    parser.add_argument("--no-adgm", action="store_true", help="no ADGM row")
    parser.add_argument(
        "--m1-prior", default="vamp:500", help="M1's prior (a VampPrior M1 helps M1+M2)"
    )
    parser.add_argument(
        "--m1-features", default="sample", help="M1+M2 trains on draws of M1 or its means (mean)"
    )
    semi = Config().semi
    parser.add_argument("--labelled-schedule", default=semi.schedule, help="of every row")
    parser.add_argument("--aux-weight", type=float, default=semi.aux_weight, help="of every row")
    parser.add_argument("--dataset", default="mnist", help="digits: a smoke run of the script")
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--out", default="runs/semi_supervised")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for labels in map(int, args.labels.split(",")):
        summary, seconds = run(m2_config(args, labels), out / f"m2-{labels}")
        results.append(row("M2", labels, summary, seconds, args))

    if not args.no_m1m2:
        m1 = Config()
        m1.data.dataset, m1.data.data_dir = args.dataset, args.data_dir
        m1.train.epochs, m1.train.seed = args.m1_epochs, args.seed
        m1.inference.iw_samples = 1
        m1.model.prior = args.m1_prior
        _, m1_seconds = run(m1, out / "m1")
        config = m2_config(args, 100, "m1m2")
        config.model.likelihood, config.semi.m1_run = "gaussian", str(out / "m1")
        config.semi.m1_features = args.m1_features
        summary, seconds = run(config, out / "m1m2-100")
        m1m2 = row("M1+M2", 100, summary, seconds, args)
        results.append({**m1m2, "m1_wall_seconds": m1_seconds})

    if not args.no_adgm:
        summary, seconds = run(m2_config(args, 100, "adgm"), out / "adgm-100")
        results.append(row("ADGM", 100, summary, seconds, args))

    lines = [
        "| model | labels | seed | epochs | test accuracy (last) | at best validation epoch "
        "| style in z (nats) | class from y | Pyro tutorial | Kingma et al. 2014 | s/epoch "
        "| wall time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        best = r["test_accuracy_at_best_validation"]
        pyro_ref = "—" if r["pyro_tutorial"] is None else f"{r['pyro_tutorial']:.4f}"
        wall = f"{r['wall_seconds']:.0f} s"
        if "m1_wall_seconds" in r:
            wall += f" (+ M1 {r['m1_wall_seconds']:.0f} s)"
        lines.append(
            f"| {r['model']} | {r['labels']} | {r['seed']} | {r['epochs']} "
            f"| {r['test_accuracy']:.4f} | {best:.4f} (epoch {r['best_validation_epoch']}) "
            f"| {r['style_nats']:.2f} | {r['class_from_y']:.3f} | {pyro_ref} "
            f"| {'—' if r['kingma_2014'] is None else format(r['kingma_2014'], '.4f')} "
            f"| {r['seconds_per_epoch']:.1f} | {wall} |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "semi_supervised.md").write_text(table + "\n")
    (out / "semi_supervised.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
