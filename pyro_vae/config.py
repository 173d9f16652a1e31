"""The configuration tree: defaults, TOML, flag and ``--set`` overrides, validation.

One dataclass per section (``data``, ``model``, ``inference``, ``train``). A run
is fully described by a :class:`Config`; it is validated before any work starts
and written resolved into every run directory, so ``pyro-vae train
RUN/config.toml`` repeats the run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import PyroVAEError
from .registry import import_plugins

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

BINARIZATIONS = ("dynamic", "static", "none")
COMPILE_MODES = ("none", "trace", "inductor", "cudagraph", "inductor-cudagraph")
DENORMAL_MODES = ("flush", "keep")
LABELLED_SCHEDULES = ("every-step", "proportional", "interleave")
AUX_SCALINGS = ("absolute", "data")
M1_FEATURES = ("mean", "sample")
SNR_REPEATS = 100
"""Gradient draws per estimator for the gradient SNR of ``pyro-vae compare``."""


def option(default: Any, help: str, flag: str | None = None, shown: str | None = None) -> Any:
    """A config field with its command-line flag: the one place its default and help live.

    ``help`` may name a registry in braces (``{prior}``), filled with its choices when
    help is shown; ``flag`` is the flag's name when not the field's (``--particles``);
    ``shown`` replaces the default in the help (None: the default itself, unless it is
    None, empty or 0, which show nothing).
    """
    metadata = {"help": help, "flag": flag, "shown": shown}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    dataset: str = option("digits", "{dataset}")
    data_dir: str | None = option(
        None, "folder with the data", shown="$PYRO_VAE_DATA or ~/.cache/pyro-vae"
    )
    binarize: str = option(
        "dynamic", "dynamic (train resampled per batch, test fixed), static or none"
    )
    plugins: list[str] = option(
        [], "import a module or .py file that registers datasets (repeatable)", "data-plugin"
    )
    holdout: int = option(
        0,
        "training images held out (the same ones every run) for a validation ELBO each "
        "epoch, which --lr-schedule plateau watches; M2 holds out its own (--validation)",
        shown="none",
    )


@dataclass
class ModelConfig:
    kind: str = option(
        "vae", "{model}; m2 and m1m2 are semi-supervised (Kingma et al. 2014)", "model"
    )
    arch: str = option("mlp", "{architecture}")
    hidden: list[int] = option([400], "hidden sizes, e.g. 400 or 400,200")
    latent_dim: int = option(50, "size of z")
    prior: str = option("normal", "{prior}")
    likelihood: str = option("bernoulli", "{likelihood}")
    guide: str = option("normal", "{guide}")
    plugins: list[str] = option(
        [], "import a module or .py file that registers components (repeatable)", "plugin"
    )


@dataclass
class InferenceConfig:
    elbo: str = option("trace", "{estimator}")
    num_particles: int = option(1, "particles per ELBO estimate", "particles")
    iw_samples: int = option(100, "K for the final importance-sampled log p(x)")
    kl_weight: float = option(
        1.0, "beta: the weight of the KL term in training (beta-VAE); held-out numbers use 1"
    )
    kl_warmup: int = option(
        0, "epochs over which the KL weight rises linearly from 0, step by step", shown="none"
    )
    free_bits: float = option(
        0.0,
        "nats per latent dimension whose KL is not penalized (Kingma et al. 2016)",
        shown="none",
    )


@dataclass
class TrainConfig:
    epochs: int = option(10, "passes over the training set")
    batch_size: int = option(128, "images per SVI step")
    lr: float | None = option(
        None, "Adam learning rate (unset: the model's own)", shown="0.001; m2, m1m2, adgm: 0.003"
    )
    beta1: float = option(0.9, "Adam's decay rate of the gradient's running mean")
    beta2: float = option(0.999, "Adam's decay rate of the squared gradient's running mean")
    seed: int = option(0, "random seed", shown="0")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto")
    seconds: float = option(0.0, "stop after this much training time (s)", shown="no limit")
    checkpoint_every: int = option(1, "epochs between checkpoints")
    weight_decay: float = option(
        0.0, "Adam's L2 penalty: weight_decay * parameter added to each gradient", shown="none"
    )
    lr_schedule: str = option("none", "{schedule}")
    clip_grad: float = option(
        0.0, "clip the global norm of all gradients together at this value", shown="no clipping"
    )
    clip_grad_per_param: float = option(
        0.0,
        "clip each parameter's gradient norm on its own at this value (Pyro's clip_args clip_norm)",
        shown="no clipping",
    )
    validate: bool = option(
        False, "keep Pyro's runtime checks of distributions on while training (slower)"
    )
    tensorboard: str | None = option(
        None,
        "also log each epoch's numbers and pictures to this TensorBoard folder (needs "
        "pip install 'pyro-vae[tensorboard]')",
    )
    denormals: str = option(
        "flush",
        "on the CPU while training: flush (floats below 1.2e-38 become zero, as JAX's XLA "
        "does; such values run many times slower, and long runs make them) or keep",
    )
    compile: str = option(
        "none",
        "trace the step once per batch shape into one graph and replay it: trace (as "
        "recorded), inductor (compiled, about 20 s per batch shape on a CPU), cudagraph "
        "(captured in a CUDA graph; needs a GPU) or inductor-cudagraph (compiled, then "
        "captured); none: Pyro's eager step",
    )


@dataclass
class SemiConfig:
    """The section of the semi-supervised kinds (m2, m1m2); ignored by the others."""

    labeled: int = option(100, "class-balanced labelled images, drawn with the seed")
    aux_weight: float = option(5000.0, "alpha of the auxiliary alpha*log q(y|x) term")
    aux_scaling: str = option(
        "absolute",
        "absolute: alpha weighs each labelled image; data: alpha*N weighs their mean "
        "(Kingma et al.'s alpha = 0.1 N, N the training images)",
    )
    schedule: str = option(
        "proportional",
        "how labelled images join: every-step (a labelled batch with each step, unscaled), "
        "proportional (with each step, scaled to the objective as written) or interleave "
        "(steps of their own, each labelled image once an epoch, as Pyro's example)",
        "labelled-schedule",
    )
    validation: int | None = option(
        None, "training images held out", shown="10000, or 1/5 if fewer"
    )
    classifier: str = option(
        "mlp",
        "m2: the network of q(y|x), an architecture by name: mlp (the hidden sizes) or conv "
        "(two stride-2 convolutions before them)",
    )
    m1_run: str | None = option(None, "m1m2: a trained VAE run whose latent code M2 models")
    m1_features: str = option(
        "sample",
        "m1m2: what M2 trains on: sample (a fresh z1 ~ q(z1|x) at every step, as Kingma "
        "et al.) or mean (of M1's q(z1|x)); held-out numbers always use the mean",
    )


@dataclass
class CVAEConfig:
    """The section of the conditional VAE's kinds (cvae, cvae-baseline); ignored by others."""

    quadrants: int = option(
        1, "quadrants shown: 1 (bottom left, as Pyro's example), 2 (left half), 3 (all but one)"
    )
    baseline_run: str | None = option(
        None, "cvae: a trained cvae-baseline run whose guess the prior p(z|x) also reads"
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    cvae: CVAEConfig = field(default_factory=CVAEConfig)


OPTIONAL_SECTIONS = {"semi": SemiConfig, "cvae": CVAEConfig}
"""Sections that only some model kinds read: left out of a config file while at defaults."""


def _sections(config: Config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


def _field_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit


def parse_int_list(text: str) -> list[int]:
    """``"400,200"`` (or ``"[400, 200]"``) as ``[400, 200]``; an empty entry is an error."""
    parts = [t.strip() for t in text.strip().strip("[]").split(",")]
    if parts == [""]:
        return []
    if "" in parts:
        raise ValueError(f"an empty entry in {text!r}")
    return [int(t) for t in parts]


def _check_int(where: str, value: int) -> int:
    if not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise PyroVAEError(f"{where} is too large: {str(value)[:20]}... (at most {INT64_MAX})")
    return value


def _coerce(where: str, kind: Any, value: Any) -> Any:
    """Check a TOML value against a field type (ints are accepted for floats)."""
    optional = type(None) in typing.get_args(kind)
    if optional:
        if value is None:
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, list) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            return [_check_int(where, v) for v in value] if item is int else list(value)
        what = "whole numbers" if item is int else "strings"
        raise PyroVAEError(f"{where} must be a list of {what}, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise PyroVAEError(f"{where} is too large: {str(value)[:20]}...") from None
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise PyroVAEError(f"{where} must be of type {kind.__name__}, got {value!r}")
    return _check_int(where, value) if kind is int else value


def from_dict(tree: dict[str, Any], base: Config | None = None) -> Config:
    """A config from a nested dict (as read from TOML); unknown keys are errors."""
    config = dataclasses.replace(base) if base else Config()
    sections = _sections(config)
    for name, values in tree.items():
        if name not in sections:
            raise PyroVAEError(
                f"unknown config section [{name}]; valid sections: {', '.join(sections)}"
            )
        if not isinstance(values, dict):
            raise PyroVAEError(f"config [{name}] must be a table of keys")
        section = dataclasses.replace(sections[name])
        types = _field_types(section)
        for key, value in values.items():
            if key not in types:
                raise PyroVAEError(
                    f"unknown config key {name}.{key}; valid keys: {', '.join(types)}"
                )
            setattr(section, key, _coerce(f"{name}.{key}", types[key], value))
        setattr(config, name, section)
    return config


def saved_run_config(tree: dict[str, Any]) -> Config:
    """A run's saved config (its config file's or its checkpoint's tree), read as the run
    trained: an M1+M2 run saved before ``semi.m1_features`` existed trained on M1's means,
    not on the draws that are the default now."""
    semi = tree.get("semi", {})
    if tree.get("model", {}).get("kind") == "m1m2" and "m1_features" not in semi:
        tree = {**tree, "semi": {**semi, "m1_features": "mean"}}
    return from_dict(tree)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load(path: str | Path, saved_run: bool = False) -> Config:
    """Read a TOML config file (``saved_run``: a run's own, see ``saved_run_config``)."""
    try:
        with open(path, "rb") as f:
            tree = tomllib.load(f)
    except FileNotFoundError:
        raise PyroVAEError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PyroVAEError(f"cannot read config file {path}: {e}") from None
    config = saved_run_config(tree) if saved_run else from_dict(tree)
    resolve_paths(config, Path(path).parent)
    return config


def resolve_paths(config: Config, base: Path) -> Config:
    """Make the config's relative paths (plugin files, the M1 run) absolute, from ``base``."""
    config.model.plugins = resolve_plugin_paths(config.model.plugins, base)
    config.data.plugins = resolve_plugin_paths(config.data.plugins, base)
    if config.semi.m1_run:
        config.semi.m1_run = str((base / config.semi.m1_run).resolve())
    if config.cvae.baseline_run:
        config.cvae.baseline_run = str((base / config.cvae.baseline_run).resolve())
    if config.train.tensorboard:
        config.train.tensorboard = str((base / config.train.tensorboard).resolve())
    return config


def resolve_plugin_paths(plugins: list[str], base: Path) -> list[str]:
    """``.py`` plugins as absolute paths (relative ones taken from ``base``); modules as given."""
    return [str((base / p).resolve()) if p.endswith(".py") else p for p in plugins]


def dumps(config: Config) -> str:
    """The config as TOML text, by ``tomli-w``.

    Keys that are None are left out (TOML has no null; they load back as None), and so
    are the sections a kind does not read (``[semi]`` of a VAE) while they hold the
    defaults.
    """
    tree = {
        name: {k: v for k, v in values.items() if v is not None}
        for name, values in to_dict(config).items()
    }
    for name, section in OPTIONAL_SECTIONS.items():
        if getattr(config, name) == section() and _section_of(config.model.kind) != name:
            del tree[name]
    return tomli_w.dumps(tree)


def _section_of(kind: str) -> str | None:
    """The config section a model kind reads besides ``[model]`` (None if none or unknown)."""
    from .models.kinds import model_kinds

    return model_kinds[kind].section if kind in model_kinds else None


def _parse_text(where: str, kind: Any, text: str) -> Any:
    """Convert a ``--set`` value from text to the field's type."""
    optional = type(None) in typing.get_args(kind)
    if optional:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            if item is int:
                return parse_int_list(text)
            return [t.strip() for t in text.strip("[]").split(",") if t.strip()]
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is bool:
            return {"true": True, "false": False}[text.lower()]
    except (ValueError, KeyError):
        type_name = {int: "int", float: "float", bool: "true/false"}.get(kind, "list of ints")
        raise PyroVAEError(f"{where} must be of type {type_name}, got {text!r}") from None
    return text


def apply_overrides(config: Config, assignments: list[str]) -> Config:
    """Apply ``section.key=value`` overrides (the CLI's ``--set``)."""
    tree: dict[str, dict[str, Any]] = {}
    sections = _sections(config)
    for item in assignments:
        path, sep, text = item.partition("=")
        name, dot, key = path.strip().partition(".")
        if not sep or not dot:
            raise PyroVAEError(f"--set needs section.key=value, got {item!r}")
        if name not in sections:
            raise PyroVAEError(
                f"unknown config section {name!r} in --set {item!r}; "
                f"valid sections: {', '.join(sections)}"
            )
        types = _field_types(sections[name])
        if key not in types:
            raise PyroVAEError(f"unknown config key {name}.{key}; valid keys: {', '.join(types)}")
        tree.setdefault(name, {})[key] = _parse_text(path, types[key], text.strip())
    return from_dict(tree, config)


def validate(config: Config) -> Config:
    """Refuse out-of-range values and bad specs before any work starts."""
    from .components.guides import guides
    from .components.likelihoods import likelihoods
    from .components.nets import architectures
    from .components.priors import priors
    from .data import datasets
    from .models import kinds

    d, m, s = config.data, config.model, config.semi
    import_plugins(d.plugins)
    import_plugins(m.plugins)
    kinds.model_kinds.parse(m.kind)
    if d.dataset not in datasets:
        raise PyroVAEError(f"unknown dataset {d.dataset!r}; choose from: {datasets.choices()}")
    _check(
        (m.latent_dim >= 1, "model.latent_dim must be >= 1"),
        (len(m.hidden) >= 1 and min(m.hidden) >= 1, "model.hidden must be sizes >= 1"),
        (s.labeled >= 1, "semi.labeled must be >= 1"),
        (math.isfinite(s.aux_weight) and s.aux_weight >= 0, "semi.aux_weight must be >= 0"),
        (s.validation is None or s.validation >= 0, "semi.validation must be >= 0"),
        (
            s.aux_scaling in AUX_SCALINGS,
            f"semi.aux_scaling must be one of {', '.join(AUX_SCALINGS)}",
        ),
        (
            s.schedule in LABELLED_SCHEDULES,
            f"semi.schedule must be one of {', '.join(LABELLED_SCHEDULES)}",
        ),
        (
            s.m1_features in M1_FEATURES,
            f"semi.m1_features must be one of {', '.join(M1_FEATURES)}",
        ),
    )
    validate_training(config)
    for registry, spec in (
        (architectures, m.arch),
        (architectures, s.classifier),
        (priors, m.prior),
        (likelihoods, m.likelihood),
        (guides, m.guide),
    ):
        registry.parse(spec)
    kinds.validate(config)
    return config


def validate_training(config: Config) -> Config:
    """Refuse out-of-range training settings (the ``train`` and ``inference`` sections and
    the binarization): what ``pyro_vae.fit`` needs of a config, whatever the model."""
    from .inference.elbos import estimators
    from .inference.schedules import schedules

    d, i, t = config.data, config.inference, config.train
    schedules.parse(t.lr_schedule)
    if d.binarize not in BINARIZATIONS:
        raise PyroVAEError(
            f"unknown binarization {d.binarize!r}; choose from: {', '.join(BINARIZATIONS)}"
        )
    _check(
        (i.num_particles >= 1, "inference.num_particles must be >= 1"),
        (i.iw_samples >= 1, "inference.iw_samples must be >= 1"),
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.lr is None or math.isfinite(t.lr) and t.lr > 0, "train.lr must be a finite number > 0"),
        (0 <= t.beta1 < 1, "train.beta1 must be in [0, 1)"),
        (0 <= t.beta2 < 1, "train.beta2 must be in [0, 1)"),
        (0 <= t.seed <= SEED_MAX, f"train.seed must be in 0 .. {SEED_MAX}"),
        (math.isfinite(t.seconds) and t.seconds >= 0, "train.seconds must be >= 0"),
        (t.checkpoint_every >= 1, "train.checkpoint_every must be >= 1"),
        (math.isfinite(t.clip_grad) and t.clip_grad >= 0, "train.clip_grad must be >= 0"),
        (
            math.isfinite(t.clip_grad_per_param) and t.clip_grad_per_param >= 0,
            "train.clip_grad_per_param must be >= 0",
        ),
        (
            math.isfinite(t.weight_decay) and t.weight_decay >= 0,
            "train.weight_decay must be >= 0",
        ),
        (d.holdout >= 0, "data.holdout must be >= 0"),
        (t.compile in COMPILE_MODES, f"train.compile must be one of {', '.join(COMPILE_MODES)}"),
        (
            t.denormals in DENORMAL_MODES,
            f"train.denormals must be one of {', '.join(DENORMAL_MODES)}",
        ),
        (math.isfinite(i.kl_weight) and i.kl_weight >= 0, "inference.kl_weight must be >= 0"),
        (i.kl_warmup >= 0, "inference.kl_warmup must be >= 0"),
        (math.isfinite(i.free_bits) and i.free_bits >= 0, "inference.free_bits must be >= 0"),
    )
    if t.device not in ("cpu", "cuda", "auto") and not t.device.startswith("cuda:"):
        raise PyroVAEError(f"unknown device {t.device!r}; choose from: cpu, cuda, cuda:N, auto")
    entry = estimators.parse(i.elbo)[0]
    if i.free_bits and not entry.free_bits:
        usable = ", ".join(e.name for e in estimators.entries() if e.free_bits)
        raise PyroVAEError(
            f"--free-bits needs an estimator that differentiates its objective through the "
            f"latent densities, and {i.elbo!r} does not; choose from: {usable}"
        )
    if i.kl_warmup and entry.jit:
        raise PyroVAEError(
            f"--kl-warmup changes the KL weight every step, and {i.elbo!r} is compiled by "
            f"PyTorch's JIT with the weight of its first step; use "
            f"{entry.bound_as or 'trace'} (or --compile trace)"
        )
    return config


def _check(*checks: tuple[bool, str]) -> None:
    for ok, message in checks:
        if not ok:
            raise PyroVAEError(message)
