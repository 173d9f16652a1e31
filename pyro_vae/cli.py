"""``pyro-vae``: train, compare, evaluate and sample from the command line.

The CLI only parses arguments into a :class:`~pyro_vae.config.Config` and calls
the library. Any :class:`~pyro_vae.errors.PyroVAEError` (and any usage error)
is printed as one line on stderr with exit code 2, never a traceback; a run
whose loss or gradients became NaN or infinite exits with code 3. PyTorch and
Pyro are imported when a command runs, not for ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path

from . import __version__
from . import config as config_lib
from .errors import PyroVAEError, TrainingDiverged

PROG = "pyro-vae"

_REGISTRIES = {
    "dataset": ("data", "datasets"),
    "model": ("models.kinds", "model_kinds"),
    "architecture": ("components.nets", "architectures"),
    "prior": ("components.priors", "priors"),
    "likelihood": ("components.likelihoods", "likelihoods"),
    "guide": ("components.guides", "guides"),
    "estimator": ("inference.elbos", "estimators"),
    "schedule": ("inference.schedules", "schedules"),
}
_PLACEHOLDER = re.compile(r"\{(" + "|".join(_REGISTRIES) + r")\}")


def _choices(kind: str) -> str:
    module, name = _REGISTRIES[kind]
    return getattr(importlib.import_module(f".{module}", __package__), name).choices()


class _Formatter(argparse.HelpFormatter):
    """Fills in ``{prior}`` and friends with the registries' choices, only when help is shown."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        return _PLACEHOLDER.sub(lambda m: _choices(m.group(1)), text) if text else text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_list(text: str) -> list[int]:
    try:
        return config_lib.parse_int_list(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 400,200, got {text!r}") from None


def _default(section: str, key: str) -> str:
    """A config field's default, as the help shows it (the config is where it is set)."""
    value = getattr(getattr(config_lib.Config(), section), key)
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


GROUPS = {
    "data": "data",
    "model": "model",
    "inference": "inference",
    "train": "training",
    "semi": "semi-supervised (--model m2 or m1m2)",
    "cvae": "conditional VAE (--model cvae or cvae-baseline)",
}


def _config_fields():
    """(section, field, its type, its flag's name) for every config field with a flag."""
    for section, cls in typing.get_type_hints(config_lib.Config).items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "help" in f.metadata:
                kind = hints[f.name]
                if type(None) in typing.get_args(kind):  # Optional[X]: X
                    (kind,) = (a for a in typing.get_args(kind) if a is not type(None))
                yield section, f, kind, f.metadata["flag"] or f.name.replace("_", "-")


TRAIN_FLAGS = {
    name.replace("-", "_"): (section, f.name) for section, f, _, name in _config_fields()
}
"""Each flag that sets a config field (its ``argparse`` dest) -> (section, key)."""


def _add_config_flags(p: argparse.ArgumentParser, elbo_help: str | None = None) -> None:
    """The flags that set config fields, generated from the config's field metadata (help
    and default live there); shared by train and compare (``elbo_help``: compare's --elbo,
    given once per estimator)."""
    p.add_argument("config", nargs="?", help="a TOML config (e.g. a run's config.toml)")
    groups = {section: p.add_argument_group(title) for section, title in GROUPS.items()}
    for section, f, kind, name in _config_fields():
        help_text, shown = f.metadata["help"], f.metadata["shown"]
        default = _default(section, f.name)
        if shown is None and default not in ("None", "none", "0", "False"):
            shown = default
        options: dict = {"help": help_text + (f" (default: {shown})" if shown else "")}
        if kind is bool:
            options.update(action="store_const", const=True)
        elif kind == list[str]:
            options.update(action="append", metavar="MODULE")
        elif kind == list[int]:
            options.update(type=_int_list)
        else:
            options.update(type=kind)
        if (section, f.name) == ("inference", "elbo") and elbo_help:
            options.update(action="append", help=elbo_help)
        groups[section].add_argument(f"--{name}", **options)
    groups["train"].add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override any config field, e.g. --set model.latent_dim=20",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.add_argument(
        "--quiet", action="store_true", help="print the final summary line only (no progress)"
    )


def _add_train(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a VAE and write a run directory",
        description="Train a VAE with SVI. Precedence: defaults < CONFIG.toml < flags < --set.",
    )
    _add_config_flags(p)
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
    _add_config_flags(p, "an estimator to compare (repeat): {estimator}")
    p.add_argument(
        "--snr-repeats",
        type=int,
        default=config_lib.SNR_REPEATS,
        help=f"gradient draws for the SNR (default: {config_lib.SNR_REPEATS})",
    )
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
    p.add_argument(
        "--iw-samples", type=int, default=None, help="K per image (default: the run's config)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the Monte Carlo draws (default: 0, as the training run's own figures)",
    )
    p.add_argument("--data-dir", help="folder with the data (default: as trained)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    _add_run_plugin_flag(p)
    p.add_argument(
        "--per-image",
        metavar="FILE.npy",
        help="write each test image's log p(x) there (float64, test-set order), for a "
        "paired comparison of two runs",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


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
    p.add_argument(
        "-n", type=int, default=100, help=f"how many images, up to {MAX_SAMPLES} (default: 100)"
    )
    p.add_argument("--out", help="PNG path (default: RUN_DIR/samples.png)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    _add_run_plugin_flag(p)


def _add_run_plugin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        metavar="MODULE",
        help="the run's plugin module or .py file, where it is now (repeatable; default: "
        "the paths the run recorded)",
    )


def _add_latent(subparsers) -> None:
    p = subparsers.add_parser(
        "latent",
        help="look at a trained VAE's latent space",
        description=(
            "Write the test set's posterior means and scales (latents.npz), a map of them "
            "coloured by label (latent_map.png: the means for a 2-D z, else PCA or --tsne), "
            "decoded straight lines between test images (interpolations.png), the decoder "
            "on the prior's quantiles for a 2-D z (manifold.png), and each dimension's "
            "activity and KL (active_units.png; Burda et al.'s active units in "
            "summary.json under 'latent')."
        ),
    )
    p.add_argument("run_dir", help="a run directory written by 'pyro-vae train'")
    p.add_argument("--out", help="folder for the files (default: RUN_DIR)")
    p.add_argument("--tsne", action="store_true", help="map by t-SNE (scikit-learn), not PCA")
    p.add_argument("--data-dir", help="folder with the data (default: as trained)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    _add_run_plugin_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Variational autoencoders as Pyro programs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(subparsers)
    _add_compare(subparsers)
    _add_evaluate(subparsers)
    _add_sample(subparsers)
    _add_latent(subparsers)
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
    from .training.train import resume, summary_line, train

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
        summary = resume(args.resume, epochs=args.epochs, progress=not args.quiet)
    else:
        config = train_config(args)
        summary = train(config, args.out, overwrite=args.overwrite, progress=not args.quiet)
    if _is_main_process():
        print(summary_line(summary))


def cmd_compare(args: argparse.Namespace) -> None:
    from .evaluation.compare import compare

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
    from .evaluation.evaluate import evaluate_run
    from .training.train import summary_line

    result = evaluate_run(
        args.run_dir,
        args.iw_samples,
        args.data_dir,
        args.device,
        seed=args.seed,
        plugins=args.plugin,
        progress=not args.quiet,
        per_image=args.per_image,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{summary_line(result)}  [seed {result['seed']}]")


MAX_SAMPLES = 10_000
"""Images in one grid of ``pyro-vae sample``: more is not a picture anyone looks at."""


def cmd_sample(args: argparse.Namespace) -> None:
    import pyro

    from .evaluation.plots import image_grid
    from .training.memory import too_large
    from .training.runs import load_run

    if not 1 <= args.n <= MAX_SAMPLES:
        raise PyroVAEError(f"-n must be between 1 and {MAX_SAMPLES}, got {args.n}")
    if args.out and not Path(args.out).parent.is_dir():
        raise PyroVAEError(f"folder {Path(args.out).parent} does not exist")
    vae = load_run(args.run_dir, plugins=args.plugin)
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples.png"
    pyro.set_rng_seed(args.seed)
    with too_large(f"-n {args.n} images of {vae.image_shape}"):
        images = vae.generate(args.n)
        classes = getattr(vae, "num_classes", None)  # M2 and kin: a row per class
        rows = -(-args.n // (classes or 10))
        image_grid(
            images,
            vae.image_shape,
            out,
            ncols=classes or 10,
            title=f"Samples from {Path(args.run_dir).name} (seed {args.seed})",
            row_labels=[str(r % classes) for r in range(rows)] if classes else None,
            ylabel="class y" if classes else "",
        )
    print(out)


def cmd_latent(args: argparse.Namespace) -> None:
    from .evaluation.latent import report_run

    numbers = report_run(
        args.run_dir,
        args.out,
        tsne=args.tsne,
        data_dir=args.data_dir,
        device=args.device,
        plugins=args.plugin,
    )
    out = args.out or args.run_dir
    print(
        f"{numbers['active_units']} of {numbers['latent_dim']} latent dimensions active "
        f"(Cov_x(E_q[z_j]) > 0.01); pictures and latents.npz in {out}"
    )


COMMANDS = {
    "train": cmd_train,
    "compare": cmd_compare,
    "evaluate": cmd_evaluate,
    "sample": cmd_sample,
    "latent": cmd_latent,
}


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def _log_handlers(quiet: bool) -> list[logging.Handler]:
    """Progress (INFO) on stdout unless quiet; warnings on stderr, always."""
    progress = logging.StreamHandler(sys.stdout)
    progress.addFilter(_Below(logging.WARNING))
    progress.setLevel(logging.WARNING if quiet else logging.INFO)
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    for handler in (progress, warnings):
        handler.setFormatter(logging.Formatter("%(message)s"))
    return [progress, warnings]


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def _is_main_process() -> bool:
    """Rank 0 under torchrun (or no torchrun): the process that reports."""
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("pyro_vae")
    handlers = _log_handlers(getattr(args, "quiet", False))
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        COMMANDS[args.command](args)
    except TrainingDiverged as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return 3
    except PyroVAEError as e:
        # one line: Pyro appends the trace's shapes to an error raised inside a program
        print(f"{PROG} {args.command}: error: {_first_line(e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        from .training.memory import describe_out_of_memory, is_out_of_memory

        if not is_out_of_memory(e):
            raise
        print(f"{PROG} {args.command}: error: {describe_out_of_memory(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `pyro-vae evaluate R | head`: the reader left early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)
    return 0
