"""The KL term's knobs on MNIST, and the conditional VAE against its baseline (Issue 17).

Rows, run one after another with the same seed and epochs: the default VAE, KL
warm-up over 10 epochs, beta = 4; each with its test ELBO and the ELBO's two terms,
log p(x) with its standard error, and the active units (Burda et al. 2016). Then
Pyro's CVAE task (1 quadrant shown, intensities as in Pyro's example): the baseline
network, and the CVAE whose prior reads the baseline's guess, with the test ELBO
and log p(y|x) of the missing pixels. Prints Markdown tables (for docs/RESULTS.md)
and writes them with the raw JSON.

    python benchmarks/research_knobs.py --data-dir ../shared/data --epochs 20 --cvae-epochs 10
"""

import argparse
import json
import time
from pathlib import Path

from _common import default_data_dir, run_main

from pyro_vae import Config, evaluate_run, latent, train

KL_ROWS = [
    ("ELBO (weight 1)", {}),
    ("--kl-warmup 10", {"kl_warmup": 10}),
    ("--kl-weight 4", {"kl_weight": 4.0}),
]


def _config(args, **model) -> Config:
    config = Config()
    config.data.dataset = "mnist"
    config.data.data_dir = args.data_dir
    config.train.seed = args.seed
    for key, value in model.items():
        setattr(config.model, key, value)
    return config


def kl_rows(args, out: Path) -> list[dict]:
    rows = []
    for name, inference in KL_ROWS:
        config = _config(args)
        config.train.epochs = args.epochs
        config.inference.iw_samples = args.iw_samples
        for key, value in inference.items():
            setattr(config.inference, key, value)
        run_dir = out / name.strip("-").replace(" ", "-").replace("(", "").replace(")", "")
        start = time.perf_counter()
        summary = train(config, run_dir, overwrite=True, progress=False)
        wall = time.perf_counter() - start
        units = latent.report_run(run_dir)
        flags = " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in inference.items())
        rows.append(
            {
                "setting": name,
                "test_elbo": summary["test_elbo"],
                "test_recon": summary["test_recon"],
                "test_kl": summary["test_kl"],
                "log_px": summary["log_px"],
                "log_px_se": summary["log_px_se"],
                "iw_samples": summary["iw_samples"],
                "active_units": units["active_units"],
                "latent_dim": units["latent_dim"],
                "seconds_per_epoch": sum(m["seconds"] for m in _metrics(run_dir)) / args.epochs,
                "wall_seconds": wall,
                "command": f"pyro-vae train --dataset mnist --epochs {args.epochs} --seed "
                f"{args.seed} {flags} --out R".replace("  ", " ")
                + " && pyro-vae latent R",
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _metrics(run_dir: Path) -> list[dict]:
    from pyro_vae.training.runs import read_metrics

    return read_metrics(run_dir)


def cvae_rows(args, out: Path) -> list[dict]:
    rows = []
    runs = [
        ("NN baseline", "cvae-baseline", {}),
        ("CVAE, prior on the baseline's guess", "cvae", {"baseline_run": str(out / "baseline")}),
    ]
    for name, kind, cvae in runs:
        config = _config(args, kind=kind, hidden=[500, 500], latent_dim=200)
        config.data.binarize = "none"  # Pyro's example: intensities as Bernoulli targets
        config.train.epochs = args.cvae_epochs
        config.inference.iw_samples = args.iw_samples
        for key, value in cvae.items():
            setattr(config.cvae, key, value)
        run_dir = out / ("baseline" if kind == "cvae-baseline" else "cvae")
        start = time.perf_counter()
        summary = train(config, run_dir, overwrite=True, progress=False)
        wall = time.perf_counter() - start
        evaluated = evaluate_run(run_dir, args.iw_samples, args.data_dir)
        rows.append(
            {
                "model": name,
                "test_elbo": evaluated["test_elbo"],
                "log_py_given_x": evaluated["log_px"],
                "se": evaluated["log_px_se"],
                "iw_samples": args.iw_samples,
                "seconds_per_epoch": sum(m["seconds"] for m in _metrics(run_dir))
                / args.cvae_epochs,
                "wall_seconds": wall,
                "epochs": summary["epochs"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=default_data_dir())
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--cvae-epochs", type=int, default=10)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/research_knobs")
    parser.add_argument("--only", choices=["kl", "cvae"], default=None)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables, results = [], {}
    if args.only in (None, "kl"):
        results["kl"] = rows = kl_rows(args, out)
        k = args.iw_samples
        lines = [
            f"| setting | test ELBO | reconstruction | KL | log p(x), K={k} | active units "
            f"| s/epoch |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['setting']} | {r['test_elbo']:.2f} | {r['test_recon']:.2f} | "
            f"{r['test_kl']:.2f} | {r['log_px']:.2f} ± {r['log_px_se']:.2f} | "
            f"{r['active_units']} of {r['latent_dim']} | {r['seconds_per_epoch']:.1f} |"
            for r in rows
        ]
        tables.append("\n".join(lines))
    if args.only in (None, "cvae"):
        results["cvae"] = rows = cvae_rows(args, out)
        k = args.iw_samples
        lines = [
            f"| model (1 quadrant shown) | epochs | test ELBO of y | log p(y\\|x), K={k} "
            f"| s/epoch |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['epochs']} | {r['test_elbo']:.2f} | "
            f"{r['log_py_given_x']:.2f} ± {r['se']:.2f} | {r['seconds_per_epoch']:.1f} |"
            for r in rows
        ]
        tables.append("\n".join(lines))
    text = "\n\n".join(tables)
    print(text)
    (out / "research_knobs.md").write_text(text + "\n")
    (out / "research_knobs.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
