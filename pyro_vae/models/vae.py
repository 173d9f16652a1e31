"""The variational autoencoder as a Pyro model and guide.

``model`` is p(z) p(x|z) and ``guide`` is q(z|x); any ELBO from ``pyro.infer``
turns the pair into E_q[log p(x|z)] - KL(q(z|x) || p(z)), so no loss is written
here. Each of prior, likelihood, guide family and network is a component
chosen by spec string or passed in as an object.
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
from ..components.nets import architectures
from ..components.priors import priors
from ..registry import check_positive
from .base import PyroProgram

PYRO_NAME = "vae"
"""The name under which a VAE's parameters live in Pyro's param store."""


class VAE(PyroProgram):
    """Variational autoencoder (Kingma & Welling 2014) as a Pyro program.

    Args:
        image_shape: shape of one image, e.g. ``(28, 28)``; data arrive flattened.
        latent_dim: size of z.
        hidden: hidden layer sizes of the encoder (the decoder mirrors them).
        prior, likelihood, guide, arch: spec strings (``"normal"``, ``"bernoulli"``,
            ...) or ready-made component objects.
    """

    pyro_name = PYRO_NAME

    def __init__(
        self,
        image_shape: Sequence[int],
        latent_dim: int = 50,
        hidden: Sequence[int] = (400,),
        prior: Any = "normal",
        likelihood: Any = "bernoulli",
        guide: Any = "normal",
        arch: Any = "mlp",
    ):
        check_positive(latent_dim=latent_dim, **{f"hidden[{i}]": h for i, h in enumerate(hidden)})
        super().__init__()
        self.image_shape = tuple(image_shape)
        self.data_dim = math.prod(self.image_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihoods.build(likelihood, data_dim=self.data_dim)
        self.posterior = guides.build(guide, latent_dim=latent_dim)
        self.encoder, self.decoder = architectures.build(
            arch,
            image_shape=self.image_shape,
            hidden=tuple(hidden),
            latent_dim=latent_dim,
            encoder_out=self.posterior.param_dim,
            decoder_out=self.likelihood.param_dim,
        )
        # Built last: a prior may be defined through the encoder (the VampPrior).
        self.prior = priors.build(
            prior, latent_dim=latent_dim, data_dim=self.data_dim, encode=self.encode
        )

    def encode(self, x: torch.Tensor):
        """q(z|x) for a batch of flattened images, as a distribution of batch shape (B,)."""
        return self.posterior(self.encoder(x))

    def model_modules(self) -> tuple[nn.Module, ...]:
        """The decoder, likelihood and prior: p(z) p(x|z); the encoder side is the guide's."""
        return (self.decoder, self.likelihood, self.prior)

    def _plate(self, part: str, x: torch.Tensor, size: int | None) -> pyro.plate:
        """The data plate; given the dataset's ``size``, a minibatch scaled to the whole of it.

        Built once per (part, batch size, dataset size, device) and then re-entered, as
        Pyro lets a model reuse a plate: building one sends its subsample site through
        the effect-handler stack, which cost about 2 % of a training step at batch 128.
        """
        key = (part, x.shape[0], size, x.device)
        plates = self.__dict__.setdefault("_plates", {})
        if key not in plates:
            if size is None:
                plates[key] = pyro.plate("data", x.shape[0])
            else:
                subsample = torch.arange(x.shape[0], device=x.device)
                plates[key] = pyro.plate("data", size, subsample=subsample)
        return plates[key]

    def model(self, x: torch.Tensor, size: int | None = None) -> None:
        """p(z) p(x|z) for a batch of flattened images ``x`` of shape (B, D).

        ``size``: the number of images ``x`` is a minibatch of. Pyro then scales every
        log-density by size / B, so the ELBO estimates that of the whole dataset.
        """
        self.register("model")
        with self._plate("model", x, size):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", self.likelihood(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, size: int | None = None) -> None:
        """q(z|x), amortized by the encoder."""
        self.register("guide")
        with self._plate("guide", x, size):
            pyro.sample("z", self.encode(x))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x|z) at a representative z of q(z|x) (its mean where known), shape (B, D)."""
        q = self.encode(x)
        try:
            z = q.mean
        except NotImplementedError:  # flows have no closed-form mean
            z = q.sample()
        return self.likelihood(self.decoder(z)).mean

    @torch.no_grad()
    def generate(self, n: int) -> torch.Tensor:
        """Means of p(x|z) for ``n`` draws z ~ p(z), shape (n, D)."""
        z = self.prior().sample((n,))
        return self.likelihood(self.decoder(z)).mean
