"""Model kinds by name (``--model``, ``[model] kind``): how a config builds each, what it needs.

A kind is registered with the builder that makes its model from a config, and
its capabilities as attributes of the registry entry:

- ``section``: the config section it reads besides ``[model]`` (M2's ``[semi]``);
- ``needs_enumeration``: it sums a discrete latent out by enumeration, so it runs
  only with estimators that have an enumerating form (``enumerates``);
- ``distributed``: it can train under torchrun;
- ``validate``: its own checks of a config, run before any work starts;
- ``prepare``: what its builder needs from outside the config (M1+M2: the trained
  M1, loaded once), computed before the model is built.

Adding a kind is one function here (or in a plugin) and a ``Trainable`` model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import Config, SemiConfig
from ..errors import PyroVAEError
from ..registry import Registry, import_plugins
from .ssvae import M1M2, SSVAE
from .vae import VAE

model_kinds = Registry(
    "model", section=None, needs_enumeration=False, distributed=False, validate=None, prepare=None
)
register: Callable = model_kinds.register


def _components(config: Config) -> dict[str, Any]:
    """The ``[model]`` fields every kind of ours takes, its plugins imported."""
    m = config.model
    import_plugins(m.plugins)
    return dict(
        latent_dim=m.latent_dim, hidden=m.hidden, prior=m.prior, likelihood=m.likelihood,
        guide=m.guide,
    )  # fmt: skip


def build_vae(config: Config, image_shape: tuple[int, ...]) -> VAE:
    """The VAE a config's ``[model]`` describes, for images of ``image_shape``."""
    return VAE(image_shape, arch=config.model.arch, **_components(config))


def prepare(config: Config, image_shape: tuple[int, ...]) -> Any:
    """What the kind's builder needs from outside the config, for a new run (or None)."""
    entry, _ = model_kinds.parse(config.model.kind)
    return entry.prepare(config, tuple(image_shape)) if entry.prepare else None


def build(
    config: Config,
    image_shape: tuple[int, ...],
    num_classes: int = 10,
    checkpoint: dict | None = None,
    prepared: Any = None,
) -> Any:
    """The model ``config`` describes; from a run's ``checkpoint`` where it has one, else
    with what :func:`prepare` returned (computed here if not given)."""
    entry, _ = model_kinds.parse(config.model.kind)
    if checkpoint is None and prepared is None:
        prepared = prepare(config, image_shape)
    return entry.factory(config, tuple(image_shape), num_classes, checkpoint, prepared)


def validate(config: Config) -> None:
    """The kind's own checks: estimators it cannot run with, its section's values."""
    from ..inference.elbos import estimators

    entry, _ = model_kinds.parse(config.model.kind)
    if entry.needs_enumeration and not estimators.parse(config.inference.elbo)[0].enumerated:
        usable = ", ".join(e.name for e in estimators.entries() if e.enumerated)
        raise PyroVAEError(
            f"--elbo {config.inference.elbo} does not run {config.model.kind}: it sums "
            f"over y by enumeration, which {usable} (TraceEnum_ELBO) do"
        )
    if entry.validate:
        entry.validate(config)


@register("vae", distributed=True)
def vae(config: Config, image_shape, num_classes: int, checkpoint, prepared) -> VAE:
    """The variational autoencoder (Kingma & Welling 2014)."""
    return build_vae(config, image_shape)


def semi_options(config: Config, num_classes: int) -> dict[str, Any]:
    """What a semi-supervised kind's model takes from ``[model]`` and ``[semi]``."""
    s = config.semi
    return dict(
        **_components(config),
        aux_weight=s.aux_weight,
        aux_scaling=s.aux_scaling,
        schedule=s.schedule,
        labeled=s.labeled,
        validation=s.validation,
        classifier=s.classifier,
        num_classes=num_classes,
    )


def _validate_semi(config: Config) -> None:
    m = config.model
    if m.arch != "mlp":
        raise PyroVAEError(f"--model {m.kind} is built of MLPs; drop --arch {m.arch}")
    if m.kind != "m2" and config.semi.classifier != SemiConfig.classifier:
        raise PyroVAEError(
            f"--classifier is for --model m2, whose q(y|x) reads the images alone; "
            f"drop --classifier {config.semi.classifier}"
        )


def validate_m2(config: Config) -> None:
    """The checks of a kind that models the images themselves, as M2 does."""
    _validate_semi(config)
    if config.semi.m1_run:
        raise PyroVAEError("--m1-run is for --model m1m2; M2 models the images themselves")
    if config.semi.m1_features != SemiConfig.m1_features:
        raise PyroVAEError("--m1-features is for --model m1m2; M2 models the images themselves")


@register("m2", section="semi", needs_enumeration=True, validate=validate_m2)
def m2(config: Config, image_shape, num_classes: int, checkpoint, prepared) -> SSVAE:
    """Semi-supervised M2 (Kingma et al. 2014): y enumerated where unlabelled."""
    return SSVAE(image_shape, **semi_options(config, num_classes))


def _validate_m1m2(config: Config) -> None:
    _validate_semi(config)
    if not config.semi.m1_run:
        raise PyroVAEError("--model m1m2 needs --m1-run RUN_DIR, a VAE run trained on the data")


def _trained_m1(config: Config, image_shape: tuple[int, ...]) -> VAE:
    """The trained VAE an M1+M2 run stacks M2 on, checked against the run's data."""
    from ..training.runs import load_run

    m1 = load_run(config.semi.m1_run)
    if not isinstance(m1, VAE):
        raise PyroVAEError(f"--m1-run {config.semi.m1_run} is not a VAE run")
    if m1.config.data.dataset != config.data.dataset or m1.image_shape != image_shape:
        raise PyroVAEError(
            f"--m1-run {config.semi.m1_run} was trained on {m1.config.data.dataset}, "
            f"not on {config.data.dataset}"
        )
    return m1


@register(
    "m1m2", section="semi", needs_enumeration=True, validate=_validate_m1m2, prepare=_trained_m1
)
def m1m2(config: Config, image_shape, num_classes: int, checkpoint, prepared) -> M1M2:
    """M2 on the latent means of a trained VAE, M1 (Kingma et al. 2014)."""
    if checkpoint is not None:  # M1's weights are in the checkpoint; its config beside them
        from ..config import from_dict

        m1_config = from_dict(checkpoint["m1"]["config"])
        m1_config.model.plugins = config.model.plugins
        m1 = build_vae(m1_config, tuple(checkpoint["m1"]["image_shape"]))
        m1.config = m1_config
    else:
        m1 = prepared
    return M1M2(m1, m1_features=config.semi.m1_features, **semi_options(config, num_classes))
