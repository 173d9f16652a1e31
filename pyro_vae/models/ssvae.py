"""Semi-supervised VAE M2 (Kingma et al. 2014) as a Pyro model and guide.

model: p(y) p(z) p(x|y,z), with y ~ OneHotCategorical, observed when labelled.
guide: q(y|x) q(z|x,y). For unlabelled images ``TraceEnum_ELBO`` sums over y
exactly (parallel enumeration of the guide's y site); ``classifier`` adds the
auxiliary term alpha * log q(y|x) on labelled images. Prior, likelihood and
guide family are the same components the VAE uses, chosen by the same specs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..errors import PyroVAEError
from ..guides import guides
from ..likelihoods import likelihoods
from ..nets import mlp
from ..priors import priors

PYRO_NAME = "ssvae"


def _cat(*tensors: torch.Tensor) -> torch.Tensor:
    """Concatenate along the last dim after broadcasting the leading (batch, enum) dims."""
    lead = torch.broadcast_shapes(*(t.shape[:-1] for t in tensors))
    return torch.cat([t.expand(*lead, t.shape[-1]) for t in tensors], dim=-1)


class SSVAE(nn.Module):
    """M2: a VAE whose latent code is (y, z), y the class, z the style.

    Args:
        image_shape: shape of one image; data arrive flattened.
        num_classes: number of classes of y.
        latent_dim: size of z.
        hidden: hidden sizes of the three MLPs (classifier q(y|x), encoder q(z|x,y)
            and the decoder p(x|y,z), which mirrors them).
        prior, likelihood, guide: component specs or objects, as for ``VAE``
            (priors defined through the encoder, the VampPrior, do not apply).
        aux_weight: alpha of the auxiliary classification loss.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int = 10,
        latent_dim: int = 50,
        hidden: Sequence[int] = (500,),
        prior: Any = "normal",
        likelihood: Any = "bernoulli",
        guide: Any = "normal",
        aux_weight: float = 1.0,
    ):
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.data_dim = math.prod(self.image_shape)
        self.num_classes, self.latent_dim, self.aux_weight = num_classes, latent_dim, aux_weight
        self.likelihood = likelihoods.build(likelihood, data_dim=self.data_dim)
        self.posterior = guides.build(guide, latent_dim=latent_dim)
        try:
            self.prior = priors.build(prior, latent_dim=latent_dim, data_dim=self.data_dim)
        except TypeError:
            raise PyroVAEError(
                f"prior {prior!r} is defined through the VAE's encoder and does not apply to M2"
            ) from None
        self.classifier_net = mlp([self.data_dim, *hidden, num_classes])
        self.encoder = mlp([self.data_dim + num_classes, *hidden, self.posterior.param_dim])
        self.decoder = mlp([latent_dim + num_classes, *reversed(hidden), self.likelihood.param_dim])
        self.register_buffer("class_logits", torch.zeros(num_classes))  # uniform p(y)

    def _register(self) -> None:
        pyro.module(PYRO_NAME, self)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """p(y) p(z) p(x|y,z); ``y`` one-hot labels, or None for unlabelled images."""
        self._register()
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())
            y = pyro.sample("y", dist.OneHotCategorical(logits=self.class_logits), obs=y)
            pyro.sample("x", self.likelihood(self.decoder(_cat(z, y))), obs=x)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """q(y|x) q(z|x,y); y is sampled (enumerated by TraceEnum_ELBO) only when unlabelled."""
        self._register()
        with pyro.plate("data", x.shape[0]):
            if y is None:
                y = pyro.sample(
                    "y",
                    dist.OneHotCategorical(logits=self.classifier_net(x)),
                    infer={"enumerate": "parallel"},
                )
            pyro.sample("z", self.posterior(self.encoder(_cat(x, y))))

    def classifier(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The auxiliary model: alpha * log q(y|x) on labelled images (its guide is empty)."""
        self._register()
        with pyro.plate("data", x.shape[0]), pyro.poutine.scale(scale=self.aux_weight):
            pyro.sample("y_aux", dist.OneHotCategorical(logits=self.classifier_net(x)), obs=y)

    def empty_guide(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The guide of ``classifier``: it has no latent variables."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The most probable class under q(y|x), as indices."""
        return self.classifier_net(x).argmax(-1)
