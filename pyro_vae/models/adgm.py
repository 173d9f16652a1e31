"""The auxiliary deep generative model (ADGM, Maaløe et al. 2016), as ``--model adgm``.

M2 with an auxiliary latent variable a that makes the guide richer without
changing the model's marginal p(x, y):

- model: p(y) p(z) p(x|y,z) p(a|x,y,z);
- guide: q(a|x) q(y|a,x) q(z|a,y,x), y enumerated in parallel where unlabelled;
- classifier: q(y|x) = E_q(a|x)[q(y|a,x)], its auxiliary term
  alpha * E_q(a|x)[log q(y|a,x)] on labelled images, with the a the guide drew.

It is M2 (``SSVAE``) with three methods rewritten and two networks added; the
semi-supervised training, split, schedules, evaluation and pictures are M2's,
and the kind is registered below as a plugin would register it. Prior,
likelihood and the family of q(z|...) come from the registries, as for M2; q(a|x)
and p(a|x,y,z) are diagonal Normals (the ``normal`` guide family).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..components.guides import guides
from ..components.nets import mlp
from ..config import Config
from .kinds import register, semi_options, validate_m2
from .ssvae import SSVAE, broadcast_cat


class ADGM(SSVAE):
    """M2 with an auxiliary variable a (Maaløe et al. 2016).

    Args:
        image_shape: shape of one input; inputs arrive flattened.
        aux_dim: size of a (None: ``latent_dim``).
        **m2_options: as ``SSVAE`` (``num_classes``, ``latent_dim``, ``hidden``, ``prior``,
            ``likelihood``, ``guide``, ``aux_weight``, ``aux_scaling``, ``schedule``,
            ``labeled``, ``validation``).
    """

    pyro_name = "adgm"

    default_lr = 3e-3
    """The ADGM's measured rate, as M2's: ahead of 1e-3 on validation on seeds 0-2 at 100
    labels (docs/RESULTS.md)."""

    def __init__(self, image_shape: Sequence[int], aux_dim: int | None = None, **m2_options: Any):
        super().__init__(image_shape, **m2_options)
        hidden = m2_options.get("hidden", (500,))
        self.aux_dim = aux_dim or self.latent_dim
        d, k, a, z = self.data_dim, self.num_classes, self.aux_dim, self.latent_dim
        self.aux_posterior = guides.build("normal", latent_dim=a)  # q(a|x)
        self.aux_encoder = mlp([d, *hidden, self.aux_posterior.param_dim])
        self.aux_family = guides.build("normal", latent_dim=a)  # p(a|x,y,z)
        self.aux_decoder = mlp([d + k + z, *hidden, self.aux_family.param_dim])
        # q(y|a,x) and q(z|a,y,x) see a too
        self.classifier_net = mlp([d + a, *hidden, k])
        self.encoder = mlp([d + k + a, *hidden, self.posterior.param_dim])

    def model_modules(self) -> tuple[nn.Module, ...]:
        return (*super().model_modules(), self.aux_decoder, self.aux_family)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None, plate: str = "data"):
        """p(y) p(z) p(x|y,z) p(a|x,y,z); returns a (the guide's, when replayed)."""
        self.register("model")
        with pyro.plate(plate, x.shape[0]):
            z = pyro.sample("z", self.prior())
            y = pyro.sample("y", dist.OneHotCategorical(logits=self.class_logits), obs=y)
            pyro.sample("x", self.likelihood(self.decoder(broadcast_cat(z, y))), obs=x)
            return pyro.sample("a", self.aux_family(self.aux_decoder(broadcast_cat(x, y, z))))

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None, plate: str = "data"):
        """q(a|x) q(y|a,x) q(z|a,y,x); y enumerated only when unlabelled."""
        self.register("guide")
        with pyro.plate(plate, x.shape[0]):
            a = pyro.sample("a", self.aux_posterior(self.aux_encoder(x)))
            if y is None:
                y = pyro.sample(
                    "y",
                    dist.OneHotCategorical(logits=self.classifier_net(broadcast_cat(x, a))),
                    infer={"enumerate": "parallel"},
                )
            pyro.sample("z", self.posterior(self.encoder(broadcast_cat(x, y, a))))

    def classifier(self, x: torch.Tensor, y: torch.Tensor, plate: str = "data", a=None) -> None:
        """alpha * log q(y|a,x) on labelled images, a the guide's draw from q(a|x) (a fresh
        draw when called alone)."""
        self.register("guide")
        weight = self.aux_term_weight()
        if weight == 0:
            return
        if a is None:
            a = self.aux_posterior(self.aux_encoder(x)).rsample()
        with pyro.plate(plate, x.shape[0]), pyro.poutine.scale(scale=weight):
            logits = self.classifier_net(broadcast_cat(x, a))
            pyro.sample("y_aux", dist.OneHotCategorical(logits=logits), obs=y)

    def labelled_terms(self, x: torch.Tensor, y: torch.Tensor) -> None:
        a = self.model(x, y, plate="labelled")
        self.classifier(x, y, plate="labelled_aux", a=a)

    @torch.no_grad()
    def class_logits_of(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y|a,x) at the mean of q(a|x): the classifier used to predict."""
        a = self.aux_posterior(self.aux_encoder(x)).mean
        return self.classifier_net(torch.cat([x, a], -1))

    def z_posterior(self, x: torch.Tensor, y: torch.Tensor) -> dist.Distribution:
        """q(z|a,y,x) at the mean of q(a|x)."""
        a = self.aux_posterior(self.aux_encoder(x)).mean
        return self.posterior(self.encoder(torch.cat([x, y, a], -1)))


@register("adgm", section="semi", needs_enumeration=True, validate=validate_m2)
def adgm(config: Config, image_shape, num_classes: int, checkpoint, prepared) -> ADGM:
    """The auxiliary deep generative model (Maaløe et al. 2016): M2 with an auxiliary a."""
    return ADGM(image_shape, **semi_options(config, num_classes))
