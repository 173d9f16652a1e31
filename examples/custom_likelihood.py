"""A likelihood of your own: decoder output -> a Pyro distribution over the image.

python examples/custom_likelihood.py
pyro-vae train --plugin examples/custom_likelihood.py --likelihood student:3 --binarize none

A density over continuous pixel values: its nats (here above zero) do not compare
with the Bernoulli likelihood's probabilities of binary images.
"""

import pyro.distributions as dist
import torch
from torch import nn

import pyro_vae
from pyro_vae import PyroVAEError, likelihoods
from pyro_vae.registry import Arg, positive_float


@likelihoods.register("student", Arg("DF", positive_float, example="3"))
class StudentTLikelihood(nn.Module):
    """p(x|z) = prod_d StudentT(x_d | DF, mu_d(z), s_d(z)): a Gaussian robust to outlier pixels."""

    continuous = True  # a density over pixel values: its ELBO may be above 0

    def __init__(self, data_dim: int, DF: float):
        if not DF > 0:  # the spec's parser refuses it too; this guards calls from Python
            raise PyroVAEError(f"likelihood 'student' needs DF > 0, got {DF}")
        super().__init__()
        self.df = DF
        self.param_dim = 2 * data_dim  # the decoder emits a location and a scale per pixel

    def forward(self, params: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = params.chunk(2, dim=-1)
        scale = 0.01 + nn.functional.softplus(raw_scale)
        return dist.StudentT(self.df, loc, scale).to_event(1)

    def check_support(self, x: torch.Tensor) -> None:  # refused before any training
        if not torch.isfinite(x).all():
            raise PyroVAEError("likelihood 'student' needs finite pixel values")


if __name__ == "__main__":
    config = pyro_vae.Config()
    config.data.binarize = "none"
    config.model.likelihood, config.model.latent_dim, config.model.hidden = "student:3", 8, [128]
    config.train.epochs = 40
    summary = pyro_vae.train(config, "runs/student", overwrite=True, progress=False)
    print(f"Student-t: test ELBO {summary['test_elbo']:.2f}, log p(x) {summary['log_px']:.2f}")
