"""``pyro-vae``: train, compare, evaluate and sample from the command line.

The CLI only parses arguments into a :class:`~pyro_vae.config.Config` and calls
the library. Any :class:`~pyro_vae.errors.PyroVAEError` (and any usage error)
is printed as one line on stderr with exit code 2, never a traceback; a run
whose loss or gradients became NaN or infinite exits with code 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import __version__
from . import config as config_lib
from .data import datasets
from .divergence import TrainingDiverged
from .elbos import estimators
from .errors import PyroVAEError
from .guides import guides
from .likelihoods import likelihoods
from .nets import architectures
from .priors import priors

PROG = "pyro-vae"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 400,200, got {text!r}") from None
    return sizes


# flag -> (config section, key)
TRAIN_FLAGS = {
    "dataset": ("data", "dataset"),
    "data_dir": ("data", "data_dir"),
    "binarize": ("data", "binarize"),
    "model": ("model", "kind"),
    "arch": ("model", "arch"),
    "hidden": ("model", "hidden"),
    "latent_dim": ("model", "latent_dim"),
    "prior": ("model", "prior"),
    "likelihood": ("model", "likelihood"),
    "guide": ("model", "guide"),
    "plugin": ("model", "plugins"),
    "elbo": ("inference", "elbo"),
    "particles": ("inference", "num_particles"),
    "iw_samples": ("inference", "iw_samples"),
    "epochs": ("train", "epochs"),
    "seconds": ("train", "seconds"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "checkpoint_every": ("train", "checkpoint_every"),
    "clip_grad": ("train", "clip_grad"),
    "validate": ("train", "validate"),
    "labeled": ("semi", "labeled"),
    "aux_weight": ("semi", "aux_weight"),
    "validation": ("semi", "validation"),
    "m1_run": ("semi", "m1_run"),
}


def _add_config_flags(p: argparse.ArgumentParser, elbo_help: str) -> None:
    """The flags that set config fields, shared by train and compare."""
    p.add_argument("config", nargs="?", help="a TOML config (e.g. a run's config.toml)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"{datasets.choices()} (default: digits)")
    g.add_argument("--data-dir", help="folder with the data (default: $PYRO_VAE_DATA or cache)")
    g.add_argument("--binarize", help="dynamic (default), static or none")
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="vae (default); m2 or m1m2: semi-supervised (Kingma et al. 2014), see below",
    )
    g.add_argument("--arch", help=f"{architectures.choices()} (default: mlp)")
    g.add_argument("--hidden", type=_int_list, help="hidden sizes, e.g. 400 or 400,200")
    g.add_argument("--latent-dim", type=int, help="size of z (default: 50)")
    g.add_argument("--prior", help=f"{priors.choices()} (default: normal)")
    g.add_argument("--likelihood", help=f"{likelihoods.choices()} (default: bernoulli)")
    g.add_argument("--guide", help=f"{guides.choices()} (default: normal)")
    g.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help="import a module or .py file that registers components (repeatable)",
    )
    g = p.add_argument_group("inference")
    g.add_argument("--elbo", action="append" if "repeat" in elbo_help else None, help=elbo_help)
    g.add_argument("--particles", type=int, help="particles per ELBO estimate (default: 1)")
    g.add_argument("--iw-samples", type=int, help="K for the final log p(x) (default: 100)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help="passes over the training set (default: 10)")
    g.add_argument("--seconds", type=float, help="stop after this much training time (s)")
    g.add_argument("--batch-size", type=int, help="images per SVI step (default: 128)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default: 1e-3)")
    g.add_argument("--seed", type=int, help="random seed (default: 0)")
    g.add_argument("--device", help="cpu (default), cuda, cuda:N or auto")
    g.add_argument("--checkpoint-every", type=int, help="epochs between checkpoints (default: 1)")
    g.add_argument("--clip-grad", type=float, help="clip the gradient norm at this value")
    g.add_argument(
        "--validate",
        action="store_const",
        const=True,
        help="keep Pyro's runtime checks of distributions on while training (slower)",
    )
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config field, e.g. --set model.latent_dim=20",
    )
    g = p.add_argument_group("semi-supervised (--model m2 or m1m2)")
    g.add_argument("--labeled", type=int, help="class-balanced labelled images (default: 100)")
    g.add_argument("--aux-weight", type=float, help="alpha of alpha*log q(y|x) (default: 50)")
    g.add_argument(
        "--validation", type=int, help="training images held out (default: 10000, 1/5 if fewer)"
    )
    g.add_argument("--m1-run", help="m1m2: a trained VAE run whose latent means M2 models")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a VAE and write a run directory",
        description="Train a VAE with SVI. Precedence: defaults < CONFIG.toml < flags < --set.",
    )
    _add_config_flags(p, f"{estimators.choices()} (default: trace)")
    p.add_argument("--out", help="run directory (default: runs/DATASET-TIME)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue RUN_DIR from its last checkpoint (only --epochs may change)",
    )


def _add_compare(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train one model per ELBO estimator and compare them",
        description=(
            "Train the same model with each --elbo (same data, seed and epochs, or the same "
            "--seconds of training each), then write compare.csv, compare.md and compare.png: "
            "test ELBO, log p(x), each estimator's own bound, speed and gradient SNR."
        ),
    )
    _add_config_flags(p, f"an estimator to compare (repeat): {estimators.choices()}")
    p.add_argument("--snr-repeats", type=int, default=100, help="gradient draws for SNR")
    p.add_argument("--out", required=True, help="folder for the runs and the tables")


def _add_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="test ELBO and importance-sampled log p(x) of a run (accuracy for M2)",
        description=(
            "Evaluate a trained run on its test set: ELBO and log p(x) for a VAE, test "
            "accuracy and ELBO for M2 and M1+M2. Results go to RUN_DIR/summary.json."
        ),
    )
    p.add_argument("run_dir", help="a run directory written by 'pyro-vae train'")
    p.add_argument("--iw-samples", type=int, default=None, help="K per image (default: config)")
    p.add_argument("--data-dir", help="folder with the data (default: as trained)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")


def _add_sample(subparsers) -> None:
    p = subparsers.add_parser(
        "sample",
        help="draw images from a trained run's model",
        description=(
            "Decode z ~ p(z) and save the means of p(x|z) as an image grid; for M2 and "
            "M1+M2, a row per class (y) with the same styles z down each column."
        ),
    )
    p.add_argument("run_dir", help="a run directory written by 'pyro-vae train'")
    p.add_argument("-n", type=int, default=100, help="how many images (default: 100)")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/samples.png)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Variational autoencoders as Pyro programs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(subparsers)
    _add_compare(subparsers)
    _add_evaluate(subparsers)
    _add_sample(subparsers)
    return parser


def train_config(args: argparse.Namespace) -> config_lib.Config:
    """defaults < CONFIG.toml < flags < --set, validated."""
    config = config_lib.load(args.config) if args.config else config_lib.Config()
    tree: dict[str, dict] = {}
    for flag, (section, key) in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None and not (flag == "elbo" and isinstance(value, list)):
            tree.setdefault(section, {})[key] = value
    config = config_lib.from_dict(tree, config)
    config_lib.resolve_paths(config, Path.cwd())
    return config_lib.validate(config_lib.apply_overrides(config, args.set))


def cmd_train(args: argparse.Namespace) -> None:
    from .train import resume, train

    if args.resume:
        changed = [f"--{f.replace('_', '-')}" for f in TRAIN_FLAGS if f != "epochs"]
        changed = [f for f in changed if getattr(args, f[2:].replace("-", "_")) is not None]
        changed += ["CONFIG"] * bool(args.config) + ["--set"] * bool(args.set)
        changed += ["--out"] * bool(args.out) + ["--overwrite"] * args.overwrite
        if changed:
            raise PyroVAEError(
                f"--resume continues a run as it was configured; drop {', '.join(changed)} "
                f"(only --epochs may change)"
            )
        resume(args.resume, epochs=args.epochs, progress=not args.quiet)
        return
    train(train_config(args), args.out, overwrite=args.overwrite, progress=not args.quiet)


def cmd_compare(args: argparse.Namespace) -> None:
    from .compare import compare

    config = train_config(args)
    if args.seconds is not None and args.epochs is None:
        config.train.epochs = 1_000_000  # the time budget ends each run
    compare(
        config,
        args.elbo or [],
        args.out,
        snr_repeats=args.snr_repeats,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print((Path(args.out) / "compare.md").read_text(), end="")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.iw_samples, args.data_dir, args.device)
    print(json.dumps(result, indent=2))


def cmd_sample(args: argparse.Namespace) -> None:
    import pyro

    from .plots import image_grid
    from .runs import load_run

    if args.n < 1:
        raise PyroVAEError(f"-n must be >= 1, got {args.n}")
    vae = load_run(args.run_dir)
    pyro.set_rng_seed(args.seed)
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples.png"
    if not out.parent.is_dir():
        raise PyroVAEError(f"folder {out.parent} does not exist")
    image_grid(vae.generate(args.n), vae.image_shape, out, ncols=getattr(vae, "num_classes", 10))
    print(out)


COMMANDS = {
    "train": cmd_train,
    "compare": cmd_compare,
    "evaluate": cmd_evaluate,
    "sample": cmd_sample,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except TrainingDiverged as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 3
    except PyroVAEError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `pyro-vae evaluate R | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
