"""p(x|z): observation models from decoder outputs to distributions over images.

A likelihood turns the decoder's unconstrained output (logits, locations, log
scales) into a Pyro distribution over the flattened image, an event of size D.
It says how many decoder outputs it needs (``param_dim``) and refuses data
outside its support before any training starts (``check_support``).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .errors import PyroVAEError
from .registry import Registry

likelihoods = Registry("likelihood")


@likelihoods.register("bernoulli")
class BernoulliLikelihood(nn.Module):
    """p(x|z) = prod_d Bernoulli(x_d | sigmoid(logit_d)), parametrized by logits.

    Logits avoid the sigmoid-then-log round trip of probability-space Bernoulli
    and are numerically safer. Validation is off so that [0, 1] intensities
    (``--binarize none``, Pyro's tutorial setting) score as soft targets.
    """

    def __init__(self, data_dim: int):
        super().__init__()
        self.param_dim = data_dim

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:
        if x.numel() and (x.min() < 0 or x.max() > 1):
            raise PyroVAEError(
                f"likelihood 'bernoulli' needs pixel values in [0, 1]; the data spans "
                f"[{x.min().item():g}, {x.max().item():g}]"
            )
