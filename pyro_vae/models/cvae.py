"""The conditional VAE (Sohn et al. 2015) on Pyro's ``examples/cvae`` task: fill in an image's
missing quadrants from the ones it shows, as ``--model cvae``, and the network that
Pyro's example trains first, as ``--model cvae-baseline``.

Each image is split by a fixed mask into the pixels shown, x, and the pixels to fill
in, y (``--quadrants``: 1 shows the bottom-left quadrant, as Pyro's example; 2 the
left half; 3 all but the bottom right). Both models take the whole image, so the
loop, the held-out numbers and log p(y|x) by importance sampling are the VAE's:

- baseline: y ~ p(y|x) = Bernoulli(f(x)) per missing pixel, no latent variable; its
  ELBO is log p(y|x) itself, the (negative) cross-entropy Pyro's example minimizes;
- CVAE: model p(z|x) p(y|x,z), a conditional prior (a network's diagonal Normal on
  x, and on the trained baseline's guess at y where ``--baseline-run`` gives one, as
  in Pyro's example) and a generation network that reads z alone (as Pyro's: x reaches
  y through the prior); guide q(z|x,y), a recognition network on the whole image. Its
  test ELBO and log p(y|x) are of the missing pixels only.

The likelihood and the guide family come from the registries; the conditional
prior's family is the guide registry's ``normal``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import torch
from torch import nn

from ..components.guides import guides
from ..components.likelihoods import likelihoods
from ..components.nets import mlp
from ..config import Config
from ..errors import PyroVAEError
from ..registry import check_positive
from .base import PyroProgram
from .kinds import _components, register

QUADRANTS = (1, 2, 3)


def shown_pixels(image_shape: Sequence[int], quadrants: int) -> torch.Tensor:
    """The mask of the pixels a model is shown (True) for ``quadrants`` visible quadrants,
    flattened: 1, the bottom-left quadrant; 2, the left half; 3, all but the bottom right."""
    if quadrants not in QUADRANTS:
        raise PyroVAEError(f"--quadrants must be 1, 2 or 3, got {quadrants}")
    *lead, h, w = image_shape
    shown = torch.zeros(h, w, dtype=torch.bool)
    shown[h // 2 :, : w // 2] = True
    if quadrants >= 2:
        shown[:, : w // 2] = True
    if quadrants == 3:
        shown[: h // 2, :] = True
    return shown.expand(*lead, h, w).flatten()


class _Completion(PyroProgram):
    """What both models share: the split of each image into shown and missing pixels, the
    likelihood of the missing ones, and the completions picture."""

    log_px_of = "y|x"
    """What log p(x) of the summary is here: of the missing pixels y given the shown x."""

    def _split(self, image_shape: Sequence[int], quadrants: int, likelihood: Any) -> None:
        self.image_shape, self.quadrants = tuple(image_shape), quadrants
        self.data_dim = math.prod(self.image_shape)
        self.register_buffer("shown", shown_pixels(self.image_shape, quadrants))
        self.shown_dim = int(self.shown.sum())
        self.missing_dim = self.data_dim - self.shown_dim
        self.likelihood = likelihoods.build(likelihood, data_dim=self.missing_dim)

    def _plate(self, x: torch.Tensor) -> pyro.plate:
        return pyro.plate("data", x.shape[0])

    def missing(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ~self.shown]

    def visible(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.shown]

    def filled(self, x: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        """Images with the shown pixels of ``x`` and ``missing`` in the others."""
        out = x.expand(*missing.shape[:-1], x.shape[-1]).clone()
        out[..., ~self.shown] = missing
        return out

    def save_pictures(self, data, run_dir, metrics: list) -> None:
        """completions.png (each test image shown, its truth, completions) and elbo.png."""
        from ..evaluation import plots
        from ..evaluation.evaluate import EVAL_SEED, seeded

        x = data.test_images[:10]
        if not len(x):
            return
        with seeded(EVAL_SEED, x.device):
            completions = self.complete(x, 8)  # (8, images, D)
        shown = x.clone()
        shown[:, ~self.shown] = 0.5  # grey where the model sees nothing
        grid = torch.cat([shown[None], x[None], completions]).transpose(0, 1)
        columns = ["shown", "truth", *(f"{i + 1}" for i in range(len(completions)))]
        plots.image_grid(
            grid.flatten(0, 1),
            self.image_shape,
            run_dir / "completions.png",
            ncols=len(columns),
            title=self.picture_title,
            col_labels=columns,
            xlabel="completions: the missing pixels' mean of p(y|x, z)",
        )
        title = f"{data.dataset.name}: conditional ELBO of the missing pixels per epoch"
        plots.elbo_curve(metrics, run_dir / "elbo.png", title=title)


class CVAEBaseline(_Completion):
    """The missing pixels from the shown ones by one network, y ~ Bernoulli(f(x)): Pyro's
    example's ``BaselineNet``, as a Pyro program with no latent variable.

    Args:
        image_shape: shape of one image; images arrive flattened.
        quadrants: how many quadrants are shown (1, 2 or 3).
        hidden: hidden sizes of f.
        likelihood: the likelihood of the missing pixels (a spec).
    """

    pyro_name = "cvae_baseline"
    picture_title = "The baseline's prediction of the missing quadrants"

    def __init__(
        self,
        image_shape: Sequence[int],
        quadrants: int = 1,
        hidden: Sequence[int] = (500, 500),
        likelihood: Any = "bernoulli",
    ):
        check_positive(**{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        super().__init__()
        self._split(image_shape, quadrants, likelihood)
        self.net = mlp([self.shown_dim, *hidden, self.likelihood.param_dim])

    def model_modules(self) -> tuple[nn.Module, ...]:
        return (self.net, self.likelihood)

    def model(self, x: torch.Tensor, size: int | None = None) -> None:
        """p(y|x): the missing pixels given the shown ones."""
        self.register("model")
        with self._plate(x):
            pyro.sample("y", self.likelihood(self.net(self.visible(x))), obs=self.missing(x))

    def guide(self, x: torch.Tensor, size: int | None = None) -> None:
        """No latent variable: nothing to infer."""
        self.register("guide")

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(y|x) for the missing pixels, (B, missing pixels)."""
        return self.likelihood(self.net(self.visible(x))).mean

    @torch.no_grad()
    def complete(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return self.filled(x, self.predict(x)).expand(1, *x.shape)


class CVAE(_Completion):
    """The conditional VAE (Sohn et al. 2015) that fills in missing pixels y from shown x.

    Args:
        image_shape: shape of one image; images arrive flattened.
        quadrants: how many quadrants are shown (1, 2 or 3).
        latent_dim: size of z.
        hidden: hidden sizes of the recognition and prior networks (the generation
            network mirrors them).
        likelihood, guide: specs of p(y|x,z) and of q(z|x,y)'s family.
        baseline: a trained ``CVAEBaseline`` whose guess at y the prior network also
            reads (frozen, outside Pyro's param store), or None.
    """

    pyro_name = "cvae"
    picture_title = "The CVAE's completions: z ~ p(z|x), decoded"

    def __init__(
        self,
        image_shape: Sequence[int],
        quadrants: int = 1,
        latent_dim: int = 50,
        hidden: Sequence[int] = (500, 500),
        likelihood: Any = "bernoulli",
        guide: Any = "normal",
        baseline: CVAEBaseline | None = None,
    ):
        check_positive(latent_dim=latent_dim, **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        super().__init__()
        self._split(image_shape, quadrants, likelihood)
        self.latent_dim = latent_dim
        if baseline is not None and (baseline.image_shape, baseline.quadrants) != (
            self.image_shape,
            quadrants,
        ):
            raise PyroVAEError("the baseline was trained on other images or other quadrants")
        self.baseline = None if baseline is None else baseline.requires_grad_(False).eval()
        self.posterior = guides.build(guide, latent_dim=latent_dim)
        self.prior_family = guides.build("normal", latent_dim=latent_dim)
        prior_in = self.shown_dim + (self.missing_dim if baseline is not None else 0)
        self.encoder = mlp([self.data_dim, *hidden, self.posterior.param_dim])
        self.prior_net = mlp([prior_in, *hidden, self.prior_family.param_dim])
        self.decoder = mlp([latent_dim, *reversed(hidden), self.likelihood.param_dim])

    def train(self, mode: bool = True) -> CVAE:
        super().train(mode)
        if self.baseline is not None:
            self.baseline.eval()
        return self

    def model_modules(self) -> tuple[nn.Module, ...]:
        return (self.prior_net, self.prior_family, self.decoder, self.likelihood)

    def conditional_prior(self, x: torch.Tensor):
        """p(z|x) for images ``x`` (only their shown pixels are read)."""
        inputs = self.visible(x)
        if self.baseline is not None:
            inputs = torch.cat([inputs, self.baseline.predict(x)], -1)
        return self.prior_family(self.prior_net(inputs))

    def model(self, x: torch.Tensor, size: int | None = None) -> None:
        """p(z|x) p(y|x,z): the missing pixels y given the shown x."""
        self.register("model")
        with self._plate(x):
            z = pyro.sample("z", self.conditional_prior(x))
            pyro.sample("y", self.likelihood(self.decoder(z)), obs=self.missing(x))

    def guide(self, x: torch.Tensor, size: int | None = None) -> None:
        """q(z|x,y), from the whole image."""
        self.register("guide")
        with self._plate(x):
            pyro.sample("z", self.posterior(self.encoder(x)))

    @torch.no_grad()
    def complete(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """``n`` completions of each image: z ~ p(z|x), the mean of p(y|x,z) in the missing
        pixels, the shown ones kept; (n, B, D)."""
        z = self.conditional_prior(x).sample((n,))
        return self.filled(x, self.likelihood(self.decoder(z)).mean)

    def checkpoint_extras(self) -> dict:
        """The baseline's config, where the prior reads one (its weights are in the state)."""
        if self.baseline is None:
            return {}
        from ..config import to_dict

        return {"baseline": {"config": to_dict(self.baseline.config)}}


def _check(config: Config) -> None:
    m = config.model
    if m.arch != "mlp":
        raise PyroVAEError(f"--model {m.kind} is built of MLPs; drop --arch {m.arch}")
    if m.prior != "normal":
        raise PyroVAEError(
            f"--model {m.kind}'s prior p(z|x) is a network's diagonal Normal; drop --prior"
        )
    if config.cvae.quadrants not in QUADRANTS:
        raise PyroVAEError(f"--quadrants must be 1, 2 or 3, got {config.cvae.quadrants}")


def _validate_baseline(config: Config) -> None:
    _check(config)
    if config.cvae.baseline_run:
        raise PyroVAEError("--baseline-run is for --model cvae; the baseline is trained alone")


def build_baseline(config: Config, image_shape) -> CVAEBaseline:
    options = _components(config)
    return CVAEBaseline(
        image_shape, config.cvae.quadrants, options["hidden"], options["likelihood"]
    )


@register("cvae-baseline", section="cvae", validate=_validate_baseline)
def cvae_baseline(config: Config, image_shape, num_classes, checkpoint, prepared) -> CVAEBaseline:
    """The network Pyro's CVAE example trains first: missing pixels from the shown ones."""
    return build_baseline(config, image_shape)


def _trained_baseline(config: Config, image_shape) -> CVAEBaseline | None:
    """The baseline run a CVAE's prior reads, checked against the CVAE's task."""
    from ..training.runs import load_run

    if not config.cvae.baseline_run:
        return None
    baseline = load_run(config.cvae.baseline_run)
    if not isinstance(baseline, CVAEBaseline):
        raise PyroVAEError(f"--baseline-run {config.cvae.baseline_run} is not a cvae-baseline run")
    b = baseline.config
    if (b.data.dataset, b.cvae.quadrants) != (config.data.dataset, config.cvae.quadrants):
        raise PyroVAEError(
            f"--baseline-run {config.cvae.baseline_run} fills in {b.cvae.quadrants} "
            f"quadrant(s) of {b.data.dataset}, not {config.cvae.quadrants} of "
            f"{config.data.dataset}"
        )
    return baseline


@register("cvae", section="cvae", validate=_check, prepare=_trained_baseline)
def cvae(config: Config, image_shape, num_classes, checkpoint, prepared) -> CVAE:
    """The conditional VAE (Sohn et al. 2015) on Pyro's quadrant-completion task."""
    baseline = prepared
    if checkpoint is not None and "baseline" in checkpoint:
        from ..config import from_dict

        baseline_config = from_dict(checkpoint["baseline"]["config"])
        baseline = build_baseline(baseline_config, image_shape)
        baseline.config = baseline_config
    options = _components(config)
    return CVAE(
        image_shape,
        config.cvae.quadrants,
        options["latent_dim"],
        options["hidden"],
        options["likelihood"],
        options["guide"],
        baseline,
    )
