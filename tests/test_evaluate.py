"""Held-out ELBO and the importance-sampled log-likelihood."""

import math

import pyro
import pytest
import torch

from pyro_vae import ImageBatches, load_dataset, load_run
from pyro_vae.evaluation.evaluate import elbo, log_likelihood


@pytest.fixture(scope="module")
def model_and_test_images(trained_run):
    return load_run(trained_run), ImageBatches(load_dataset("digits")).test_images


def _repeat(fn, n):
    values = torch.tensor([fn() for _ in range(n)], dtype=torch.float64)
    return values.mean().item(), (values.std() / math.sqrt(n)).item()


def test_log_likelihood_increases_with_k_and_is_not_below_the_elbo(model_and_test_images):
    vae, x = model_and_test_images
    pyro.set_rng_seed(0)
    bound, bound_se = _repeat(lambda: elbo(vae, x), 8)
    estimates = {k: _repeat(lambda k=k: log_likelihood(vae, x, k), 8) for k in (1, 10, 100)}

    (l1, se1), (l10, se10), (l100, se100) = estimates[1], estimates[10], estimates[100]
    # K = 1 is the ELBO itself, in expectation.
    assert abs(l1 - bound) < 4 * math.hypot(se1, bound_se)
    # Tighter with K: each step up clears its Monte Carlo error.
    assert l10 - l1 > 3 * math.hypot(se1, se10)
    assert l100 - l10 > 3 * math.hypot(se10, se100)
    assert l100 >= bound


def test_chunking_over_samples_and_images_leaves_the_estimate_unchanged(model_and_test_images):
    vae, x = model_and_test_images
    pyro.set_rng_seed(1)
    whole, se = _repeat(lambda: log_likelihood(vae, x, 100), 4)
    chunked, se_chunked = _repeat(lambda: log_likelihood(vae, x, 100, max_elements=5_000), 4)
    assert abs(whole - chunked) < 4 * math.hypot(se, se_chunked) + 1e-3


def test_elbo_is_averaged_per_image_whatever_the_batch_size(model_and_test_images):
    vae, x = model_and_test_images
    pyro.set_rng_seed(2)
    a = elbo(vae, x, batch_size=1000)
    pyro.set_rng_seed(2)
    b = elbo(vae, x, batch_size=50)
    assert a < 0 and b < 0
    assert abs(a - b) < 0.5


def test_log_likelihood_converges_to_the_exact_marginal_of_a_tiny_vae():
    """With one latent dimension, log p(x) = log int p(z) p(x|z) dz is a 1-D quadrature."""
    from pyro_vae import VAE

    pyro.set_rng_seed(0)
    vae = VAE((1, 2), latent_dim=1, hidden=(8,))
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    z = torch.linspace(-12, 12, 40_001).unsqueeze(-1)
    with torch.no_grad():
        log_joint = vae.prior().log_prob(z).unsqueeze(-1) + vae.likelihood(
            vae.decoder(z).unsqueeze(1)
        ).log_prob(x)
    exact = torch.logsumexp(log_joint, 0) + math.log(z[1, 0] - z[0, 0])

    estimate = log_likelihood(vae, x, 20_000)
    assert estimate == pytest.approx(exact.mean().item(), abs=0.01)
